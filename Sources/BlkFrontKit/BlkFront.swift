import BlkBack
import CXen
import Glibc
import XenHV
import XenRing

/// A small blkfront for tests and benchmarks: the guest side of the blkif
/// rings, driven from a guest connection to xenhv (``Hypervisor/guest(descriptor:)``).
///
/// It allocates guest frames with a bump allocator, grants them to the
/// backend, sets up one ring per queue (`1 << ringPageOrder` pages, granted
/// `ring-ref0..N`) and an unbound event channel per queue, and builds direct
/// and indirect requests over granted buffers. ``config(persistent:limit:)``
/// is what a XenBus handshake would hand the backend.
public final class BlkFront<R: BlkifRingABI>: @unchecked Sendable
where R.Request: BitwiseCopyable, R.Response: BitwiseCopyable {
    // Not for concurrent use from several threads on the same queue.
    public let guest: Hypervisor
    public let backend: DomID
    /// The guest's whole pseudo-physical memory.
    public let memory: GuestRegion
    private let grants: GrantTableWriter
    private var nextFrame: UInt32
    private let frameLimit: UInt32
    private var nextRef: GrantRef = 8  // Linux keeps the first refs for itself
    private var nextID: UInt64 = 1

    public struct Queue {
        public var ring: FrontRing<R>
        public let channel: EventChannel
        public let port: EventPort
        public let ringRefs: [GrantRef]
        public let ringFrame: UInt32
    }
    public private(set) var queues: [Queue] = []

    /// A granted buffer of whole pages, plus indirect pages when it needs more than 11 segments.
    public struct Buffer: Sendable {
        public let firstFrame: UInt32
        public let pages: Int
        public let refs: [GrantRef]
        public let indirectFrames: [UInt32]
        public let indirectRefs: [GrantRef]
    }

    public init(guest: Hypervisor, backend: DomID = 0, queues n: Int = 1, ringPageOrder: Int = 0,
                grantFrames: UInt32 = 16, firstFrame: UInt32 = 16, firstRef: GrantRef = 8) throws {
        guard let mem = guest.memory, let gt = guest.grantTable else {
            throw BlkBackError.badConfiguration("BlkFront needs a guest connection")
        }
        self.guest = guest
        self.backend = backend
        memory = mem.region
        grants = gt
        nextFrame = firstFrame
        nextRef = firstRef
        frameLimit = UInt32(mem.size / 4096) - 8  // keep clear of the builder's special pages
        if grantFrames > (try guest.queryGrantTableSize().frames) { try guest.setupGrantTable(frames: grantFrames) }
        let pages = 1 << ringPageOrder
        for _ in 0..<n {
            let f = try allocFrames(pages)
            var refs: [GrantRef] = []
            for p in 0..<pages { refs.append(grant(frame: f + UInt32(p), readOnly: false)) }
            let shared = try memory.ring(R.self, pages: pages, offset: Int(f) * 4096)
            let port = try guest.allocUnbound(remote: backend)
            let ch = try guest.channel(port)
            queues.append(Queue(ring: FrontRing(initializing: shared), channel: ch, port: port, ringRefs: refs, ringFrame: f))
        }
    }

    /// What the backend is told at connect (XenBus would carry it).
    public func config(persistent: Bool = true, limit: Int = BlkifLimits.persistentGrantsPerRing) -> FrontendConfig {
        FrontendConfig(domid: guest.domid, abi: R.abi,
                       queues: queues.map { QueueRingConfig(ringRefs: $0.ringRefs, eventChannel: $0.port) },
                       persistentGrants: persistent, persistentGrantLimit: limit)
    }

    // MARK: Memory and grants

    /// `n` consecutive free guest frames (zeroed).
    public func allocFrames(_ n: Int) throws -> UInt32 {
        guard nextFrame + UInt32(n) <= frameLimit else { throw BlkBackError.badConfiguration("guest out of frames") }
        defer { nextFrame += UInt32(n) }
        try memory.fill(0, at: Int(nextFrame) * 4096, count: n * 4096)
        return nextFrame
    }

    /// Grants the backend access to `frame`.
    public func grant(frame: UInt32, readOnly: Bool) -> GrantRef {
        defer { nextRef += 1 }
        grants.grantAccess(nextRef, to: backend, frame: frame, readOnly: readOnly)
        return nextRef
    }

    /// Revokes a grant; false while the backend still has it mapped.
    public func endAccess(_ ref: GrantRef) -> Bool { grants.endAccess(ref) }

    public func page(_ frame: UInt32) -> GuestRegion { try! memory.slice(offset: Int(frame) * 4096, length: 4096) }

    /// A buffer of `pages` granted pages (read-only grants when `readOnly`:
    /// fine for WRITE requests, refused for READ).
    public func makeBuffer(pages: Int, readOnly: Bool = false, indirect: Bool = false) throws -> Buffer {
        let f = try allocFrames(pages)
        let refs = (0..<pages).map { grant(frame: f + UInt32($0), readOnly: readOnly) }
        var ind: [UInt32] = [], indRefs: [GrantRef] = []
        if pages > BlkifLimits.maxDirectSegments || indirect {
            let n = (pages + BlkifLimits.segmentsPerIndirectPage - 1) / BlkifLimits.segmentsPerIndirectPage
            let fi = try allocFrames(n)
            for i in 0..<n {
                ind.append(fi + UInt32(i))
                indRefs.append(grant(frame: fi + UInt32(i), readOnly: true))
            }
        }
        return Buffer(firstFrame: f, pages: pages, refs: refs, indirectFrames: ind, indirectRefs: indRefs)
    }

    public func fill(_ b: Buffer, with data: [UInt8]) throws {
        try data.withUnsafeBytes { try memory.write($0, at: Int(b.firstFrame) * 4096) }
    }

    public func contents(_ b: Buffer, count: Int) throws -> [UInt8] {
        try memory.bytes(at: Int(b.firstFrame) * 4096, count: count)
    }

    // MARK: Requests

    /// A READ or WRITE of `bytes` (a multiple of 512) over `buffer`, direct when
    /// it fits 11 segments, else INDIRECT (segments written to the buffer's indirect pages).
    public func rwRequest(_ op: UInt8, sector: UInt64, buffer b: Buffer, bytes: Int, forceIndirect: Bool = false) throws -> BlkRequest {
        precondition(bytes > 0 && bytes % 512 == 0 && bytes <= b.pages * 4096)
        let nseg = (bytes + 4095) / 4096
        var q = BlkRequest()
        q.id = nextID
        nextID &+= 1
        q.sector = sector
        q.nrSegments = nseg
        func seg(_ i: Int) -> BlkSegment {
            let len = Swift.min(4096, bytes - i * 4096)
            return BlkSegment(gref: b.refs[i], firstSect: 0, lastSect: UInt8(len / 512 - 1))
        }
        if nseg <= BlkifLimits.maxDirectSegments && !forceIndirect {
            q.operation = op
            for i in 0..<nseg { q.setDirectSegment(i, seg(i)) }
        } else {
            guard !b.indirectFrames.isEmpty else { throw BlkBackError.badConfiguration("buffer has no indirect pages") }
            q.operation = BlkifOp.indirect
            q.indirectOp = op
            for i in 0..<nseg {
                let per = BlkifLimits.segmentsPerIndirectPage
                try memory.store(seg(i).raw, at: Int(b.indirectFrames[i / per]) * 4096 + (i % per) * 8)
            }
            for (i, r) in b.indirectRefs.enumerated() { q.setIndirectGref(i, r) }
        }
        return q
    }

    /// A fresh request id.
    public func newID() -> UInt64 { defer { nextID &+= 1 }; return nextID }

    /// Queues one request and pushes it, notifying if the backend asked to be.
    public func push(_ q: BlkRequest, queue: Int = 0) throws {
        try pushRaw(R.encode(q), queue: queue)
    }

    public func pushRaw(_ r: R.Request, queue: Int = 0) throws {
        guard queues[queue].ring.enqueue(r) else { throw BlkBackError.badConfiguration("ring full") }
        if queues[queue].ring.pushRequestsAndCheckNotify() { try queues[queue].channel.notify() }
    }

    /// Queues several requests, then pushes them all with one notification.
    public func pushBatch(_ qs: [BlkRequest], queue: Int = 0) throws {
        for q in qs {
            guard queues[queue].ring.enqueue(R.encode(q)) else { throw BlkBackError.badConfiguration("ring full") }
        }
        if queues[queue].ring.pushRequestsAndCheckNotify() { try queues[queue].channel.notify() }
    }

    // Hot-path pieces for benchmarks: no arrays, no allocation.

    /// Queues one request without publishing it; false when the ring is full.
    @inline(__always)
    @_specialize(exported: false, where R == BlkifRing)
    @_specialize(exported: false, where R == BlkifX86_32Ring)
    public func enqueue(_ q: BlkRequest, queue: Int = 0) -> Bool {
        queues[queue].ring.enqueue(R.encode(q))
    }

    /// Publishes queued requests, notifying if the backend asked to be.
    @inline(__always)
    @_specialize(exported: false, where R == BlkifRing)
    @_specialize(exported: false, where R == BlkifX86_32Ring)
    public func publish(queue: Int = 0) throws {
        if queues[queue].ring.pushRequestsAndCheckNotify() { try queues[queue].channel.notify() }
    }

    /// RING_FINAL_CHECK_FOR_RESPONSES; true when a response is already there.
    @inline(__always)
    @_specialize(exported: false, where R == BlkifRing)
    @_specialize(exported: false, where R == BlkifX86_32Ring)
    public func finalCheck(queue: Int = 0) throws -> Bool { try queues[queue].ring.finalCheckForResponses() }

    /// Whether responses are waiting (no side effects).
    @inline(__always)
    @_specialize(exported: false, where R == BlkifRing)
    @_specialize(exported: false, where R == BlkifX86_32Ring)
    public func hasResponses(queue: Int = 0) throws -> Bool { try queues[queue].ring.unconsumedResponses() > 0 }

    /// Blocks until the queue's event channel fires (or `ms` pass).
    @inline(__always)
    public func waitEvent(queue: Int = 0, ms: Int32) -> Bool { queues[queue].channel.wait(milliseconds: ms) }

    /// The next response, waiting at most `timeoutMs` (a test's safety net, not synchronisation).
    public func waitResponse(queue: Int = 0, timeoutMs: Int32 = 20_000) throws -> (id: UInt64, operation: UInt8, status: Int16) {
        var left = timeoutMs
        while true {
            if let r = try queues[queue].ring.nextResponse() { return R.fields(r) }
            if try queues[queue].ring.finalCheckForResponses() { continue }
            let start = monotonicMs()
            _ = queues[queue].channel.wait(milliseconds: left)
            left -= Int32(truncatingIfNeeded: monotonicMs() - start)
            if left <= 0, try queues[queue].ring.unconsumedResponses() == 0 {
                throw BlkBackError.badConfiguration("no response within \(timeoutMs) ms")
            }
        }
    }

    /// Takes a response if one is there, without waiting.
    @_specialize(exported: false, where R == BlkifRing)
    @_specialize(exported: false, where R == BlkifX86_32Ring)
    public func pollResponse(queue: Int = 0) throws -> (id: UInt64, operation: UInt8, status: Int16)? {
        try queues[queue].ring.nextResponse().map { R.fields($0) }
    }

    /// Pushes `q` and waits for its response.
    public func roundTrip(_ q: BlkRequest, queue: Int = 0) throws -> (id: UInt64, operation: UInt8, status: Int16) {
        try push(q, queue: queue)
        let r = try waitResponse(queue: queue)
        guard r.id == q.id else { throw BlkBackError.badConfiguration("response id \(r.id) for request \(q.id)") }
        return r
    }

    public func write(sector: UInt64, _ data: [UInt8], queue: Int = 0, forceIndirect: Bool = false) throws -> Int16 {
        let b = try makeBuffer(pages: (data.count + 4095) / 4096, indirect: forceIndirect)
        try fill(b, with: data)
        return try roundTrip(rwRequest(BlkifOp.write, sector: sector, buffer: b, bytes: data.count, forceIndirect: forceIndirect), queue: queue).status
    }

    public func read(sector: UInt64, bytes: Int, queue: Int = 0, forceIndirect: Bool = false) throws -> (status: Int16, data: [UInt8]) {
        let b = try makeBuffer(pages: (bytes + 4095) / 4096, indirect: forceIndirect)
        let s = try roundTrip(rwRequest(BlkifOp.read, sector: sector, buffer: b, bytes: bytes, forceIndirect: forceIndirect), queue: queue).status
        return (s, try contents(b, count: bytes))
    }

    public func flush(queue: Int = 0) throws -> Int16 {
        var q = BlkRequest()
        q.operation = BlkifOp.flushDiskCache
        q.id = newID()
        return try roundTrip(q, queue: queue).status
    }

    public func discard(sector: UInt64, sectors: UInt64, secure: Bool = false, queue: Int = 0) throws -> Int16 {
        var q = BlkRequest()
        q.operation = BlkifOp.discard
        q.id = newID()
        q.sector = sector
        q.discardSectors = sectors
        q.discardSecure = secure
        return try roundTrip(q, queue: queue).status
    }

    /// The raw bytes of queue `queue`'s ring pages (for tests that lie or inspect slots).
    public func ringRegion(queue: Int = 0) -> GuestRegion {
        try! memory.slice(offset: Int(queues[queue].ringFrame) * 4096, length: queues[queue].ringRefs.count * 4096)
    }
}

func monotonicMs() -> Int64 { Int64(monotonicNanoseconds() / 1_000_000) }
