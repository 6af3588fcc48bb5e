import CXen
import Dispatch
import Glibc
import Logging
import NBD
import Synchronization
import XenBus
import XenHV
import XenRing
import XenStore

/// pvguest's blkfront (Linux's xen-blkfront): the frontend half of the blkif.h
/// handshake, and a ``BlockDevice`` the NBD server exports, so real tools
/// (qemu-io, nbdcopy, fio) drive the guest's disk through the rings.
///
/// Each ring slot owns its data pages (eleven, or 32 with indirect segments)
/// granted once to the backend (its grants persist, matching
/// feature-persistent): a request's data is copied between the NBD buffer and
/// the slot's pages, split at 44 KiB (128 KiB indirect). Requests carry their
/// slot index as id; a response naming a slot with nothing in flight on that
/// queue is ignored as the lie it is.
///
/// Backend recovery (Linux's blkif_recover, driven here by the backend going
/// away rather than by a guest resume): when our event channel goes unbound
/// (xenhv closes a dead backend's ports and wakes us) or the backend's `state`
/// leaves Connected (a new blkback probing the directory switches it to
/// InitWait), the completion thread tears the ring down (ends access to its
/// grants where nobody maps them, closes the port), cycles the frontend
/// through Closed and Initialising so the backend drops whatever it holds,
/// redoes the handshake with a fresh ring and event channel, and republishes
/// every request still unanswered, in submission order. NBD clients see no
/// error; requests submitted meanwhile wait in their slots.
///
/// Multi-queue: when the backend offers multi-queue-max-queues > 1, the device
/// uses one ring and event channel per queue (up to one per CPU, as Linux),
/// each with its own slots and lock; submissions go round-robin, one thread
/// completes all queues. Large requests use BLKIF_OP_INDIRECT when the
/// backend offers feature-max-indirect-segments.
public final class BlkFrontDevice: BlockDevice, @unchecked Sendable {
    // Sound: each queue's ring, channel and in-flight table are behind its
    // `state` mutex; `links` and `sectors` are only touched by init and then the
    // completion thread; everything else is immutable after the handshake.
    /// The disk's size in bytes now: an online resize (the backend's new
    /// `sectors`) changes it, and NBD clients connecting after see it.
    public var size: UInt64 { sizeBytes.load(ordering: .relaxed) }
    let sizeBytes: Atomic<UInt64>
    public let isReadOnly: Bool
    /// `feature-discard` of the backend, re-read at each reconnect (Linux's
    /// blkfront_gather_backend_features): a backend back without it gets
    /// no more discards.
    public var canTrim: Bool { trimOffered.load(ordering: .relaxed) }
    let trimOffered: Atomic<Bool>
    public let canFlush: Bool
    /// The backend's logical sector size (`sector-size`; 512 when absent):
    /// every transfer and discard is a multiple of it, at a multiple of it,
    /// as blkback validates them. The NBD server advertises it as the
    /// minimum block size.
    public let blockSize: UInt32
    /// Where FUA writes' flushes wait for a ring slot, one at a time: not on
    /// the completion thread, which frees the slots, and not on libdispatch's
    /// worker pool (its monitor reads /proc/<tid>/stat, which a guest's PID
    /// namespace does not match, and crashes the process).
    let fuaFlushes = SerialThread(name: "blkfront-fua")
    public let frontendPath: String
    let backendPath: String
    let backendID: XenHV.DomID
    public let ringOrder: Int
    let hv: Hypervisor
    let xs: XenBusClient
    let pages: GuestPages
    let grants: GrantRefs
    let slotPages: [GuestRegion]
    let slotRefs: [[GrantRef]]
    let queues: [Queue]
    var links: [Link]
    var sectors: UInt64
    let nextQueue = Atomic<Int>(0)
    var backendWatch: XenBusWatch?
    let logger: Logger
    let failed = Atomic<Bool>(false)
    /// Submitters writing into a slot's pages right now. With `failed` it
    /// makes a store-buffering pair (both sequentially consistent): a
    /// submitter that counts itself and then sees the device not failed
    /// fills its slot, and ``close()``, which sets `failed` and then waits
    /// for this to be zero, frees the pages only after it has.
    let filling = Atomic<Int>(0)
    /// Set by the backend-state watch; the completion thread looks at the store.
    let backendChanged = Atomic<Bool>(false)
    let recoveryCount = Atomic<Int>(0)
    /// Signalled when the completion thread has returned.
    let completionsDone = DispatchSemaphore(value: 0)
    let closed = Atomic<Bool>(false)
    let detachedFlag = Atomic<Bool>(false)

    /// Whether the toolstack took the backend away under the device (it only
    /// fails requests now; ``close()`` it).
    public var isDetached: Bool { detachedFlag.load(ordering: .acquiring) }
    /// The slots' data and indirect pages, given back at ``close()``.
    let dataExtent: (first: UInt32, count: Int)

    /// How many times the device reconnected to a new or restarted backend.
    public var recoveries: Int { recoveryCount.load(ordering: .relaxed) }

    static let segmentsPerRequest = Int(BLKIF_MAX_SEGMENTS_PER_REQUEST)
    /// Segments per slot when the backend offers indirect descriptors, unless
    /// the guest asks for another count (Linux blkfront's default
    /// xen_blkif_max_segments).
    public static let defaultIndirectSegments = 32
    /// The most segments one indirect page lists (512 of blkif.h's 8-byte
    /// blkif_request_segment; a slot has one indirect page). Backends offer
    /// fewer (Linux blkback and ours: 256).
    public static let maxIndirectSegments = HVLimits.pageSize / MemoryLayout<blkif_request_segment>.size
    /// What the guest may ask for: from blkif.h's 11 direct segments (no
    /// indirect requests) to one indirect page's worth.
    public static var indirectSegmentsRange: ClosedRange<Int> { segmentsPerRequest...maxIndirectSegments }
    /// Data pages per slot: 11, or the indirect segments with indirect requests.
    public let segmentsPerSlot: Int
    /// Largest ring request, in bytes.
    var chunk: Int { segmentsPerSlot * HVLimits.pageSize }
    /// Per slot, the indirect page (granted read-only) listing the data pages
    /// of a BLKIF_OP_INDIRECT request; empty without indirect descriptors.
    let indirectPages: [GuestRegion]
    let indirectRefs: [GrantRef]

    /// What submitters and the completion thread share. `ring` and `channel`
    /// are nil while the backend is being reconnected: requests then only
    /// enter `inFlight`, and recovery publishes them.
    struct State {
        var ring: FrontRing<BlkifRing>?
        var channel: EventChannel?
        var inFlight: [Pending?]
        var sequence: UInt64 = 0
    }

    /// One queue (multi-queue-num-queues): its ring's slots, `firstSlot` and
    /// on, are used as request ids; `inFlight` is indexed from `firstSlot`.
    final class Queue: Sendable {
        let index: Int
        let firstSlot: Int
        let slots: Int
        let state: Mutex<State>
        let freeSlots: Mutex<[Int]>
        let slotAvailable: DispatchSemaphore
        init(index: Int, firstSlot: Int, slots: Int) {
            self.index = index
            self.firstSlot = firstSlot
            self.slots = slots
            state = Mutex(State(ring: nil, channel: nil, inFlight: Array(repeating: nil, count: slots)))
            freeSlots = Mutex(Array((firstSlot..<firstSlot + slots).reversed()))
            slotAvailable = DispatchSemaphore(value: slots)
        }
    }

    /// One handshake's ring and port, per queue.
    struct Link {
        let ringFrame: UInt32
        let ringRefs: [GrantRef]
        let channel: EventChannel
        /// The port's status once the backend bound it; anything else later
        /// means the backend closed it (it died, or disconnected).
        let bound: EventChannelStatus
    }

    /// One NBD operation, possibly split over several ring requests.
    typealias Group = CompletionGroup

    /// Sound to send: the buffer belongs to this one request until it completes.
    struct Pending: @unchecked Sendable {
        let group: Group
        let readInto: UnsafeMutableRawPointer?
        let length: Int
        /// The request as published, kept to republish it after a reconnect.
        let request: blkif_request
        let sequence: UInt64
    }

    /// Connects the device at `frontendPath` (/local/domain/<me>/device/vbd/<devid>):
    /// waits for the backend's InitWait, sets up the ring, announces it, and
    /// waits for Connected.
    public init(hypervisor hv: Hypervisor, xenstore xs: XenBusClient, frontendPath fe: String,
                pages: GuestPages, grants: GrantRefs, ringPageOrder wantOrder: Int = 1, queues wantQueues: Int? = nil,
                indirectSegments wantIndirect: Int = BlkFrontDevice.defaultIndirectSegments,
                completionThread: Bool = true, logger: Logger = Logger(label: "blkfront")) throws {
        self.hv = hv
        self.xs = xs
        self.pages = pages
        self.grants = grants
        self.frontendPath = fe
        self.logger = logger
        let (be, beID) = try backend(of: fe, xs)
        backendPath = be
        backendID = beID
        // What this init took, handed back if it fails (a hotplugged device
        // that does not connect must not cost the guest its memory).
        var frames: [(UInt32, Int)] = []
        var granted: [GrantRef] = []
        // The rings once the handshake made them; ring frames the backend
        // still maps (a failed handshake's, or these links' after a later
        // failure) stay allocated and out of use.
        var madeLinks: [Link] = []
        var stuckRings: [UInt32] = []
        var done = false
        defer {
            if !done {
                stuckRings += Self.letGo(madeLinks, grants: grants).stuck
                if grants.revoke(granted) {
                    for (f, n) in frames where !stuckRings.contains(f) { pages.free(f, count: n) }
                }
            }
        }
        // Unknown: the toolstack removed the device before it connected.
        guard let s = xs.awaitState(at: be, { [.initWait, .connected, .closed, .closing, .unknown].contains($0) }),
              s == .initWait else {
            throw HypervisorError.protocolViolation("backend \(be) did not reach InitWait")
        }
        let maxOrder = Int((try xs.readIfExists(be + "/max-ring-page-order")) ?? "0") ?? 0
        let order = max(0, min(wantOrder, maxOrder, RingLayout.maxOrder))
        ringOrder = order
        // Linux: min(backend's multi-queue-max-queues, online CPUs).
        let maxQueues = Int((try xs.readIfExists(be + "/multi-queue-max-queues")) ?? "1") ?? 1
        var nq = max(1, min(wantQueues ?? HVLimits.onlineCPUs, maxQueues, 16))
        // Bounce pages come out of guest memory: this device takes at most half
        // of what is left (other disks and NICs come after it), fewer queues
        // and no indirect segments when that is short.
        let budget = pages.available / 2
        var ringFrames = [try pages.allocate(1 << order)]
        frames.append((ringFrames[0], 1 << order))
        let perQueue = Int(try pages.page(ringFrames[0], count: 1 << order).ring(BlkifRing.self, pages: 1 << order).size)
        while nq > 1 && nq * (perQueue * Self.segmentsPerRequest + (1 << order)) > budget { nq -= 1 }
        for _ in 1..<nq {
            ringFrames.append(try pages.allocate(1 << order))
            frames.append((ringFrames.last!, 1 << order))
        }
        let slots = perQueue * nq
        // Indirect descriptors when the backend takes them and our memory
        // holds the larger slots (Linux: feature-max-indirect-segments).
        // Linux: min(xen_blkif_max_segments, the backend's offer); one
        // indirect page per slot lists them all.
        let maxIndirect = Int((try xs.readIfExists(be + "/feature-max-indirect-segments")) ?? "0") ?? 0
        let indirect = min(max(0, wantIndirect), maxIndirect, Self.maxIndirectSegments)
        var perSlot = Self.segmentsPerRequest
        var dataFrame: UInt32
        var indirectFrame: UInt32? = nil
        if indirect > Self.segmentsPerRequest, slots * (indirect + 1) <= budget,
           let d = try? pages.allocate(slots * (indirect + 1)) {
            perSlot = indirect
            dataFrame = d
            indirectFrame = d + UInt32(slots * perSlot)
            dataExtent = (d, slots * (indirect + 1))
        } else {
            dataFrame = try pages.allocate(slots * perSlot)
            dataExtent = (dataFrame, slots * perSlot)
        }
        frames.append(dataExtent)
        segmentsPerSlot = perSlot
        var regions: [GuestRegion] = []
        var refs: [[GrantRef]] = []
        var indPages: [GuestRegion] = []
        var indRefs: [GrantRef] = []
        for i in 0..<slots {
            let first = dataFrame + UInt32(i * perSlot)
            regions.append(pages.page(first, count: perSlot))
            var slotRefs: [GrantRef] = []
            for p in 0..<perSlot {
                slotRefs.append(try grants.grant(frame: first + UInt32(p), to: beID, readOnly: false))
                granted.append(slotRefs.last!)
            }
            refs.append(slotRefs)
            if let f = indirectFrame {
                indPages.append(pages.page(f + UInt32(i)))
                indRefs.append(try grants.grant(frame: f + UInt32(i), to: beID, readOnly: true))
                granted.append(indRefs.last!)
            }
        }
        indirectPages = indPages
        indirectRefs = indRefs
        slotPages = regions
        slotRefs = refs
        let qs = (0..<nq).map { Queue(index: $0, firstSlot: $0 * perQueue, slots: perQueue) }
        queues = qs

        let (links, rings, sectors, offer) = try Self.handshake(hv: hv, xs: xs, fe: fe, be: be, beID: beID, order: order,
                                                         indirect: perSlot > Self.segmentsPerRequest ? perSlot : 0,
                                                         pages: pages, grants: grants, reuse: ringFrames, stuck: &stuckRings)
        madeLinks = links
        self.links = links
        self.sectors = sectors
        sizeBytes = Atomic(sectors * 512)
        isReadOnly = offer.readOnly
        canFlush = offer.flush
        trimOffered = Atomic(offer.discard && !offer.readOnly)
        blockSize = offer.blockSize
        for (i, q) in qs.enumerated() {
            q.state.withLock { s in
                s.ring = rings[i]
                s.channel = links[i].channel
            }
        }
        try xs.switchState(at: fe, to: .connected)
        backendWatch = try xs.watch(be + "/state", token: "blkfront:" + fe) { [weak self] _ in
            guard let self else { return }
            self.backendChanged.store(true, ordering: .releasing)
            self.wakeCompletions()
        }
        // Without the completion thread the rings are driven by one owner (the load generator, BlkLoad.swift).
        if completionThread { startCompletions() } else { completionsDone.signal() }
        done = true
        logger.info("\(fe): connected to \(be): \(sectors) sectors, \(nq) queue(s) of \(perQueue) slots (\(1 << order) ring page(s)), \(perSlot) segments per request\(indirectRefs.isEmpty ? "" : " (indirect)")")
    }

    /// What the backend's Connected keys offer: the cache flush,
    /// read-only-ness (`info`), the sector size (which the device is laid
    /// out for), and discard.
    struct Offer {
        var flush: Bool
        var readOnly: Bool
        var blockSize: UInt32
        var discard: Bool

        static func read(_ xs: XenBusClient, _ be: String) throws -> Offer {
            let info = UInt32((try xs.readIfExists(be + "/info")) ?? "0") ?? 0
            let sectorSize = (try xs.readIfExists(be + "/sector-size")).flatMap { UInt32($0) } ?? 512
            // blkif.h: a power of two of at least 512 (blkback offers up to 4096,
            // which also divides every request's split); anything else is read as 512.
            let block = sectorSize >= 512 && sectorSize <= 4096 && sectorSize & (sectorSize - 1) == 0 ? sectorSize : 512
            return Offer(flush: (try xs.readIfExists(be + "/feature-flush-cache")) == "1",
                         readOnly: info & UInt32(VDISK_READONLY) != 0, blockSize: block,
                         discard: (try xs.readIfExists(be + "/feature-discard")) == "1")
        }
    }

    /// The frontend's half of one handshake, the backend being in InitWait:
    /// per queue a ring (on `reuse`'s frames, else new ones) granted to the
    /// backend and an unbound port for it; the keys (queue-N/ directories with
    /// several queues), Initialised, then the backend's Connected and what it
    /// offers, checked against `previous` (a reconnect's) where the device
    /// is laid out for it.
    static func handshake(hv: Hypervisor, xs: XenBusClient, fe: String, be: String, beID: XenHV.DomID, order: Int,
                          indirect: Int, pages: GuestPages, grants: GrantRefs, reuse: [UInt32]?, stuck: inout [UInt32],
                          queues nq: Int? = nil, previous: Offer? = nil,
                          abandon: () throws -> Void = {}) throws -> ([Link], [FrontRing<BlkifRing>], UInt64, Offer) {
        let nq = nq ?? reuse?.count ?? 1
        let maxOrder = Int((try xs.readIfExists(be + "/max-ring-page-order")) ?? "0") ?? 0
        guard order <= maxOrder else {
            throw Incompatible(why: "backend \(be) now offers ring order \(maxOrder) < our \(order)")
        }
        let maxIndirect = Int((try xs.readIfExists(be + "/feature-max-indirect-segments")) ?? "0") ?? 0
        guard indirect <= maxIndirect else {
            throw Incompatible(why: "backend \(be) now takes \(maxIndirect) indirect segments < our \(indirect)")
        }
        let maxQueues = Int((try xs.readIfExists(be + "/multi-queue-max-queues")) ?? "1") ?? 1
        guard nq <= max(1, maxQueues) else {
            throw Incompatible(why: "backend \(be) now takes \(maxQueues) queues < our \(nq)")
        }
        let ringPages = 1 << order
        var links: [Link] = []
        var rings: [FrontRing<BlkifRing>] = []
        /// The ring of the queue being set up, until its link is made.
        var partial: (frame: UInt32, refs: [GrantRef])?
        /// Revokes a ring's refs. Frames this handshake allocated go back to
        /// the pool once none is held; reused frames stay the caller's, and
        /// those the backend still maps are listed in `stuck` (they stay out
        /// of use, and out of the next attempt).
        func giveBack(_ frame: UInt32, _ refs: [GrantRef]) {
            if !grants.revoke(refs) {
                if reuse != nil { stuck.append(frame) }
            } else if reuse == nil {
                pages.free(frame, count: ringPages)
            }
        }
        func release() {
            for l in links {
                try? l.channel.close()
                giveBack(l.ringFrame, l.ringRefs)
            }
            if let p = partial { giveBack(p.frame, p.refs) }
        }
        do {
            for q in 0..<nq {
                let ringFrame = try reuse?[q] ?? pages.allocate(ringPages)
                partial = (ringFrame, [])
                let region = pages.page(ringFrame, count: ringPages)
                try region.fill(0, at: 0, count: ringPages * HVLimits.pageSize)
                for i in 0..<ringPages {
                    partial?.refs.append(try grants.grant(frame: ringFrame + UInt32(i), to: beID, readOnly: false))
                }
                rings.append(FrontRing(initializing: try region.ring(BlkifRing.self, pages: ringPages)))
                let port = try hv.allocUnbound(remote: beID)
                links.append(Link(ringFrame: ringFrame, ringRefs: partial?.refs ?? [], channel: try hv.channel(port), bound: .closed))
                partial = nil
            }
            try xs.transaction { t in
                if order > 0 { try t.write(fe + "/ring-page-order", "\(order)") }
                if nq > 1 { try t.write(fe + "/multi-queue-num-queues", "\(nq)") }
                for (q, l) in links.enumerated() {
                    let dir = nq == 1 ? fe : fe + "/queue-\(q)"
                    if order == 0 {
                        try t.write(dir + "/ring-ref", "\(l.ringRefs[0])")
                    } else {
                        for (i, r) in l.ringRefs.enumerated() { try t.write(dir + "/ring-ref\(i)", "\(r)") }
                    }
                    try t.write(dir + "/event-channel", "\(l.channel.port)")
                }
                try t.write(fe + "/protocol", "x86_64-abi")
                try t.write(fe + "/feature-persistent", "1")
            }
            try xs.switchState(at: fe, to: .initialised)
            // In one-second steps, so a reconnect that `abandon`s (the device
            // closed or detached meanwhile) does not wait out the 30 s.
            var settled: XenBus.XenbusState?
            for _ in 0..<30 where settled == nil {
                settled = xs.awaitState(at: be, seconds: 1) { [.connected, .closing, .closed, .unknown].contains($0) }
                try abandon()
            }
            guard settled == .connected else {
                let why = (try? xs.readIfExists(be + "/error")) ?? nil
                throw HypervisorError.protocolViolation("backend \(be) did not connect\(why.map { ": \($0)" } ?? "")")
            }
            let now = try Offer.read(xs, be)
            if let previous {
                // A flush that became a no-op would acknowledge FUA writes and
                // flushes that never reach stable storage (a write cache appeared);
                // one that became refused would fail every flush.
                if now.flush != previous.flush {
                    throw Incompatible(why: "backend \(be) \(previous.flush ? "no longer offers" : "now needs") cache flushes")
                }
                // The export would go on taking writes the backend refuses,
                // or requests laid out for sectors it no longer has.
                if now.readOnly && !previous.readOnly {
                    throw Incompatible(why: "backend \(be) now serves the disk read-only")
                }
                if now.blockSize != previous.blockSize {
                    throw Incompatible(why: "backend \(be) now has \(now.blockSize)-byte sectors, not \(previous.blockSize)")
                }
            }
            // In bytes it must fit 64 bits (the export's size, offsets into it).
            guard let sectors = UInt64(try xs.read(be + "/sectors")), sectors <= UInt64.max / 512 else {
                throw HypervisorError.protocolViolation("\(be)/sectors is not a number of 512-byte sectors that fits 64 bits")
            }
            let bound = try links.map { l in
                Link(ringFrame: l.ringFrame, ringRefs: l.ringRefs, channel: l.channel, bound: try hv.status(of: l.channel.port))
            }
            return (bound, rings, sectors, now)
        } catch {
            release()
            throw error
        }
    }

    // MARK: BlockDevice

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, completion: @escaping @Sendable (Int32?) -> Void) {
        transfer(op: UInt8(BLKIF_OP_READ), offset: offset, count: buffer.count, read: buffer.baseAddress, write: .none, completion: completion)
    }

    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool, completion: @escaping @Sendable (Int32?) -> Void) {
        written(fua: fua, completion: completion) { done in
            transfer(op: UInt8(BLKIF_OP_WRITE), offset: offset, count: buffer.count, read: nil,
                     write: buffer.baseAddress.map { .bytes($0) } ?? .none, completion: done)
        }
    }

    /// Write-zeroes: blkif has no such request, and a discard need not zero,
    /// so zeros are written, every part submitted from the calling thread as
    /// a large write's are (a part submitted from the completion thread could
    /// wait there for a slot only that thread frees), its slot's pages zeroed
    /// in place.
    public func writeZeroes(at offset: UInt64, length: UInt64, fua: Bool, completion: @escaping @Sendable (Int32?) -> Void) {
        guard length <= UInt64(Int.max) else { completion(EINVAL); return }
        written(fua: fua, completion: completion) { done in
            transfer(op: UInt8(BLKIF_OP_WRITE), offset: offset, count: Int(length), read: nil, write: .zeros, completion: done)
        }
    }

    /// Runs `write` (a write's submission, handed the completion to call),
    /// and for FUA a cache flush once it completed, before the client hears
    /// of it. The flush waits for a ring slot, so it is not submitted from
    /// the completion path that frees slots (it would wait for itself).
    private func written(fua: Bool, completion: @escaping @Sendable (Int32?) -> Void,
                         _ write: (_ done: @escaping @Sendable (Int32?) -> Void) -> Void) {
        guard fua else { return write(completion) }
        write { [self] err in
            if let err { completion(err) } else {
                // No thread for flushes (the guest's process limit): the
                // write is not known durable, so it fails rather than wait
                // here for a slot only this thread frees.
                fuaFlushes.run({ self.flush(completion: completion) }, refused: { completion(EIO) })
            }
        }
    }

    public func flush(completion: @escaping @Sendable (Int32?) -> Void) {
        // Nothing to make durable on a read-only disk (blkback refuses FLUSH there, as Linux).
        guard canFlush, !isReadOnly else { completion(nil); return }
        submit(Group(parts: 1, completion: completion), readInto: nil, length: 0) { req, _ in
            req.operation = UInt8(BLKIF_OP_FLUSH_DISKCACHE)
        }
    }

    public func trim(at offset: UInt64, length: UInt64, completion: @escaping @Sendable (Int32?) -> Void) {
        guard canTrim else { completion(95 /* ENOTSUP */); return }
        guard offset % UInt64(blockSize) == 0, length % UInt64(blockSize) == 0 else { completion(EINVAL); return }
        submit(Group(parts: 1, completion: completion), readInto: nil, length: 0) { req, _ in
            // blkif_request_discard shares the 112-byte slot with blkif_request.
            let id = req.id
            withUnsafeMutableBytes(of: &req) { raw in
                var d = blkif_request_discard()
                d.operation = UInt8(BLKIF_OP_DISCARD)
                d.id = id
                d.sector_number = offset / 512
                d.nr_sectors = length / 512
                raw.storeBytes(of: d, as: blkif_request_discard.self)
            }
        }
    }

    // MARK: Submission

    /// What a write puts in its slots' pages.
    enum Source { case none, bytes(UnsafeRawPointer), zeros }

    func transfer(op: UInt8, offset: UInt64, count: Int, read dst: UnsafeMutableRawPointer?, write src: Source,
                  completion: @escaping @Sendable (Int32?) -> Void) {
        guard offset % UInt64(blockSize) == 0, count % Int(blockSize) == 0, count > 0 else { completion(EINVAL); return }
        guard !isReadOnly || op == UInt8(BLKIF_OP_READ) else { completion(EPERM); return }
        let chunk = self.chunk
        let parts = (count + chunk - 1) / chunk
        let group = Group(parts: parts, completion: completion)
        for p in 0..<parts {
            let off = p * chunk
            let len = min(chunk, count - off)
            submit(group, readInto: dst.map { $0 + off }, length: len) { [self] req, slot in
                let sector = (offset + UInt64(off)) / 512
                let segs = (len + HVLimits.pageSize - 1) / HVLimits.pageSize
                let list = (0..<segs).map { i in
                    blkif_request_segment(gref: slotRefs[slot][i], first_sect: 0,
                                          last_sect: UInt8(min(HVLimits.pageSize, len - i * HVLimits.pageSize) / 512 - 1))
                }
                if segs <= Self.segmentsPerRequest {
                    req.operation = op
                    req.sector_number = sector
                    req.nr_segments = UInt8(segs)
                    withUnsafeMutableBytes(of: &req.seg) { raw in
                        let s = raw.bindMemory(to: blkif_request_segment.self)
                        for i in 0..<segs { s[i] = list[i] }
                    }
                } else {
                    // BLKIF_OP_INDIRECT: the segments go in the slot's indirect page.
                    list.withUnsafeBytes { try? indirectPages[slot].write($0, at: 0) }
                    var ind = blkif_request_indirect()
                    ind.operation = UInt8(BLKIF_OP_INDIRECT)
                    ind.indirect_op = op
                    ind.nr_segments = UInt16(segs)
                    ind.id = req.id
                    ind.sector_number = sector
                    ind.indirect_grefs.0 = indirectRefs[slot]
                    withUnsafeMutableBytes(of: &req) { $0.storeBytes(of: ind, as: blkif_request_indirect.self) }
                }
                switch src {
                case .none: break
                case .bytes(let src): try? slotPages[slot].write(UnsafeRawBufferPointer(start: src + off, count: len), at: 0)
                case .zeros: try? slotPages[slot].fill(0, at: 0, count: len)
                }
            }
        }
    }

    /// Takes a slot (waiting for one), fills its request and publishes it, or
    /// while the backend is being reconnected leaves it for recovery to publish.
    func submit(_ group: Group, readInto: UnsafeMutableRawPointer?, length: Int, fill: (inout blkif_request, Int) -> Void) {
        guard !failed.load(ordering: .acquiring) else { group.partDone(EIO); return }
        let q = queues.count == 1 ? queues[0]
            : queues[nextQueue.wrappingAdd(1, ordering: .relaxed).oldValue % queues.count]
        q.slotAvailable.wait()
        let slot = q.freeSlots.withLock { $0.removeLast() }
        // A close may have begun while we waited: its pages must not be
        // written once it frees them (they may be another device's by then).
        filling.wrappingAdd(1, ordering: .sequentiallyConsistent)
        guard !failed.load(ordering: .sequentiallyConsistent) else {
            filling.wrappingSubtract(1, ordering: .sequentiallyConsistent)
            q.freeSlots.withLock { $0.append(slot) }
            q.slotAvailable.signal()
            group.partDone(EIO)
            return
        }
        var req = blkif_request()
        req.id = UInt64(slot)
        fill(&req, slot)
        filling.wrappingSubtract(1, ordering: .sequentiallyConsistent)
        let request = req
        // Checked again under the lock: failAll sets `failed` before it empties
        // the in-flight table, so a request either is failed by it or sees it.
        let (kick, refused): (EventChannel?, Bool) = q.state.withLock { s in
            guard !failed.load(ordering: .acquiring) else { return (nil, true) }
            s.sequence += 1
            s.inFlight[slot - q.firstSlot] = Pending(group: group, readInto: readInto, length: length, request: request, sequence: s.sequence)
            guard var r = s.ring else { return (nil, false) }
            r.enqueue(request)  // never full: one slot per ring entry
            let notify = r.pushRequestsAndCheckNotify()
            s.ring = r
            return (notify ? s.channel : nil, false)
        }
        if refused {
            q.freeSlots.withLock { $0.append(slot) }
            q.slotAvailable.signal()
            group.partDone(EIO)
            return
        }
        try? kick?.notify()
    }

    // MARK: Completion

    func startCompletions() {
        DetachedThread.start(name: "blkfront") { [self] in
            completions()
            completionsDone.signal()
        }
    }

    /// Wakes the completion thread (xenhv kicks our own port's wake-up set).
    func wakeCompletions() {
        let channel = queues[0].state.withLock { $0.channel }
        try? channel?.raise()
    }

    func completions() {
        var checkPort = false
        while !failed.load(ordering: .acquiring) {
            let changed = backendChanged.exchange(false, ordering: .acquiringAndReleasing)
            if changed || checkPort {
                checkPort = false
                if let why = connectionLost() {
                    // The toolstack detaching the disk is no outage to recover
                    // from: the device fails until the guest closes it.
                    if backendDetached() {
                        logger.info("\(frontendPath): backend \(backendPath) is going away (\(why)); the disk is detached")
                        detachedFlag.store(true, ordering: .releasing)
                        failAll()
                        return
                    }
                    recover(why)
                    continue
                }
                if changed { refreshSize() }
            }
            do {
                while try drainAll() > 0 {}
                var more = false
                for q in queues {
                    more = try q.state.withLock { s throws -> Bool in
                        guard var r = s.ring else { return false }
                        defer { s.ring = r }
                        return try r.finalCheckForResponses()
                    } || more
                }
                if more { continue }
                waitForEvents()
                // A wake with nothing to consume may be xenhv waking us as the
                // backend's port closed (the backend died or disconnected).
                checkPort = try drainAll() == 0
            } catch {
                logger.error("\(frontendPath): \(error); failing the device")
                failAll()
                return
            }
        }
    }

    /// Blocks until an event is delivered on any queue's port.
    func waitForEvents() {
        if links.count == 1 { links[0].channel.wait(); return }
        var delivered = false
        for l in links where l.channel.consume() { delivered = true }
        if delivered { return }
        var fds = links.map { pollfd(fd: $0.channel.descriptor, events: Int16(POLLIN), revents: 0) }
        while poll(&fds, nfds_t(fds.count), -1) < 0 && errno == EINTR {}
        for l in links { _ = l.channel.consume() }
    }

    /// Fails every request in flight with EIO (the device is dead); their
    /// slots go back, so no submitter waits for one forever.
    func failAll() {
        failed.store(true, ordering: .sequentiallyConsistent)
        for q in queues {
            let lost = q.state.withLock { s -> [(Int, Pending)] in
                defer { s.inFlight = Array(repeating: nil, count: s.inFlight.count) }
                return s.inFlight.enumerated().compactMap { i, p in p.map { (q.firstSlot + i, $0) } }
            }
            for (slot, p) in lost {
                q.freeSlots.withLock { $0.append(slot) }
                q.slotAvailable.signal()
                p.group.partDone(EIO)
            }
        }
    }

    /// Whether the toolstack is taking the device away (libxl's removal:
    /// online=0, then Closing), has removed the backend directory, or has
    /// removed the device and added a new one in its place (the frontend
    /// directory lost the keys we wrote): no outage of our backend, then.
    func backendDetached() -> Bool {
        guard let online = (try? xs.readIfExists(backendPath + "/online")) ?? nil, online != "0" else { return true }
        return (try? xs.readIfExists(frontendPath + "/" + Self.handshakeKey)) ?? nil == nil
    }

    /// A key this frontend writes at every handshake and never removes.
    public static let handshakeKey = "protocol"

    /// Closes the disk for good (Linux's blkfront_closing, on a detach or the
    /// guest's shutdown): requests in flight and later ones fail with EIO, the
    /// frontend goes Closed (while its directory exists), and the rings, ports,
    /// grants and pages go back to the guest — those the backend still maps
    /// stay granted and unused.
    public func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        failAll()
        fuaFlushes.stop()  // what it still holds fails at once (failAll marked the device failed)
        if let w = backendWatch { try? xs.unwatch(w) }
        wakeCompletions()
        // The completion thread may be in a reconnect's handshake, which ends
        // at its own timeout; only once it is out are the rings free to go.
        guard completionsDone.wait(timeout: .now() + 35) == .success else {
            logger.warning("\(frontendPath): the completion thread did not stop; its rings stay allocated")
            return
        }
        // The backend lets go of the rings and persistent grants on our Closed
        // (not written into a new device the toolstack put in our place).
        if (try? xs.readIfExists(frontendPath + "/" + Self.handshakeKey)) ?? nil != nil {
            try? xs.switchStateIfPresent(at: frontendPath, to: .closed, owner: Self.handshakeKey)
            // A backend offering the device anew (Initialising, InitWait: the
            // toolstack put a new device in the directory meanwhile) holds
            // nothing of ours either.
            _ = xs.awaitState(at: backendPath, seconds: 2) { $0 != .connected && $0 != .closing }
        }
        for q in queues {
            q.state.withLock { s in
                s.ring = nil
                s.channel = nil
            }
        }
        // A submitter that took a slot before failAll may still be copying
        // into its pages (a memcpy of one chunk at most): the pages go back
        // only after it has (see `filling`).
        let fillDeadline = monotonicNanoseconds() + 5_000_000_000
        while filling.load(ordering: .sequentiallyConsistent) != 0 && monotonicNanoseconds() < fillDeadline {
            idle(milliseconds: 1)
        }
        for f in Self.letGo(links, grants: grants).revoked { pages.free(f, count: 1 << ringOrder) }
        if filling.load(ordering: .sequentiallyConsistent) != 0 {
            logger.warning("\(frontendPath): a request was still being copied into its pages; they stay allocated")
        } else if grants.revoke(slotRefs.flatMap { $0 } + indirectRefs) {
            pages.free(dataExtent.first, count: dataExtent.count)
        } else {
            logger.warning("\(frontendPath): the backend still maps data pages; they stay granted")
        }
        logger.info("\(frontendPath): closed")
    }

    func drainAll() throws -> Int {
        var n = 0
        for q in queues { n += try drainResponses(q) }
        return n
    }

    /// Consumes the responses on one queue's ring; returns how many.
    func drainResponses(_ q: Queue) throws -> Int {
        let answered = try q.state.withLock { s throws -> [(Int, Int32, Pending)] in
            guard var r = s.ring else { return [] }
            defer { s.ring = r }
            var out: [(Int, Int32, Pending)] = []
            while let rsp = try r.nextResponse() {
                let local = Int(truncatingIfNeeded: rsp.id &- UInt64(q.firstSlot))
                guard rsp.id >= UInt64(q.firstSlot), rsp.id < UInt64(q.firstSlot + q.slots), let p = s.inFlight[local] else {
                    logger.warning("\(frontendPath): response for request \(rsp.id), which is not in flight on queue \(q.index); ignored")
                    continue
                }
                s.inFlight[local] = nil
                out.append((q.firstSlot + local, Int32(rsp.status), p))
            }
            return out
        }
        for (slot, status, p) in answered { complete(q, slot, status, p) }
        return answered.count
    }

    func complete(_ q: Queue, _ slot: Int, _ status: Int32, _ p: Pending) {
        var err: Int32? = nil
        switch status {
        case BLKIF_RSP_OKAY:
            if let dst = p.readInto {
                try? slotPages[slot].read(into: UnsafeMutableRawBufferPointer(start: dst, count: p.length), at: 0)
            }
        case BLKIF_RSP_EOPNOTSUPP: err = 95  // ENOTSUP
        default: err = EIO
        }
        q.freeSlots.withLock { $0.append(slot) }
        q.slotAvailable.signal()
        p.group.partDone(err)
    }

    // MARK: Recovery

    /// Why the current connection is gone, or nil while it stands: a port no
    /// longer bound as the backend bound it, or the backend's state not Connected.
    func connectionLost() -> String? {
        for l in links {
            let port = (try? hv.status(of: l.channel.port)) ?? .closed
            if port != l.bound { return "event channel \(l.channel.port) is now \(port)" }
        }
        let be = (try? xs.state(at: backendPath)) ?? .unknown
        if be != .connected { return "backend state is \(be)" }
        return nil
    }

    /// blkif_recover: drop the old rings, reconnect, republish what is unanswered.
    func recover(_ why: String) {
        logger.warning("\(frontendPath): backend \(backendPath) lost (\(why)); reconnecting")
        // Answers the old backend published still count.
        _ = try? drainAll()
        for q in queues {
            q.state.withLock { s in
                s.ring = nil
                s.channel = nil
            }
        }
        // Ring pages nobody maps any more are reused; others are left to the
        // old mapping (and then the rest go back: the attempt takes new pages).
        let free = Self.letGo(links, grants: grants).revoked
        var reuse: [UInt32]? = free.count == links.count ? free : nil
        if reuse == nil { for f in free { pages.free(f, count: 1 << ringOrder) } }
        // The old rings are given up here: their refs are back on the free
        // list (another device may hold them by now), so nothing may revoke
        // them again — close() revokes only `links`. Frames kept for reuse
        // stay ours across failed attempts (a handshake that fails revokes
        // what it granted on them), and go back to the guest if the device
        // ends before it reconnects.
        links = []
        defer {
            if links.isEmpty, let frames = reuse { for f in frames { pages.free(f, count: 1 << ringOrder) } }
        }
        var attempt = 0
        while !failed.load(ordering: .acquiring) {
            attempt += 1
            do {
                // Closed makes any backend instance drop what it holds of us;
                // Initialising after its Closed asks it for InitWait again.
                try xs.switchStateIfPresent(at: frontendPath, to: .closed, owner: Self.handshakeKey)
                guard try awaitBackend(.closed) else { continue }
                try xs.switchStateIfPresent(at: frontendPath, to: .initialising, owner: Self.handshakeKey)
                guard try awaitBackend(.initWait) else { continue }
                try checkAttached()
                var stuck: [UInt32] = []
                defer {
                    // A failed attempt whose backend kept a reused ring mapped:
                    // that ring stays out of use, the others go back, and the
                    // next attempt takes new pages.
                    if !stuck.isEmpty, let frames = reuse {
                        for f in frames where !stuck.contains(f) { pages.free(f, count: 1 << ringOrder) }
                        reuse = nil
                    }
                }
                let (newLinks, rings, newSectors, offer) = try Self.handshake(
                    hv: hv, xs: xs, fe: frontendPath, be: backendPath, beID: backendID, order: ringOrder,
                    indirect: indirectPages.isEmpty ? 0 : segmentsPerSlot, pages: pages, grants: grants,
                    reuse: reuse, stuck: &stuck, queues: queues.count,
                    previous: Offer(flush: canFlush, readOnly: isReadOnly, blockSize: blockSize, discard: canTrim),
                    abandon: checkAttached)
                if newSectors != sectors {
                    logger.warning("\(frontendPath): backend now reports \(newSectors) sectors (was \(sectors))")
                }
                do {
                    try xs.switchStateIfPresent(at: frontendPath, to: .connected, owner: Self.handshakeKey)
                } catch {
                    // Not connected after all: this attempt's rings are given
                    // up as a failed handshake's are, and kept for the next.
                    reuse = newLinks.map(\.ringFrame)
                    stuck += Self.letGo(newLinks, grants: grants).stuck
                    throw error
                }
                links = newLinks
                sectors = newSectors
                sizeBytes.store(newSectors * 512, ordering: .relaxed)
                let trim = offer.discard && !isReadOnly
                if trimOffered.exchange(trim, ordering: .relaxed) != trim {
                    logger.warning("\(frontendPath): backend \(trim ? "now offers" : "no longer offers") discard")
                }
                var count = 0
                for (i, q) in queues.enumerated() {
                    let (kick, n) = q.state.withLock { s -> (Bool, Int) in
                        var r = rings[i]
                        let unanswered = s.inFlight.compactMap { $0 }.sorted { $0.sequence < $1.sequence }
                        for p in unanswered { r.enqueue(p.request) }
                        let kick = r.pushRequestsAndCheckNotify()
                        s.ring = r
                        s.channel = newLinks[i].channel
                        return (kick, unanswered.count)
                    }
                    if kick { try? newLinks[i].channel.notify() }
                    count += n
                }
                recoveryCount.add(1, ordering: .relaxed)
                logger.warning("\(frontendPath): reconnected to \(backendPath); \(count) request(s) resubmitted")
                return
            } catch let e as Incompatible {
                // Linux renegotiates and splits requests anew; these rings and
                // slots are laid out for the old limits, so the disk fails
                // (EIO) rather than retrying a handshake that cannot work.
                logger.error("\(frontendPath): \(e.why); failing the device")
                failAll()
                return
            } catch let e as Gone {
                // The toolstack took the disk away while we reconnected (or put
                // a new device in its place, which is not ours to handshake on).
                guard !failed.load(ordering: .acquiring) else { return }
                logger.info("\(frontendPath): \(e.why) while reconnecting; the disk is detached")
                detachedFlag.store(true, ordering: .releasing)
                failAll()
                return
            } catch {
                logger.warning("\(frontendPath): reconnect attempt \(attempt) failed: \(error)")
                // Back off before retrying the handshake (not a synchronisation).
                usleep(UInt32(min(attempt, 10)) * 100_000)
            }
        }
    }

    /// Online resize (blkfront_connect on a Connected backend's state event,
    /// which xen_vbd_resize writes again with the new `sectors`).
    func refreshSize() {
        guard let s = ((try? xs.readIfExists(backendPath + "/sectors")) ?? nil).flatMap({ UInt64($0) }),
              s <= UInt64.max / 512, s != sectors else { return }
        logger.info("\(frontendPath): the disk is now \(s) sectors (was \(sectors))")
        sectors = s
        sizeBytes.store(s * 512, ordering: .relaxed)
    }

    /// Closes `links`' ports and revokes their rings' refs: the ring frames
    /// whose refs all went back (free to use again), and those the backend
    /// still maps (to stay out of use).
    static func letGo(_ links: [Link], grants: GrantRefs) -> (revoked: [UInt32], stuck: [UInt32]) {
        var out: (revoked: [UInt32], stuck: [UInt32]) = ([], [])
        for l in links {
            try? l.channel.close()
            if grants.revoke(l.ringRefs) { out.revoked.append(l.ringFrame) } else { out.stuck.append(l.ringFrame) }
        }
        return out
    }

    /// Why a reconnect stops: the device was closed, or the toolstack detached it.
    struct Gone: Error { let why: String }

    /// A backend come back with less than this device was set up for (ring
    /// order, queues, indirect segments), or with a different cache flush.
    struct Incompatible: Error, CustomStringConvertible {
        let why: String
        var description: String { why }
    }

    /// Throws ``Gone`` once the device is closed or detached (online=0, the
    /// backend directory removed, or a new device in our frontend directory).
    func checkAttached() throws {
        if failed.load(ordering: .acquiring) { throw Gone(why: "the device was closed") }
        if backendDetached() { throw Gone(why: "backend \(backendPath) is going away") }
    }

    /// Waits up to 30 s, in one-second steps, for the backend's state; false
    /// after a wait that saw something else, to restart the cycle; throws
    /// ``Gone`` when the device is closed or detached meanwhile.
    func awaitBackend(_ want: XenBus.XenbusState) throws -> Bool {
        for _ in 0..<30 {
            if xs.awaitState(at: backendPath, seconds: 1, { $0 == want }) != nil { return true }
            try checkAttached()
        }
        return false
    }
}

/// Work run in order on one thread of its own, started at the first job (a
/// plain pthread, off libdispatch's pool); ``stop()`` ends it after the jobs
/// already queued, and a job given after that runs at once on the caller's
/// thread (for a closed device, which fails it without waiting). When no
/// thread can be made, each queued job's `refused` runs instead, on the
/// caller's thread, and the next job tries again.
final class SerialThread: @unchecked Sendable {
    // Sound: `state` synchronises itself; `name` is immutable.
    private struct State {
        var jobs: [(run: @Sendable () -> Void, refused: @Sendable () -> Void)] = []
        var started = false
        var stopping = false
    }
    private let name: String
    private let state = Mutex(State())
    private let ready = DispatchSemaphore(value: 0)

    init(name: String) { self.name = name }

    func run(_ job: @escaping @Sendable () -> Void, refused: @escaping @Sendable () -> Void) {
        let (inline, start, wake) = state.withLock { s -> (Bool, Bool, Bool) in
            if s.stopping { return (true, false, false) }
            let wake = s.jobs.isEmpty  // the thread takes the whole list at each wake-up
            s.jobs.append((job, refused))
            defer { s.started = true }
            return (false, !s.started, wake)
        }
        if inline { return job() }
        if start, !DetachedThread.start(name: name, { [self] in loop() }) {
            let jobs = state.withLock { s in
                s.started = false
                defer { s.jobs = [] }
                return s.jobs
            }
            for j in jobs { j.refused() }
            return
        }
        if wake { ready.signal() }
    }

    /// After the jobs already queued (none if it never started), it ends.
    func stop() {
        let wake = state.withLock { s -> Bool in
            guard !s.stopping else { return false }
            s.stopping = true
            return s.started
        }
        if wake { ready.signal() }
    }

    private func loop() {
        var batch: [(run: @Sendable () -> Void, refused: @Sendable () -> Void)] = []
        while true {
            ready.wait()
            let stopping = state.withLock { s -> Bool in
                swap(&s.jobs, &batch)
                return s.stopping
            }
            for job in batch { job.run() }
            batch.removeAll(keepingCapacity: true)
            if stopping { return }
        }
    }
}
