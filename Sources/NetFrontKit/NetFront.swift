import CXen
import Glibc
import NetBack
import XenHV
import XenRing

/// A simulated netfront: the guest side of the netif rings, driven from a
/// test or benchmark process that holds the guest's hypervisor connection.
/// It grants its ring pages and buffers to dom0, builds tx requests
/// (multi-slot, extra info, or any malformed sequence), posts rx buffers and
/// reads responses — what Linux's xen-netfront does, without a network stack.
///
/// Guest page layout per queue q (base = firstPage + q * pagesPerQueue):
/// tx ring, rx ring, 256 tx buffer pages, 256 rx buffer pages; grant refs
/// follow the same numbering from `firstRef`.
public final class NetFront: @unchecked Sendable {
    public static let pagesPerQueue = 2 + 256 + 256
    public let guest: Hypervisor
    public let queues: [FrontQueue]

    /// Sets up `queueCount` queues; `split` gives each its own tx and rx event channel.
    public init(guest: Hypervisor, queues queueCount: Int = 1, split: Bool = false,
                firstPage: Int = 0, firstRef: GrantRef = 16) throws {
        self.guest = guest
        let needRefs = Int(firstRef) + queueCount * Self.pagesPerQueue
        let (frames, _) = try guest.queryGrantTableSize()
        let needFrames = UInt32((needRefs + 511) / 512)
        if needFrames > frames { try guest.setupGrantTable(frames: needFrames) }
        queues = try (0..<queueCount).map { q in
            try FrontQueue(guest: guest, index: q, firstPage: firstPage + q * Self.pagesPerQueue,
                           firstRef: firstRef + GrantRef(q * Self.pagesPerQueue), split: split)
        }
    }

    /// Guest pages this layout needs (plus the builder's reserved pages).
    public static func pagesNeeded(queues: Int) -> UInt32 { UInt32(queues * pagesPerQueue + 16) }

    /// What the frontend would write to xenstore, as the backend's connect call takes it.
    public func connection(features: FrontendFeatures = .all) -> VifConnection {
        VifConnection(queues: queues.map(\.rings), features: features)
    }
}

/// One transmit slot as the test wants it on the ring: a request, or an
/// extra-info slot.
public enum TxSlot: Sendable {
    case request(netif_tx_request)
    case extra(netif_extra_info)
}

/// A frame the backend delivered into our rx buffers.
public struct ReceivedFrame: Sendable {
    public var bytes: [UInt8]
    /// NETRXF_* flags of the first slot.
    public var flags: UInt16
    public var gso: TxGSO?
    public var slots: Int
}

public struct FrontError: Error, CustomStringConvertible {
    public let message: String
    public init(_ m: String) { message = m }
    public var description: String { message }
}

public final class FrontQueue: @unchecked Sendable {
    public let index: Int
    let guest: Hypervisor
    let memory: GuestRegion
    public var tx: FrontRing<NetifTxRing>
    public var rx: FrontRing<NetifRxRing>
    public let txChannel: EventChannel
    public let rxChannel: EventChannel?
    public let rings: VifQueueRings
    let firstPage: Int
    let firstRef: GrantRef
    var freeTx: [UInt16] = Array((0..<256).reversed())
    /// Which tx buffer ids are out on the ring (a response frees each once).
    var txOut = [Bool](repeating: false, count: 256)

    init(guest: Hypervisor, index: Int, firstPage: Int, firstRef: GrantRef, split: Bool) throws {
        self.index = index
        self.guest = guest
        guard let mem = guest.memory, let gt = guest.grantTable else { throw FrontError("not a guest connection") }
        memory = mem.region
        self.firstPage = firstPage
        self.firstRef = firstRef
        for i in 0..<NetFront.pagesPerQueue {
            gt.grantAccess(firstRef + GrantRef(i), to: 0, frame: UInt32(firstPage + i), readOnly: false)
        }
        tx = FrontRing(initializing: try memory.ring(NetifTxRing.self, pages: 1, offset: firstPage * 4096))
        rx = FrontRing(initializing: try memory.ring(NetifRxRing.self, pages: 1, offset: (firstPage + 1) * 4096))
        let p1 = try guest.allocUnbound(remote: 0)
        txChannel = try guest.channel(p1)
        if split {
            let p2 = try guest.allocUnbound(remote: 0)
            rxChannel = try guest.channel(p2)
            rings = VifQueueRings(txRingRef: firstRef, rxRingRef: firstRef + 1, events: .split(tx: p1, rx: p2))
        } else {
            rxChannel = nil
            rings = VifQueueRings(txRingRef: firstRef, rxRingRef: firstRef + 1, events: .shared(p1))
        }
    }

    // MARK: Buffers

    public func txPage(_ id: UInt16) -> Int { firstPage + 2 + Int(id) }
    public func txRef(_ id: UInt16) -> GrantRef { firstRef + 2 + GrantRef(id) }
    public func rxPage(_ id: UInt16) -> Int { firstPage + 2 + 256 + Int(id) }
    public func rxRef(_ id: UInt16) -> GrantRef { firstRef + 2 + 256 + GrantRef(id) }

    /// Writes bytes into tx buffer `id` at `offset`.
    public func writeTxBuffer(_ id: UInt16, offset: Int, _ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try memory.write($0, at: txPage(id) * 4096 + offset) }
    }

    public func takeTxID() -> UInt16? {
        guard let id = freeTx.popLast() else { return nil }
        txOut[Int(id)] = true
        return id
    }

    /// A response frees its buffer (NULL responses and unknown or repeated ids do not).
    @inline(__always) func release(_ r: netif_tx_response) {
        guard r.status != Int16(NETIF_RSP_NULL), r.id < 256, txOut[Int(r.id)] else { return }
        txOut[Int(r.id)] = false
        freeTx.append(r.id)
    }
    public var freeTxIDs: Int { freeTx.count }

    /// The raw 12 bytes of tx ring slot `index` (request/response union), to
    /// check what the backend left in it.
    public func txSlotBytes(_ index: UInt32) throws -> [UInt8] {
        try memory.bytes(at: firstPage * 4096 + RingLayout.headerSize + Int(index & (tx.size - 1)) * MemoryLayout<netif_tx_request>.size, count: 12)
    }

    // MARK: Transmit

    /// Queues a frame split into slots of at most `fragmentSize` bytes (the
    /// first slot's size is the whole length), with flags on the first slot
    /// and an optional GSO extra. Returns false if the ring or buffers are short.
    @discardableResult
    public func send(_ frame: [UInt8], flags: UInt16 = 0, gso: TxGSO? = nil, fragmentSize: Int = 4096,
                     offset: Int = 0) throws -> Bool {
        let chunk = max(1, min(fragmentSize, 4096 - offset))
        var pieces: [ArraySlice<UInt8>] = []
        var at = 0
        repeat {
            let n = min(chunk, frame.count - at)
            pieces.append(frame[at..<at + n])
            at += n
        } while at < frame.count
        let slots = pieces.count + (gso == nil ? 0 : 1)
        guard tx.freeRequests >= UInt32(slots), freeTx.count >= pieces.count else { return false }
        for (i, piece) in pieces.enumerated() {
            let id = takeTxID()!
            try writeTxBuffer(id, offset: offset, Array(piece))
            tx.enqueueTxSlot(i, of: pieces.count, totalBytes: frame.count, slotBytes: piece.count, gref: txRef(id), id: id,
                             offset: UInt16(offset), flags: flags, gso: gso)
        }
        return true
    }

    /// Queues `header` followed by `payload` as one packet, written straight
    /// into tx buffer pages (one slot per page), with `flags` and an optional
    /// GSO extra: the zero-allocation path a benchmark sender uses.
    public func sendGather(header: [UInt8], payload: UnsafeRawBufferPointer, flags: UInt16 = 0, gso: TxGSO? = nil) throws -> Bool {
        let total = header.count + payload.count
        let pieces = (total + 4095) / 4096
        guard tx.freeRequests >= UInt32(pieces + (gso == nil ? 0 : 1)), freeTx.count >= pieces else { return false }
        for i in 0..<pieces {
            let id = takeTxID()!
            let n = min(4096, total - i * 4096)
            try memory.withUnsafeMutableBytes(offset: txPage(id) * 4096, count: n) { dst in
                var d = 0
                var pos = i * 4096
                if pos < header.count {
                    let h = min(header.count - pos, n)
                    header.withUnsafeBytes { dst.baseAddress!.copyMemory(from: $0.baseAddress! + pos, byteCount: h) }
                    d += h
                    pos += h
                }
                if d < n {
                    (dst.baseAddress! + d).copyMemory(from: payload.baseAddress! + (pos - header.count), byteCount: n - d)
                }
            }
            tx.enqueueTxSlot(i, of: pieces, totalBytes: total, slotBytes: n, gref: txRef(id), id: id, flags: flags, gso: gso)
        }
        return true
    }

    /// Queues raw slots exactly as given (for malformed sequences).
    public func sendRaw(_ slots: [TxSlot]) {
        for s in slots {
            switch s {
            case .request(let r): precondition(tx.enqueue(r), "tx ring full")
            case .extra(let x): precondition(tx.enqueueExtra(x), "tx ring full")
            }
        }
    }

    /// Publishes queued tx requests and kicks the backend if it asked.
    public func pushTx() throws {
        if tx.pushRequestsAndCheckNotify() { try txChannel.notify() }
    }

    /// Publishes and kicks unconditionally (a hostile or careless guest).
    public func pushTxAndKick() throws {
        tx.pushRequests()
        try txChannel.notify()
    }

    /// Waits for `count` tx responses (NULL ones included), up to `timeout` ms.
    /// Buffers of answered requests are freed.
    public func txResponses(_ count: Int, timeout: Int32 = 5000) throws -> [netif_tx_response] {
        var out: [netif_tx_response] = []
        let deadline = RateLimiter.now() + UInt64(timeout) * 1_000_000
        while out.count < count {
            while out.count < count, let r = try tx.nextResponse() {
                out.append(r)
                release(r)
            }
            if out.count >= count { break }
            if try tx.finalCheckForResponses() { continue }
            let now = RateLimiter.now()
            guard now < deadline else { break }
            _ = txChannel.wait(milliseconds: Int32((deadline - now) / 1_000_000) + 1)
        }
        return out
    }

    /// Drains whatever tx responses are there now, freeing their buffers.
    public func reapTx() throws -> Int {
        var n = 0
        while let r = try tx.nextResponse() {
            n += 1
            release(r)
        }
        return n
    }

    // MARK: Receive

    /// Posts up to `n` rx buffers and kicks the backend if it asked. As in
    /// Linux netfront, a request's id is its ring slot, which also names its
    /// buffer page, so every response is matched by position.
    @discardableResult
    public func postRx(_ n: Int = 256) throws -> Int {
        var posted = 0
        while posted < n, !rx.isFull {
            let id = UInt16(rx.reqProdPvt & 255)
            var r = netif_rx_request()
            r.id = id
            r.gref = rxRef(id)
            rx.enqueue(r)
            posted += 1
        }
        if rx.pushRequestsAndCheckNotify() { try (rxChannel ?? txChannel).notify() }
        return posted
    }

    /// Publishes queued rx requests and kicks unconditionally (a hostile or careless guest).
    public func pushRxAndKick() throws {
        rx.pushRequests()
        try (rxChannel ?? txChannel).notify()
    }

    /// Writes bytes into rx buffer `id`'s page.
    public func writeRxBuffer(_ id: UInt16, _ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try memory.write($0, at: rxPage(id) * 4096) }
    }

    /// The whole page of rx buffer `id`.
    public func rxBuffer(_ id: UInt16) throws -> [UInt8] { try memory.bytes(at: rxPage(id) * 4096, count: 4096) }

    /// Waits up to `timeout` ms for one whole frame; its buffers are reposted
    /// when `repost` is set.
    public func receive(timeout: Int32 = 5000, repost: Bool = true) throws -> ReceivedFrame? {
        let deadline = RateLimiter.now() + UInt64(timeout) * 1_000_000
        var frame = ReceivedFrame(bytes: [], flags: 0, gso: nil, slots: 0)
        var expectExtra = false
        var done = false
        while !done {
            let idx = rx.rspCons
            if let r = try rx.nextResponse() {
                frame.slots += 1
                if expectExtra {
                    let x = unsafeBitCast(r, to: netif_extra_info.self)
                    if x.type == UInt8(XEN_NETIF_EXTRA_TYPE_GSO) { frame.gso = TxGSO(type: x.u.gso.type, size: x.u.gso.size) }
                    expectExtra = x.flags & UInt8(XEN_NETIF_EXTRA_FLAG_MORE) != 0
                    if !expectExtra && frame.flags & UInt16(NETRXF_more_data) == 0 { done = true }
                    continue
                }
                let id = UInt16(idx & 255)
                guard r.id == id else { throw FrontError("rx response id \(r.id) in slot \(id)") }
                guard r.status > 0 else { throw FrontError("rx response status \(r.status)") }
                if frame.slots == 1 { frame.flags = r.flags } else {
                    frame.flags = (frame.flags & ~UInt16(NETRXF_more_data)) | (r.flags & UInt16(NETRXF_more_data))
                }
                frame.bytes += try memory.bytes(at: rxPage(id) * 4096 + Int(r.offset), count: Int(r.status))
                if r.flags & UInt16(NETRXF_extra_info) != 0 { expectExtra = true; continue }
                if r.flags & UInt16(NETRXF_more_data) == 0 { done = true }
                continue
            }
            if try rx.finalCheckForResponses() { continue }
            let now = RateLimiter.now()
            guard now < deadline else {
                if frame.slots == 0 { return nil }
                throw FrontError("partial frame after \(frame.slots) slots")
            }
            _ = (rxChannel ?? txChannel).wait(milliseconds: Int32((deadline - now) / 1_000_000) + 1)
        }
        if repost { try postRx(frame.slots) }
        return frame
    }
}
