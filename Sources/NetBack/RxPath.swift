import CNetShim
import CXen
import Glibc
import XenHV
import XenRing

/// The receive engine of one queue (tap -> guest): reads frames with their
/// vnet header from the tap into a bounded backlog (XSA-392: a guest that
/// posts no buffers cannot make us queue without limit; bounded in frames
/// and, as Linux's XENVIF_RX_QUEUE_BYTES, in bytes), takes the buffers
/// the frontend posted on the rx ring (each request copied once), and copies
/// each frame into them with one batched grant copy per pass: several slots
/// for a large frame, the GSO extra after the first slot, checksum flags on
/// the first response.
///
/// While frames are large (GSO bulk) and the backlog is empty, a frame is
/// instead read straight into the posted buffers (``readInPlace()``), pinned
/// writable for that one readv: the tap's copy is then the only one.
struct RxEngine: ~Copyable {
    /// The most one read from the tap can return: a vnet header and a 64 KiB frame.
    static let slotSize = 65536 + 128
    static let pageSize = 4096
    /// Bytes the backlog may hold (Linux: XENVIF_RX_QUEUE_BYTES, half an rx
    /// ring of pages); its buffer has room for one more largest read, so the
    /// memory a queue touches is bounded whatever the frame sizes.
    static let backlogBytes = 256 * pageSize / 2

    var ring: BackRing<NetifRxRing>
    let hypervisor: Hypervisor
    let domid: DomID
    let tapFD: CInt
    let stats: VifStats
    let queueStats: QueueStats
    let sg: Bool
    let gsoTCPv4: Bool
    let gsoTCPv6: Bool
    /// feature-ipv6-csum-offload: the frontend takes IPv6 frames with a
    /// partial checksum (NETRXF_csum_blank). Without it we finish their
    /// checksum ourselves: tun has no IPv6-only checksum offload bit.
    let ipv6Checksum: Bool

    // Backlog of frames read from the tap: a ring of at most `capacity`
    // frames stored back to back in `buffer` (each at a 64-byte aligned
    // offset); a frame is read in place only where a largest read fits.
    let capacity: Int
    let bufferSize: Int
    let buffer: UnsafeMutableRawPointer
    var offsets: [Int]
    var lengths: [Int]
    var head = 0
    var count = 0
    /// Where the next frame goes in `buffer`.
    var tail = 0

    // Buffers the frontend posted, copied off the ring.
    var posted: [netif_rx_request]
    var postedHead = 0
    var postedCount = 0

    var ops: [GrantCopy] = []
    /// Planned responses in ring order: (request id, copy op index or -1 for the GSO extra, flags, length, gso).
    var plan: [(id: UInt16, op: Int, flags: UInt16, length: Int, gso: TxGSO?)] = []

    /// Whether the last frame read was larger than ``inPlaceAbove``: the next
    /// one is then read in place if it can be.
    var largeFrames = false
    /// Frames above this many bytes make in-place reads worth their pins.
    static let inPlaceAbove = pageSize
    /// Posted buffers an in-place read pins: a largest read's data pages and
    /// the one a GSO extra takes after the first.
    static let inPlaceBuffers = 1 + (slotSize - VnetHeader.size + pageSize - 1) / pageSize
    static let inPlaceBudget = 16
    let spans: UnsafeMutablePointer<GrantSpan>
    let pinned: UnsafeMutablePointer<iovec>
    let vector: UnsafeMutablePointer<iovec>
    let header: UnsafeMutableRawPointer

    /// The tap's netdev was deleted under us (tun answers reads with EBADFD,
    /// polls with POLLERR): nothing more is read from it.
    var tapGone = false

    /// When the backlog started waiting for buffers (CLOCK_MONOTONIC ns), 0 when not waiting.
    var waitingSince: UInt64 = 0
    var carrierOff = false

    init(ring: BackRing<NetifRxRing>, hypervisor: Hypervisor, domid: DomID, tapFD: CInt, stats: VifStats, queueStats: QueueStats,
         sg: Bool, gsoTCPv4: Bool, gsoTCPv6: Bool, ipv6Checksum: Bool, queueLimit: Int) {
        self.ring = ring
        self.hypervisor = hypervisor
        self.domid = domid
        self.tapFD = tapFD
        self.stats = stats
        self.queueStats = queueStats
        self.sg = sg
        self.gsoTCPv4 = gsoTCPv4
        self.gsoTCPv6 = gsoTCPv6
        self.ipv6Checksum = ipv6Checksum
        capacity = max(1, queueLimit)
        bufferSize = Self.backlogBytes + Self.slotSize
        buffer = UnsafeMutableRawPointer.allocate(byteCount: bufferSize, alignment: 4096)
        offsets = Array(repeating: 0, count: capacity)
        lengths = Array(repeating: 0, count: capacity)
        posted = Array(repeating: netif_rx_request(), count: Int(ring.size))
        ops.reserveCapacity(Int(ring.size))
        plan.reserveCapacity(Int(ring.size))
        spans = .allocate(capacity: Self.inPlaceBuffers)
        pinned = .allocate(capacity: Self.inPlaceBuffers)
        vector = .allocate(capacity: Self.inPlaceBuffers)
        header = .allocate(byteCount: VnetHeader.size, alignment: 8)
    }

    deinit {
        buffer.deallocate()
        spans.deallocate()
        pinned.deallocate()
        vector.deallocate()
        header.deallocate()
    }

    var backlogFull: Bool { nextOffset() == nil }
    var backlogEmpty: Bool { count == 0 }

    @inline(__always) func slot(_ i: Int) -> UnsafeMutableRawPointer { buffer + offsets[i] }

    /// Where a largest read fits next, or nil when the backlog is full (in
    /// frames, or in bytes: the waiting frames from `head` on, up to `tail`).
    @inline(__always) func nextOffset() -> Int? {
        guard count < capacity else { return nil }
        guard count > 0 else { return 0 }
        let start = offsets[head]
        if tail > start {
            // Not wrapped: after the last frame, else at the start before the first.
            if tail + Self.slotSize <= bufferSize { return tail }
            return Self.slotSize <= start ? 0 : nil
        }
        // Wrapped: between the last frame and the first.
        return tail + Self.slotSize <= start ? tail : nil
    }

    /// Reads frames until the tap is empty or the backlog is full. Frames read
    /// while the carrier is off (a stalled guest) are dropped.
    mutating func readTap() {
        while !tapGone, let at = nextOffset() {
            let n = read(tapFD, buffer + at, Self.slotSize)
            if n < 0 {
                if errno == EINTR { continue }
                if errno == EBADFD { tapGone = true }
                return  // EAGAIN: empty
            }
            guard n >= VnetHeader.size + 14 else {
                stats.count(.rxShortRead)
                continue
            }
            if carrierOff {
                stats.count(.rxCarrierOff)
                continue
            }
            largeFrames = n - VnetHeader.size > Self.inPlaceAbove
            let i = (head + count) % capacity
            offsets[i] = at
            lengths[i] = n
            tail = at + ((n + 63) & ~63)
            count += 1
        }
    }

    /// Copies every posted request off the ring (once each).
    mutating func takePosted() throws(RingError) {
        while postedCount < posted.count, let r = try ring.nextRequest() {
            posted[(postedHead + postedCount) % posted.count] = r
            postedCount += 1
        }
    }

    @inline(__always) mutating func popPosted() -> netif_rx_request {
        let r = posted[postedHead]
        postedHead = (postedHead + 1) % posted.count
        postedCount -= 1
        return r
    }

    private mutating func popBacklog() {
        head = (head + 1) % capacity
        count -= 1
        if count == 0 { tail = 0 }  // an empty backlog starts over at the front (warm pages)
    }

    /// Delivers as much of the backlog as the posted buffers allow. Returns
    /// whether the frontend must be notified.
    mutating func deliver() throws(RingError) -> Bool {
        try takePosted()
        ops.removeAll(keepingCapacity: true)
        plan.removeAll(keepingCapacity: true)
        while count > 0 {
            let p = slot(head)
            let len = lengths[head] - VnetHeader.size
            var h = VnetHeader.load(from: p)
            let data = p + VnetHeader.size
            h = finishingIPv6Checksum(h, length: len, firstPage: data) { data + $0 * Self.pageSize }
            guard let frame = layout(h, length: len) else {
                popBacklog()
                continue
            }
            guard postedCount >= frame.requests else { break }
            var off = 0
            for s in 0..<frame.dataSlots {
                let req = popPosted()
                let n = min(Self.pageSize, len - off)
                ops.append(GrantCopy(source: .local(p + VnetHeader.size + off),
                                     dest: .grant(domid: domid, ref: req.gref, offset: 0), length: UInt16(n)))
                plan.append((req.id, ops.count - 1, frame.flags(ofSlot: s), n, nil))
                off += n
                if s == 0, let g = frame.gso {
                    // The extra-info slot uses up a posted request; its buffer stays untouched.
                    let extraReq = popPosted()
                    plan.append((extraReq.id, -1, 0, 0, g))
                }
            }
            queueStats.rxPackets.wrappingAdd(1, ordering: .relaxed)
            stats.rxBytes.wrappingAdd(UInt64(len), ordering: .relaxed)
            popBacklog()
        }
        if !ops.isEmpty { hypervisor.copyGrants(&ops) }
        for e in plan {
            if let g = e.gso {
                enqueueExtra(g)
            } else {
                let ok = ops[e.op].status == .okay
                if !ok { stats.count(.rxGrantCopy) }
                ring.enqueue(netif_rx_response(id: e.id, offset: 0, flags: e.flags,
                                               status: ok ? Int16(e.length) : Int16(NETIF_RSP_ERROR)))
            }
        }
        var notify = false
        if !plan.isEmpty { notify = ring.pushResponsesAndCheckNotify() }
        // Ask for a kick when the frontend posts more, if we are waiting for buffers.
        if count > 0 || carrierOff {
            if try ring.finalCheckForRequests() { try takePosted() }
        }
        return notify
    }

    /// How a frame goes on the rx ring: its data slots, the GSO extra after
    /// the first, and each slot's NETRXF_* flags.
    struct FrameLayout {
        let gso: TxGSO?
        let dataSlots: Int
        /// The first slot's checksum flags.
        let checksum: UInt16
        /// Posted requests the frame uses up (the extra takes one).
        var requests: Int { dataSlots + (gso == nil ? 0 : 1) }
        /// Data slot `s`'s flags: checksum and extra_info on the first,
        /// more_data on all but the last.
        @inline(__always) func flags(ofSlot s: Int) -> UInt16 {
            var f: UInt16 = s == 0 ? checksum : 0
            if s + 1 < dataSlots { f |= UInt16(NETRXF_more_data) }
            if s == 0 && gso != nil { f |= UInt16(NETRXF_extra_info) }
            return f
        }
    }

    /// The layout of a frame of `len` bytes with vnet header `h`; nil
    /// (counted) for a frame the frontend cannot take.
    @inline(__always)
    private func layout(_ h: VnetHeader, length len: Int) -> FrameLayout? {
        let gso: TxGSO?
        do { gso = try h.netifGSO(tcpv4: gsoTCPv4, tcpv6: gsoTCPv6) } catch {
            stats.count(.rxUnsupportedGSO)
            return nil
        }
        let dataSlots = (len + Self.pageSize - 1) / Self.pageSize
        if dataSlots > 1 && !sg {
            stats.count(.rxNoSGTooLarge)
            return nil
        }
        var flags: UInt16 = 0
        if h.needsChecksum { flags |= UInt16(NETRXF_csum_blank | NETRXF_data_validated) }
        else if h.dataValid { flags |= UInt16(NETRXF_data_validated) }
        return FrameLayout(gso: gso, dataSlots: dataSlots, checksum: flags)
    }

    /// Whether an Ethernet frame (optionally 802.1Q-tagged) carries IPv6.
    static func isIPv6(_ f: UnsafeRawBufferPointer) -> Bool {
        guard f.count >= 14 else { return false }
        let type = PacketParser.be16(f, 12)
        if type == 0x8100, f.count >= 18 { return PacketParser.be16(f, 16) == 0x86DD }
        return type == 0x86DD
    }

    /// A frame of `length` bytes asking for a checksum (NEEDS_CSUM) that a
    /// frontend without feature-ipv6-csum-offload cannot finish, when it is
    /// IPv6: finished here (`page(k)`: data page k), so the guest gets a
    /// complete one, as Linux's xenvif_fix_features makes the stack do.
    @inline(__always)
    func finishingIPv6Checksum(_ h: VnetHeader, length: Int, firstPage: UnsafeMutableRawPointer,
                               page: (Int) -> UnsafeMutableRawPointer) -> VnetHeader {
        guard h.needsChecksum && !ipv6Checksum,
              Self.isIPv6(UnsafeRawBufferPointer(start: firstPage, count: Swift.min(length, Self.pageSize))) else { return h }
        return Self.completeChecksum(h, length: length, page: page)
    }

    /// Finishes a partial checksum (NEEDS_CSUM: the field at csum_start +
    /// csum_offset holds the pseudo-header sum) in software, as Linux's
    /// skb_checksum_help does for a device without the offload, over a frame
    /// of `len` bytes whose page `k` (4096 bytes each) is at `page(k)`. The
    /// header comes back with DATA_VALID (we summed every byte we deliver),
    /// or with no flag when csum_start/csum_offset point outside the frame
    /// (the guest then checks the frame itself).
    static func completeChecksum(_ h: VnetHeader, length len: Int,
                                 page: (Int) -> UnsafeMutableRawPointer) -> VnetHeader {
        var out = h
        out.flags = 0
        let start = Int(h.csumStart), at = start + Int(h.csumOffset)
        guard start < len, at + 2 <= len else { return out }
        // Ones'-complement sums of page-sized pieces; a piece at an odd
        // distance from csum_start adds byte-swapped (RFC 1071).
        var sum: UInt32 = 0
        var pos = start
        while pos < len {
            let off = pos % pageSize, n = Swift.min(pageSize - off, len - pos)
            let piece = ~PacketParser.internetChecksum(UnsafeRawBufferPointer(start: page(pos / pageSize) + off, count: n))
            sum += UInt32((pos - start) & 1 == 0 ? piece : piece.byteSwapped)
            pos += n
        }
        while sum >> 16 != 0 { sum = (sum & 0xFFFF) + (sum >> 16) }
        var c = ~UInt16(sum)
        if c == 0 { c = 0xFFFF }  // CSUM_MANGLED_0: a UDP zero would mean "no checksum"
        page(at / pageSize).storeBytes(of: UInt8(c >> 8), toByteOffset: at % pageSize, as: UInt8.self)
        page((at + 1) / pageSize).storeBytes(of: UInt8(c & 0xFF), toByteOffset: (at + 1) % pageSize, as: UInt8.self)
        out.flags = CNET_VNET_F_DATA_VALID
        return out
    }

    /// The GSO extra-info response that follows a frame's first slot.
    private mutating func enqueueExtra(_ g: TxGSO) {
        var x = netif_extra_info()
        x.type = UInt8(XEN_NETIF_EXTRA_TYPE_GSO)
        x.flags = 0
        x.u.gso.size = g.size
        x.u.gso.type = g.type
        x.u.gso.pad = 0
        x.u.gso.features = 0
        ring.enqueue(unsafeBitCast(x, to: netif_rx_response.self))
    }

    /// Reads frames straight into the frontend's posted buffers while they
    /// are large, the backlog is empty, enough buffers are posted and the tap
    /// has a frame. The next ``inPlaceBuffers`` posted buffers are pinned
    /// writable for one readv: the first takes the frame's head, the second
    /// is left for a GSO extra, the rest take the data; a frame without GSO
    /// then moves its data down one buffer (rare: a jumbo frame). A frame
    /// the frontend cannot take uses up no buffer (what was read into them
    /// is overwritten later). A buffer we may not write ends in-place reads
    /// until the next large frame: the copy path answers it with an error.
    /// Each frame's responses are pushed at once (`kick` when the frontend
    /// asked to be notified), so the frontend takes a frame while the next is
    /// read; at most ``inPlaceBudget`` frames a call, so the queue's transmit
    /// side gets its turn under a flood. Returns true when the budget ran
    /// out (the tap may hold more: come back after the transmit side).
    mutating func readInPlace(kick: () -> Void) throws(RingError) -> Bool {
        guard largeFrames, count == 0, !carrierOff, !tapGone else { return false }
        try takePosted()
        var budget = Self.inPlaceBudget
        while largeFrames && postedCount >= Self.inPlaceBuffers && budget > 0 {
            budget -= 1
            // No poll first: the readv's EAGAIN says the tap is empty, one
            // system call a frame; an empty tap costs one round of pins.
            for k in 0..<Self.inPlaceBuffers {
                spans[k] = GrantSpan(ref: posted[(postedHead + k) % posted.count].gref, offset: 0, length: UInt16(Self.pageSize))
            }
            let fd = tapFD, header = header, pinned = pinned, vector = vector
            var h = VnetHeader()
            var readError: Int32 = 0
            let result = hypervisor.withGrantsInPlace(domid: domid, UnsafeBufferPointer(start: spans, count: Self.inPlaceBuffers),
                                                      writable: true, iov: pinned) { () -> Int in
                vector[0] = iovec(iov_base: header, iov_len: VnetHeader.size)
                vector[1] = pinned[0]
                for k in 2..<Self.inPlaceBuffers { vector[k] = pinned[k] }
                var n: Int
                repeat { n = readv(fd, vector, Int32(Self.inPlaceBuffers)) } while n < 0 && errno == EINTR
                if n < 0 { readError = errno }
                guard n >= VnetHeader.size else { return n }
                h = VnetHeader.load(from: header)
                let plain = h.gsoKind == CNET_VNET_GSO_NONE
                if n > VnetHeader.size + Self.pageSize && plain {
                    // No extra slot: the data after the first page moves down into the second buffer on.
                    var left = n - VnetHeader.size - Self.pageSize, k = 1
                    while left > 0 {
                        memmove(pinned[k].iov_base, pinned[k + 1].iov_base, Swift.min(Self.pageSize, left))
                        left -= Self.pageSize
                        k += 1
                    }
                }
                let len = n - VnetHeader.size
                // Data page k sits in buffer k, or k + 1 behind a GSO extra's.
                h = finishingIPv6Checksum(h, length: len, firstPage: pinned[0].iov_base!) { k in pinned[k == 0 || plain ? k : k + 1].iov_base! }
                return n
            }
            guard case .success(let n) = result else {
                largeFrames = false
                break
            }
            if n < 0 {  // EAGAIN: the frame went to another reader
                if readError == EBADFD { tapGone = true }
                break
            }
            guard n >= VnetHeader.size + 14 else {
                stats.count(.rxShortRead)
                continue
            }
            let len = n - VnetHeader.size
            largeFrames = len > Self.inPlaceAbove
            guard let frame = layout(h, length: len) else { continue }
            var off = 0
            for s in 0..<frame.dataSlots {
                let req = popPosted()
                let n = Swift.min(Self.pageSize, len - off)
                ring.enqueue(netif_rx_response(id: req.id, offset: 0, flags: frame.flags(ofSlot: s), status: Int16(n)))
                off += n
                if s == 0, let g = frame.gso {
                    _ = popPosted()
                    enqueueExtra(g)
                }
            }
            queueStats.rxPackets.wrappingAdd(1, ordering: .relaxed)
            stats.rxBytes.wrappingAdd(UInt64(len), ordering: .relaxed)
            stats.rxInPlace.wrappingAdd(1, ordering: .relaxed)
            if ring.pushResponsesAndCheckNotify() { kick() }
        }
        return budget == 0
    }

    /// Drops the whole backlog (stalled guest).
    mutating func flushBacklog() {
        stats.count(.rxStalledFlush, UInt64(count))
        head = 0
        count = 0
        tail = 0
    }
}
