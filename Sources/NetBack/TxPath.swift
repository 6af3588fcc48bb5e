import CNetShim
import CXen
import Glibc
import XenHV
import XenRing

/// A transmit error that disables the vif until the frontend reconnects
/// (Linux netback's `xenvif_fatal_tx_err`). Each case reads like the rule the
/// guest broke.
public enum TxFatal: Error, Equatable, Sendable, CustomStringConvertible {
    /// `req_prod` ran more than a ring ahead of our responses.
    case bogusRing(RingError)
    /// A packet's slots run past the requests the frontend has published.
    case slotsExceedRequests(slots: Int, outstanding: Int)
    /// More than `TxParser.fatalSlots` slots after the first: a malicious frontend.
    case maliciousSlotCount(Int)
    /// A slot whose data crosses its page (offset + size > 4096).
    case slotCrossesPage(offset: UInt16, size: UInt16)
    /// The request announced extra info that never came.
    case missingExtraInfo
    case invalidExtraType(UInt8)
    case gsoSizeZero
    case badGSOType(UInt8)

    public var description: String {
        switch self {
        case .bogusRing(let e): "\(e)"
        case let .slotsExceedRequests(s, o): "asked for \(s) slots but only \(o) requests are outstanding"
        case .maliciousSlotCount(let n): "malicious frontend using \(n) slots, threshold \(TxParser.fatalSlots)"
        case let .slotCrossesPage(o, s): "slot crosses page boundary: offset \(o), size \(s)"
        case .missingExtraInfo: "missing extra info"
        case .invalidExtraType(let t): "invalid extra type \(t)"
        case .gsoSizeZero: "GSO size must not be zero"
        case .badGSOType(let t): "bad GSO type \(t)"
        }
    }
}

/// A transmit packet dropped with ERROR responses; the vif stays up.
public enum TxDrop: Equatable, Sendable, CustomStringConvertible {
    /// More than `TxParser.legacySlotsMax` slots after the first (XEN_NETIF_NR_SLOTS_MIN);
    /// carries the fragment count at which it was noticed.
    case tooManySlots(Int)
    /// A fragment larger than what remains of the packet's announced size.
    case fragmentLargerThanRemaining(size: UInt16, remaining: UInt16)
    /// First slot shorter than an Ethernet header.
    case firstSlotTooShort(UInt16)
    case checksumSetup(ChecksumSetupError)
    case grantCopy(GrantStatus)
    case tapWrite(errno: Int32)

    public var counter: VifCounter {
        switch self {
        case .tooManySlots: .txTooManySlots
        case .fragmentLargerThanRemaining: .txFragmentLargerThanRemaining
        case .firstSlotTooShort: .txFirstSlotTooShort
        case .checksumSetup: .txChecksumSetup
        case .grantCopy: .txGrantCopy
        case .tapWrite: .txTapWrite
        }
    }

    public var description: String {
        switch self {
        case .tooManySlots(let n): "too many slots (\(n)) exceeding limit (\(TxParser.legacySlotsMax)), dropping packet"
        case let .fragmentLargerThanRemaining(s, r): "invalid tx request, slot size \(s) > remaining size \(r)"
        case .firstSlotTooShort(let n): "bad packet size: \(n)"
        case .checksumSetup(let e): "can't set up checksum: \(e)"
        case .grantCopy(let s): "grant copy failed: \(s)"
        case .tapWrite(let e): "tap write failed: \(String(cString: strerror(e)))"
        }
    }
}

/// A GSO request from the guest's GSO extra-info slot.
public struct TxGSO: Equatable, Sendable {
    /// XEN_NETIF_GSO_TYPE_TCPV4 (1) or _TCPV6 (2).
    public var type: UInt8
    public var size: UInt16
    public init(type: UInt8, size: UInt16) {
        self.type = type
        self.size = size
    }
}

extension FrontRing where P == NetifTxRing {
    /// The frontend's side of the layout ``TxPacket`` parses (Linux netfront's
    /// xennet_make_txreqs): queues slot `index` of a packet of `slots` slots and
    /// `totalBytes` bytes. The first slot carries the whole length, `flags` and,
    /// with a GSO request, NETTXF_extra_info and the GSO extra in the next
    /// ring slot; every slot but the last carries NETTXF_more_data. False when
    /// the ring is full (callers check the space for the whole packet first).
    @discardableResult
    public mutating func enqueueTxSlot(_ index: Int, of slots: Int, totalBytes: Int, slotBytes: Int, gref: UInt32, id: UInt16,
                                       offset: UInt16 = 0, flags: UInt16 = 0, gso: TxGSO? = nil) -> Bool {
        var r = netif_tx_request()
        r.gref = gref
        r.offset = offset
        r.id = id
        r.size = UInt16(index == 0 ? totalBytes : slotBytes)
        var f: UInt16 = index == 0 ? flags : 0
        if index + 1 < slots { f |= UInt16(NETTXF_more_data) }
        if index == 0 && gso != nil { f |= UInt16(NETTXF_extra_info) }
        r.flags = f
        guard enqueue(r) else { return false }
        guard index == 0, let g = gso else { return true }
        var x = netif_extra_info()
        x.type = UInt8(XEN_NETIF_EXTRA_TYPE_GSO)
        x.u.gso.size = g.size
        x.u.gso.type = g.type
        return enqueueExtra(x)
    }

    /// Queues an extra-info slot (a 12-byte netif_extra_info in a request slot).
    @discardableResult
    public mutating func enqueueExtra(_ x: netif_extra_info) -> Bool {
        var slot = netif_tx_request()
        // Sound: netif_extra_info and netif_tx_request are both 12-byte plain C structs sharing a ring slot.
        withUnsafeMutableBytes(of: &slot) { p in withUnsafeBytes(of: x) { p.copyMemory(from: $0) } }
        return enqueue(slot)
    }
}

/// One transmit packet's slots, each request copied once out of the ring.
/// Reused across packets (its fragment storage keeps its capacity).
public struct TxPacket: Sendable {
    /// The first request; `size` is the bytes in the first slot once parsed
    /// (the announced total minus the fragments), as Linux rewrites it.
    public var first = netif_tx_request()
    /// The packet length the first request announced.
    public var totalSize = 0
    public var extraCount = 0
    public var gso: TxGSO?
    /// A multicast-control request (MCAST_ADD/DEL extra): answered, not sent.
    public var multicastControl = false
    public var fragments: [netif_tx_request] = []
    public var drop: TxDrop?

    public init() { fragments.reserveCapacity(TxParser.fatalSlots + 2) }

    public mutating func reset(first f: netif_tx_request) {
        first = f
        totalSize = Int(f.size)
        extraCount = 0
        gso = nil
        multicastControl = false
        fragments.removeAll(keepingCapacity: true)
        drop = nil
    }

    /// Ring slots this packet used: first, extras, fragments.
    public var slots: Int { 1 + extraCount + fragments.count }
}

/// The transmit request parser: Linux netback's `xenvif_get_extras`,
/// `xenvif_count_requests` and the checks of `xenvif_tx_build_gops`, on
/// private copies of the requests.
public enum TxParser {
    /// XEN_NETIF_NR_SLOTS_MIN: more slots than this after the first drop the
    /// packet (a 19-slot packet is legal, 20 and 21 are dropped).
    public static let legacySlotsMax = Int(XEN_NETIF_NR_SLOTS_MIN)
    /// Linux's fatal_skb_slots default: more slots than this after the first
    /// are fatal (22 slots and up). Linux counts as here: `slots` is the number
    /// of fragments already read when the next one is checked, so its ">= 18
    /// drop, >= 20 fatal" are the xen-facts table's numbers.
    public static let fatalSlots = 20
    public static let pageSize = 4096
    public static let ethernetHeader = 14

    /// Parses the packet that starts with `first` (already taken from the
    /// ring); `outstanding` is how many published requests follow it, and
    /// `next` takes the next one (a copy). Throws for fatal errors; a dropped
    /// packet comes back with `packet.drop` set and all its slots consumed.
    public static func parse(
        first: netif_tx_request, outstanding: Int,
        next: () throws(TxFatal) -> netif_tx_request,
        into packet: inout TxPacket
    ) throws(TxFatal) {
        packet.reset(first: first)
        var workToDo = outstanding

        if first.flags & UInt16(NETTXF_extra_info) != 0 {
            var more = true
            while more {
                guard workToDo > 0 else { throw .missingExtraInfo }
                workToDo -= 1
                let raw = try next()
                let extra = withUnsafeBytes(of: raw) { $0.loadUnaligned(as: netif_extra_info.self) }
                packet.extraCount += 1
                guard extra.type != 0, extra.type < UInt8(XEN_NETIF_EXTRA_TYPE_MAX) else {
                    throw .invalidExtraType(extra.type)
                }
                switch Int32(extra.type) {
                case XEN_NETIF_EXTRA_TYPE_GSO:
                    packet.gso = TxGSO(type: extra.u.gso.type, size: extra.u.gso.size)
                case XEN_NETIF_EXTRA_TYPE_MCAST_ADD, XEN_NETIF_EXTRA_TYPE_MCAST_DEL:
                    packet.multicastControl = true
                default:
                    break  // hash: accepted, not used
                }
                more = extra.flags & UInt8(XEN_NETIF_EXTRA_FLAG_MORE) != 0
            }
        }
        // A multicast-control request is answered on its own (Linux `continue`s).
        if packet.multicastControl { return }

        if first.flags & UInt16(NETTXF_more_data) != 0 {
            var remaining = first.size
            var slots = 0
            var more = true
            while more {
                guard slots < workToDo else { throw .slotsExceedRequests(slots: slots + 1, outstanding: workToDo) }
                guard slots < fatalSlots else { throw .maliciousSlotCount(slots) }
                if packet.drop == nil, slots >= legacySlotsMax { packet.drop = .tooManySlots(slots + 1) }
                let txp = try next()
                if packet.drop == nil, txp.size > remaining {
                    packet.drop = .fragmentLargerThanRemaining(size: txp.size, remaining: remaining)
                }
                remaining &-= txp.size
                slots += 1
                guard Int(txp.offset) + Int(txp.size) <= pageSize else {
                    throw .slotCrossesPage(offset: txp.offset, size: txp.size)
                }
                more = txp.flags & UInt16(NETTXF_more_data) != 0
                packet.fragments.append(txp)
            }
            packet.first.size = remaining
        }
        if packet.drop != nil { return }
        guard packet.first.size >= ethernetHeader else {
            packet.drop = .firstSlotTooShort(packet.first.size)
            return
        }
        guard Int(packet.first.offset) + Int(packet.first.size) <= pageSize else {
            throw .slotCrossesPage(offset: packet.first.offset, size: packet.first.size)
        }
        if let g = packet.gso {
            guard g.size != 0 else { throw .gsoSizeZero }
            guard g.type == UInt8(XEN_NETIF_GSO_TYPE_TCPV4) || g.type == UInt8(XEN_NETIF_GSO_TYPE_TCPV6) else {
                throw .badGSOType(g.type)
            }
        }
    }

    /// The virtio_net_hdr for a packet's private copy `data`: csum_blank asks
    /// the kernel to checksum (csum_start/csum_offset from the headers), a GSO
    /// extra asks it to segment; data_validated becomes DATA_VALID. A GSO
    /// packet without csum_blank gets its pseudo-header checksum recomputed
    /// (Linux's rx_gso_checksum_fixup). `data` may be the packet's head only
    /// (its first slot), as long as the headers are in it; `totalLength` is
    /// then the whole packet's (the pseudo-header counts every L4 byte).
    public static func vnetHeader(flags: UInt16, gso: TxGSO?, data: UnsafeMutableRawBufferPointer,
                                  totalLength: Int? = nil) throws(ChecksumSetupError) -> VnetHeader {
        var h = VnetHeader()
        let csumBlank = flags & UInt16(NETTXF_csum_blank) != 0
        if csumBlank || gso != nil {
            let loc = try PacketParser.checksumLocation(UnsafeRawBufferPointer(data))
            if !csumBlank { PacketParser.writePseudoHeaderChecksum(data, loc, totalLength: totalLength) }
            h.flags = CNET_VNET_F_NEEDS_CSUM
            h.csumStart = UInt16(loc.l4Offset)
            h.csumOffset = UInt16(loc.checksumOffset)
            if let g = gso {
                guard loc.l4Protocol == 6 else { throw .unsupportedProtocol(loc.l4Protocol) }
                guard (g.type == UInt8(XEN_NETIF_GSO_TYPE_TCPV6)) == loc.isIPv6 else { throw .badIPHeader }
                h.gsoType = loc.isIPv6 ? CNET_VNET_GSO_TCPV6 : CNET_VNET_GSO_TCPV4
                h.gsoSize = g.size
                h.headerLength = UInt16(loc.headerLength)
            }
        } else if flags & UInt16(NETTXF_data_validated) != 0 {
            h.flags = CNET_VNET_F_DATA_VALID
        }
        return h
    }
}

/// What one transmit pass ended with.
public enum TxPassResult: Equatable, Sendable {
    /// Nothing more to do now; `notify` says whether to kick the frontend.
    case idle(notify: Bool)
    /// The pass took its turn's worth of requests (``TxEngine/turnBudget``)
    /// and more are waiting: come back after the rest of the worker loop.
    case budgetSpent(notify: Bool)
    /// The rate limiter holds the next packet until `until` (CLOCK_MONOTONIC ns).
    case rateLimited(until: UInt64, notify: Bool)
    /// The frontend broke a fatal rule: disable the vif.
    case fatal(TxFatal, notify: Bool)
}

/// The transmit engine of one queue (guest -> tap): takes requests off the tx
/// ring, parses and validates them, copies each packet's first slot (where
/// the headers are) out with one batched grant copy per pass into a private
/// arena, sets up the vnet header on that private copy and writes each packet
/// to the tap with one writev. A single-slot packet is written from the
/// arena; a packet with fragments takes them straight from the guest's pages,
/// pinned for that writev (Linux netback copies the head and maps the frags),
/// so its payload is copied once, by the kernel. Responses follow ring order:
/// the first slot's status, NULL for extra-info slots, each fragment's status.
public struct TxEngine: ~Copyable {
    public static let arenaSize = 4 << 20
    public static let maxBatch = 256
    static let headroom = 16
    /// Fragments a packet may have and still be sent (XEN_NETIF_NR_SLOTS_MIN).
    static let maxFragments = TxParser.legacySlotsMax
    /// Requests one pass takes before it hands the thread back (Linux bounds
    /// each NAPI poll by its budget of 64 packets): a ring's worth, one full
    /// batch, finishing the batch in progress. A frontend that refills its
    /// ring as fast as it is answered then cannot keep the worker from its
    /// stop eventfd, its receive side or a fatal error on another queue.
    static let turnBudget = 256

    var ring: BackRing<NetifTxRing>
    let hypervisor: Hypervisor
    let domid: DomID
    let tapFD: CInt
    let stats: VifStats
    let queueStats: QueueStats
    var limiter: RateLimiter
    /// A first request taken off the ring but held back by the rate limiter
    /// or by a full arena.
    var held: netif_tx_request?
    /// Reported drops, for the worker to log (bounded: only the latest few).
    public var lastDrop: TxDrop?

    let arena: UnsafeMutableRawPointer
    var packets: [TxPacket]
    /// Where each packet of the batch went in the arena, its ops, and whether
    /// its fragments are read in place (only its first slot is in the arena).
    var placement: [(offset: Int, opStart: Int, opEnd: Int, inPlace: Bool)]
    var ops: [GrantCopy]
    /// A packet whose headers run past its first slot is copied whole here.
    let scratch: UnsafeMutableRawPointer
    var scratchOps: [GrantCopy]
    /// One in-place packet's fragments and its writev vector.
    let spans: UnsafeMutablePointer<GrantSpan>
    let iov: UnsafeMutablePointer<iovec>

    init(ring: BackRing<NetifTxRing>, hypervisor: Hypervisor, domid: DomID, tapFD: CInt, stats: VifStats, queueStats: QueueStats, rate: RateLimit?) {
        self.ring = ring
        self.hypervisor = hypervisor
        self.domid = domid
        self.tapFD = tapFD
        self.stats = stats
        self.queueStats = queueStats
        self.limiter = RateLimiter(rate)
        arena = UnsafeMutableRawPointer.allocate(byteCount: Self.arenaSize, alignment: 4096)
        packets = (0..<Self.maxBatch).map { _ in TxPacket() }
        placement = []
        placement.reserveCapacity(Self.maxBatch)
        ops = []
        ops.reserveCapacity(Self.maxBatch * 4)
        scratch = UnsafeMutableRawPointer.allocate(byteCount: Self.headroom + 65536, alignment: 64)
        scratchOps = []
        scratchOps.reserveCapacity(Self.maxFragments + 1)
        spans = .allocate(capacity: Self.maxFragments)
        iov = .allocate(capacity: Self.maxFragments + 1)
    }

    deinit {
        arena.deallocate()
        scratch.deallocate()
        spans.deallocate()
        iov.deallocate()
    }

    /// Serves the ring until it is empty, rate limited, fatally misused or
    /// its turn is spent. `kick` notifies the frontend of responses pushed in the middle of a
    /// pass (each batch's, before its tap writes); the result's `notify` is
    /// for those pushed at its end.
    /// At most ``turnBudget`` requests a pass (the batch in progress is
    /// finished): then `.budgetSpent` if more wait.
    mutating func run(kick: () -> Void) -> TxPassResult {
        var notify = false
        let start = ring.reqCons
        while true {
            let (count, outcome) = collect()
            flush(count, kick: kick)
            if ring.rspProdPvt != ring.shared.rspProd { notify = ring.pushResponsesAndCheckNotify() || notify }
            let spent = ring.reqCons &- start >= UInt32(Self.turnBudget)
            switch outcome {
            case .some(.fatal(let f, _)): return .fatal(f, notify: notify)
            case .some(.rateLimited(let until, _)): return .rateLimited(until: until, notify: notify)
            case .some(.idle), .some(.budgetSpent):  // batch full (or the arena): go round again, within the budget
                if spent { return .budgetSpent(notify: notify) }
            case .none:
                do {
                    if held == nil, try ring.finalCheckForRequests() {
                        if spent { return .budgetSpent(notify: notify) }
                        continue
                    }
                } catch {
                    return .fatal(.bogusRing(error), notify: notify)
                }
                return .idle(notify: notify)
            }
        }
    }

    /// Takes up to a batch of packets; returns how many and why it stopped
    /// (nil: ring empty).
    private mutating func collect() -> (Int, TxPassResult?) {
        var n = 0
        var used = 0
        ops.removeAll(keepingCapacity: true)
        placement.removeAll(keepingCapacity: true)
        while n < Self.maxBatch {
            let first: netif_tx_request
            if let h = held {
                first = h
            } else {
                do {
                    guard let r = try ring.nextRequest() else { return (n, nil) }
                    first = r
                } catch {
                    return (n, .fatal(.bogusRing(error), notify: false))
                }
            }
            held = nil
            let need = (Int(first.size) + Self.headroom + 63) & ~63
            if used + need > Self.arenaSize {
                held = first
                return (n, .idle(notify: false))
            }
            if !limiter.admit(Int(first.size)) {
                held = first
                stats.txRateLimited.wrappingAdd(1, ordering: .relaxed)
                return (n, .rateLimited(until: limiter.nextCredit, notify: false))
            }
            let outstanding: Int
            do { outstanding = Int(try ring.unconsumedRequests()) } catch {
                return (n, .fatal(.bogusRing(error), notify: false))
            }
            // The parser pulls further slots from a local copy of the ring
            // state, so it never overlaps our access to `packets`.
            var r = ring
            var fatal: TxFatal?
            do throws(TxFatal) {
                try TxParser.parse(first: first, outstanding: outstanding, next: { () throws(TxFatal) -> netif_tx_request in
                    let next: netif_tx_request?
                    do throws(RingError) { next = try r.nextRequest() } catch { throw .bogusRing(error) }
                    // `outstanding` was read first, so a missing slot means req_prod went backwards.
                    guard let next else { throw .slotsExceedRequests(slots: 0, outstanding: 0) }
                    return next
                }, into: &packets[n])
            } catch {
                fatal = error
            }
            ring = r
            if let fatal {
                return (n, .fatal(fatal, notify: false))
            }
            let opStart = ops.count
            let offset = used + Self.headroom
            var inPlace = false
            if packets[n].drop == nil && !packets[n].multicastControl {
                // A parsed packet's first slot holds at least an Ethernet header.
                let first = packets[n].first
                ops.append(GrantCopy(source: .grant(domid: domid, ref: first.gref, offset: first.offset),
                                     dest: .local(arena + offset), length: first.size))
                inPlace = packets[n].fragments.contains { $0.size > 0 }  // zero-size: OKAY, grant untouched
                used += inPlace ? (Int(first.size) + Self.headroom + 63) & ~63 : need
            }
            placement.append((offset, opStart, ops.count, inPlace))
            n += 1
        }
        return (n, .idle(notify: false))
    }

    /// Copies the batch's first slots out of the guest, answers every slot
    /// and writes each packet to the tap. A copied packet's answer depends only
    /// on its grant copy and the checksum set-up, both done on our private
    /// copy, so copied packets are answered (and the frontend kicked) before
    /// their tap writes, as Linux answers after its grant copies
    /// (xenvif_tx_check_gop) before the stack sees the packets: the frontend
    /// refills its ring while each write carries the packet through the
    /// bridge. A packet read in place is answered after its write, which is
    /// when its grants are no longer used. Packets reach the tap in ring order.
    /// A failed tap write is the host stack's drop, counted, not the guest's error.
    private mutating func flush(_ n: Int, kick: () -> Void) {
        guard n > 0 else { return }
        if !ops.isEmpty { hypervisor.copyGrants(&ops) }
        let published = ring.shared.rspProd
        var unwritten = 0  // copied packets from here on still wait for their tap write
        for i in 0..<n {
            let (offset, opStart, opEnd, inPlace) = placement[i]
            if packets[i].drop == nil && !packets[i].multicastControl {
                for k in opStart..<opEnd where ops[k].status != .okay {
                    packets[i].drop = .grantCopy(ops[k].status)
                    break
                }
            }
            if packets[i].drop == nil && !packets[i].multicastControl {
                let head = inPlace ? Int(packets[i].first.size) : packets[i].totalSize
                let data = UnsafeMutableRawBufferPointer(start: arena + offset, count: head)
                do {
                    let h = try TxParser.vnetHeader(flags: packets[i].first.flags, gso: packets[i].gso, data: data,
                                                    totalLength: packets[i].totalSize)
                    h.store(to: arena + offset - VnetHeader.size)
                    if inPlace {
                        writeCopied(unwritten..<i)
                        unwritten = i + 1
                        writeInPlace(i, head: arena + offset)
                    }
                } catch {
                    if inPlace, case .truncated = error {
                        // The headers run past the first slot: the whole packet is
                        // copied. Any other refusal stands: it was read from
                        // headers the first slot holds whole.
                        writeCopied(unwritten..<i)
                        unwritten = i + 1
                        writeWhole(i, head: arena + offset)
                    } else {
                        packets[i].drop = .checksumSetup(error)
                    }
                }
            }
            respond(i)
            // A packet written from its grants gives its slots back at once, so a
            // frontend that is awake refills while we write the next; whether to
            // wake one that sleeps is decided once, below.
            if unwritten == i + 1 { ring.pushResponses() }
        }
        if ring.pushResponsesAndCheckNotify(since: published) { kick() }
        writeCopied(unwritten..<n)
    }

    /// Writes the good copied packets of `range` from the arena.
    private mutating func writeCopied(_ range: Range<Int>) {
        for i in range where packets[i].drop == nil && !packets[i].multicastControl && !placement[i].inPlace {
            let offset = placement[i].offset, len = packets[i].totalSize
            var one = iovec(iov_base: arena + offset - VnetHeader.size, iov_len: len + VnetHeader.size)
            counted(cnet_writev(tapFD, &one, 1), length: len)
        }
    }

    /// Writes packet `i`: vnet header and first slot from the arena at `head`,
    /// the fragments from the guest's pages, pinned for the writev. A grant
    /// the guest no longer lets us read drops the packet as a failed copy would.
    private mutating func writeInPlace(_ i: Int, head: UnsafeMutableRawPointer) {
        var k = 0
        for f in packets[i].fragments where f.size > 0 {
            spans[k] = GrantSpan(ref: f.gref, offset: f.offset, length: f.size)
            k += 1
        }
        iov[0] = iovec(iov_base: head - VnetHeader.size, iov_len: Int(packets[i].first.size) + VnetHeader.size)
        let fd = tapFD, vector = iov, count = Int32(k + 1)
        switch hypervisor.withGrantsInPlace(domid: domid, UnsafeBufferPointer(start: spans, count: k), iov: iov + 1, {
            cnet_writev(fd, vector, count)
        }) {
        case .success(let w):
            counted(w, length: packets[i].totalSize)
            if w >= 0 { stats.txInPlace.wrappingAdd(1, ordering: .relaxed) }
        case .failure(let status): packets[i].drop = .grantCopy(status)
        }
    }

    /// Writes packet `i` copied whole into the scratch buffer (a packet whose
    /// headers are not all in its first slot): the first slot from our copy
    /// in the arena at `head` (the guest's page is not read twice), the
    /// fragments by grant copy.
    private mutating func writeWhole(_ i: Int, head: UnsafeMutableRawPointer) {
        let base = scratch + Self.headroom
        scratchOps.removeAll(keepingCapacity: true)
        base.copyMemory(from: head, byteCount: Int(packets[i].first.size))
        var at = Int(packets[i].first.size)
        for f in packets[i].fragments where f.size > 0 {
            scratchOps.append(GrantCopy(source: .grant(domid: domid, ref: f.gref, offset: f.offset),
                                        dest: .local(base + at), length: f.size))
            at += Int(f.size)
        }
        hypervisor.copyGrants(&scratchOps)
        if let bad = scratchOps.first(where: { $0.status != .okay }) {
            packets[i].drop = .grantCopy(bad.status)
            return
        }
        let len = packets[i].totalSize
        do {
            let h = try TxParser.vnetHeader(flags: packets[i].first.flags, gso: packets[i].gso,
                                            data: UnsafeMutableRawBufferPointer(start: base, count: len))
            h.store(to: base - VnetHeader.size)
        } catch {
            packets[i].drop = .checksumSetup(error)
            return
        }
        var one = iovec(iov_base: base - VnetHeader.size, iov_len: len + VnetHeader.size)
        counted(cnet_writev(tapFD, &one, 1), length: len)
    }

    @inline(__always)
    private mutating func counted(_ written: Int, length: Int) {
        if written < 0 {
            let d = TxDrop.tapWrite(errno: Int32(-written))
            stats.count(d.counter)
            lastDrop = d
        } else {
            queueStats.txPackets.wrappingAdd(1, ordering: .relaxed)
            stats.txBytes.wrappingAdd(UInt64(length), ordering: .relaxed)
        }
    }

    private mutating func respond(_ i: Int) {
        let status: Int16
        if let d = packets[i].drop {
            stats.count(d.counter)
            lastDrop = d
            status = Int16(NETIF_RSP_ERROR)
        } else {
            status = Int16(NETIF_RSP_OKAY)
        }
        ring.enqueue(netif_tx_response(id: packets[i].first.id, status: status))
        for _ in 0..<packets[i].extraCount { ring.enqueue(netif_tx_response(id: 0, status: Int16(NETIF_RSP_NULL))) }
        for k in packets[i].fragments.indices { ring.enqueue(netif_tx_response(id: packets[i].fragments[k].id, status: status)) }
    }
}
