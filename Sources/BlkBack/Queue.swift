import CLibAIO
import CXen
import Glibc
import Logging
import Synchronization
import XenHV
import XenRing

/// What a queue needs to know about its disk; shared by all queues of a device.
final class DiskState: Sendable {
    let name: String
    let backing: Backing
    /// Capacity in 512-byte sectors; changes on online resize.
    let capacity: Atomic<UInt64>
    let logger: Logger
    /// How long a queue spins looking for work before it sleeps (0: never spins).
    let busyPollNanoseconds: UInt64
    /// The persistent grants every queue of the process draws on.
    let mappingBudget: MappingBudget
    /// How often unused persistent grants are purged while misses happen
    /// (Linux: LRU_INTERVAL, 100 ms).
    let purgeIntervalNanoseconds: UInt64
    /// Tests: how many of the next iocbs `io_submit` is to refuse (EINVAL).
    let submitRefusalsForTesting = Atomic<Int>(0)

    init(name: String, backing: Backing, sectors: UInt64, busyPollMicroseconds: Int = 0,
         mappingBudget: MappingBudget = .process, purgeIntervalMilliseconds: Int = 100, logger: Logger) {
        self.name = name
        busyPollNanoseconds = UInt64(max(0, busyPollMicroseconds)) * 1000
        self.mappingBudget = mappingBudget
        purgeIntervalNanoseconds = UInt64(max(1, purgeIntervalMilliseconds)) * 1_000_000
        self.backing = backing
        capacity = Atomic(sectors)
        self.logger = logger
    }

    @inline(__always)
    var geometry: DiskGeometry {
        DiskGeometry(sectors: capacity.load(ordering: .relaxed), sectorSize: backing.sectorSize,
                     readOnly: backing.readOnly, discard: backing.discard, discardSecure: backing.discardSecure)
    }
}

/// One queue's ring as the frontend set it up (`ring-ref0..N`, `event-channel`
/// of `queue-N/`, or of the device directory for a single queue).
public struct QueueRingConfig: Sendable, Equatable {
    /// The ring's pages, `1 << ring-page-order` of them (`ring-ref` or `ring-ref0..N`).
    public var ringRefs: [GrantRef]
    /// The frontend's unbound port (`event-channel`).
    public var eventChannel: EventPort
    public init(ringRefs: [GrantRef], eventChannel: EventPort) {
        self.ringRefs = ringRefs
        self.eventChannel = eventChannel
    }
}

/// A running queue, whatever its ring ABI.
protocol QueueRunner: AnyObject, Sendable {
    var index: Int { get }
    var stats: BlkStats { get }
    /// Why the ring was stopped (a protocol violation), or nil while it serves.
    var stoppedReason: String? { get }
    /// Persistent grants currently kept.
    var persistentGrantCount: Int { get }
    /// The descriptors this queue owns (event channel, aio eventfd, control eventfd).
    var descriptors: [CInt] { get }
    /// The queue's aio context (the address of its [aio] ring mapping), if it has one.
    var aioContext: UInt? { get }
    /// The event channel's descriptor (an eventfd xenhv also holds for the port).
    var channelDescriptor: CInt { get }
    func start() throws(BlkBackError)
    /// Stops the thread without waiting for it: it waits for the I/O in
    /// flight (answering it, but copying no read's data into a guest page
    /// it does not hold mapped: the frontend may be given those pages back
    /// before), releases every mapping and port, and then calls `finished`
    /// (at once when it never started, or ended already). A request held
    /// behind a fence or waiting for bounce pages is not answered. Linux's
    /// xen_blkif_disconnect: kthread_stop, the ring freed on the last
    /// completion.
    func stop(then finished: @escaping @Sendable () -> Void)
}

/// The entry point a new thread calls (non-generic, so a C callback can reach it).
protocol LoopRunnable: AnyObject {
    func runLoop()
}

/// One in-flight request.
struct SlotState {
    var id: UInt64 = 0
    var operation: UInt8 = 0
    var write = false
    var sectors: UInt64 = 0
    var bytes = 0
    var pins: Int32 = 0
    /// Segments served through bounce pages (``BounceSegment``).
    var bounces: Int32 = 0
}

/// A segment whose data goes through one of our bounce pages and a grant copy
/// (GNTTABOP_copy) instead of a mapping of the guest page.
struct BounceSegment {
    var gref: GrantRef = 0
    var offset: UInt16 = 0
    var length: UInt16 = 0
    var page: Int32 = 0
}

/// One queue of a VBD: its ring, event channel, libaio context and persistent
/// grants, served by one thread (Linux blkback's xen_blkif_schedule per ring).
///
/// The loop: consume every request the ring has (each copied once, decoded and
/// validated), map its segments (persistent grants; bounce pages and grant
/// copies beyond their bound), queue its I/O; submit the batch (io_submit
/// calls of a few iocbs, IOEngine.submitChunk); answer what failed
/// validation; push responses and notify; RING_FINAL_CHECK_FOR_REQUESTS; then poll the event channel, the aio
/// eventfd and a control eventfd. Completions are reaped from the eventfd (the
/// events themselves straight from the kernel's mapped completion ring) and
/// answered. FLUSH/BARRIER drain what is in flight first. All per-request
/// state lives in arrays allocated at connect, one slot per ring entry, so the
/// hot path does not allocate or lock; persistent grants are looked up in a
/// pre-sized table, and purged (Linux's purge_persistent_gnt) only while
/// misses happen. Nothing else of the guest is ever mapped: a segment that is
/// not persistent goes through a bounce page and a grant copy, so what a queue
/// holds mapped is bounded (its ring, its persistent grants) whatever the
/// guest puts on its ring; a request that finds the bounce pages all in
/// flight waits on the ring, unconsumed behind it, until completions free
/// them (Linux blkback waits for free pending requests the same way). A
/// producer-index overflow stops this ring alone; a storm of empty kicks
/// mutes its event channel for a moment.
final class BlkQueue<R: BlkifRingABI>: QueueRunner, LoopRunnable, @unchecked Sendable
where R.Request: BitwiseCopyable, R.Response: BitwiseCopyable {
    // Sound: after `start`, all mutable state is touched only by the queue's
    // thread; other threads read `stats` (atomics) and `stoppedReason` (mutex),
    // and `stop` hands the thread its `finished` through the `exit` mutex.
    let index: Int
    let stats = BlkStats()
    private let hv: Hypervisor
    private let frontend: DomID
    private let disk: DiskState
    private let ringMapping: ContiguousGrantMapping
    private var ring: BackRing<R>
    private let channel: EventChannel
    private let engine: IOEngine?
    private let controlFD: CInt
    private var grants: PersistentGrants
    private let usePersistent: Bool
    private let nslots: Int
    private let maxSeg = BlkifLimits.maxIndirectSegments
    private let slots: UnsafeMutablePointer<SlotState>
    private let iovecs: UnsafeMutablePointer<iovec>
    private let pins: UnsafeMutablePointer<Int32>
    private let segs: UnsafeMutablePointer<UInt64>
    private let freeSlots: UnsafeMutablePointer<Int32>
    private var freeCount: Int
    /// What holds the ring until every I/O in flight completed: a
    /// FLUSH/BARRIER waiting for earlier requests, then (blkif.h) a
    /// WRITE_BARRIER's own data write, which every later write waits for.
    private enum Fence { case draining(BlkRequest), barrierWrite }
    private var fence: Fence?
    /// A READ/WRITE waiting for bounce pages: in-flight requests hold them all.
    private var deferred: (request: BlkRequest, dsync: Bool)?
    /// No new request is consumed while one waits (a fence, or a request for bounce pages).
    @inline(__always) private var waiting: Bool { fence != nil || deferred != nil }
    private var lastPushed: UInt32
    private var broken = false
    private let reason = Mutex<String?>(nil)
    private let grantCount = Atomic<Int>(0)
    private var started = false
    /// Whether the thread's loop has ended, whether it has released
    /// everything, and what to call then (set by ``stop(then:)``: also the
    /// sign that a stop was asked for). The control eventfd is written
    /// under it, and closed only once `ended` is set, so a stop never writes
    /// to a number reused meanwhile; a bounced read's copy into the guest
    /// runs under it too, so none starts once ``stop(then:)`` returned.
    private let exit = Mutex<(ended: Bool, released: Bool, finished: (@Sendable () -> Void)?)>((false, false, nil))
    private var descriptorsClosed = false
    /// Segments that found no room among the persistent grants.
    private var persistentMisses = 0
    /// Bounce pages for segments that are not persistent (no persistent
    /// grants negotiated, the set full, or the process's budget spent): the
    /// I/O goes to our page and a grant copy moves the data (as QEMU's
    /// xen-block does for every request), which costs a fraction of mapping
    /// and unmapping the guest page for one request (an mmap, a munmap with
    /// its TLB shootdown, and a page-table fault-in for O_DIRECT each time),
    /// and maps nothing. Allocated at the first need, ``bounceCapacity``
    /// pages (the persistent bound, and at least one largest request); when
    /// they are all in flight, the next request waits (``deferred``).
    private var bounce: UnsafeMutableRawPointer?
    private var bounceFree: UnsafeMutablePointer<Int32>?
    private var bounceFreeCount = 0
    private var bounceSegments: UnsafeMutablePointer<BounceSegment>?
    private let bounceCapacity: Int
    private var copyOps: [GrantCopy] = []
    /// The pool's mmap failed once; requests that need it fail from then on.
    private var bounceUnavailable = false
    private var lastPurge: UInt64 = 0

    var stoppedReason: String? { reason.withLock { $0 } }
    var persistentGrantCount: Int { grantCount.load(ordering: .relaxed) }
    var descriptors: [CInt] { [channel.descriptor, controlFD] + (engine.map { [$0.eventFD] } ?? []) }
    var aioContext: UInt? { engine?.contextAddress }
    var channelDescriptor: CInt { channel.descriptor }

    init(index: Int, hypervisor: Hypervisor, frontend: DomID, disk: DiskState, ring config: QueueRingConfig,
         persistentGrants: Bool, persistentGrantLimit: Int) throws(BlkBackError) {
        self.index = index
        hv = hypervisor
        self.frontend = frontend
        self.disk = disk
        let pages = config.ringRefs.count
        guard pages >= 1, pages <= 1 << BlkifLimits.maxRingPageOrder, pages & (pages - 1) == 0 else {
            throw .badConfiguration("\(pages) ring pages: not a power of two up to \(1 << BlkifLimits.maxRingPageOrder)")
        }
        let mapping: ContiguousGrantMapping
        switch hypervisor.mapGrantsContiguous(domid: frontend, refs: config.ringRefs, writable: true) {
        case .success(let m): mapping = m
        case .failure(let s): throw .grantMap(config.ringRefs.first ?? 0, s.rawValue)
        }
        let shared: SharedRing<R>
        do {
            shared = try mapping.region.ring(R.self, pages: pages)
        } catch {
            hypervisor.unmapGrants(mapping)
            throw .badConfiguration("ring region: \(error)")
        }
        let ch: EventChannel
        do {
            ch = try hypervisor.bindInterdomain(remote: frontend, remotePort: config.eventChannel)
        } catch {
            hypervisor.unmapGrants(mapping)
            throw .badConfiguration("binding event channel \(config.eventChannel) of domain \(frontend): \(error)")
        }
        let n = Int(shared.size)
        var eng: IOEngine? = nil
        if disk.backing.kind != .null {
            do {
                eng = try IOEngine(capacity: n)
            } catch {
                try? hypervisor.close(port: ch.port)
                hypervisor.unmapGrants(mapping)
                throw error
            }
        }
        let cfd = cxen_eventfd(0, Int32(EFD_CLOEXEC))
        guard cfd >= 0 else {
            try? hypervisor.close(port: ch.port)
            hypervisor.unmapGrants(mapping)
            throw .system(call: "eventfd", errno: errno)
        }
        ringMapping = mapping
        ring = BackRing(attaching: shared)
        lastPushed = 0
        channel = ch
        engine = eng
        controlFD = cfd
        usePersistent = persistentGrants
        grants = PersistentGrants(capacity: persistentGrants ? persistentGrantLimit : 0)
        bounceCapacity = Swift.max(BlkifLimits.maxIndirectSegments, persistentGrants ? persistentGrantLimit : 0)
        nslots = n
        slots = .allocate(capacity: n)
        slots.initialize(repeating: SlotState(), count: n)
        iovecs = .allocate(capacity: n * maxSeg)
        iovecs.initialize(repeating: iovec(), count: n * maxSeg)
        pins = .allocate(capacity: n * maxSeg)
        pins.initialize(repeating: 0, count: n * maxSeg)
        segs = .allocate(capacity: maxSeg)
        segs.initialize(repeating: 0, count: maxSeg)
        freeSlots = .allocate(capacity: n)
        for i in 0..<n { (freeSlots + i).initialize(to: Int32(n - 1 - i)) }
        freeCount = n
    }

    deinit {
        if !descriptorsClosed { closeDescriptors() }
        slots.deallocate()
        iovecs.deallocate()
        pins.deallocate()
        segs.deallocate()
        freeSlots.deallocate()
        grants.deallocate()
        if let b = bounce { munmap(b, bounceCapacity * HVLimits.pageSize) }
        bounceFree?.deallocate()
        bounceSegments?.deallocate()
    }

    func start() throws(BlkBackError) {
        var t = pthread_t()
        let box = Unmanaged.passRetained(self as AnyObject)
        let r = pthread_create(&t, nil, { arg in
            let obj = Unmanaged<AnyObject>.fromOpaque(arg!).takeRetainedValue()
            (obj as! LoopRunnable).runLoop()
            return nil
        }, box.toOpaque())
        guard r == 0 else {
            box.release()
            throw .system(call: "pthread_create", errno: r)
        }
        pthread_detach(t)  // nobody joins: the thread reports its end through `exit`
        started = true
    }

    func stop(then finished: @escaping @Sendable () -> Void) {
        guard started else {
            cleanup()
            closeDescriptors()
            finished()
            return
        }
        let now = exit.withLock { s in
            guard !s.released else { return true }
            s.finished = finished
            if !s.ended {
                var one: UInt64 = 1
                _ = write(controlFD, &one, 8)
            }
            return false
        }
        if now { finished() }
    }

    /// The aio context, its eventfd and the control eventfd (the event
    /// channel is closed with its port in ``cleanup()``).
    private func closeDescriptors() {
        descriptorsClosed = true
        engine?.close()
        Glibc.close(controlFD)
    }

    // MARK: The event loop

    @_specialize(exported: false, where R == BlkifRing)
    @_specialize(exported: false, where R == BlkifX86_32Ring)
    func runLoop() {
        DetachedThread.setName("vbd\(frontend)q\(index)")
        var fds = (pollfd(fd: channel.descriptor, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: engine?.eventFD ?? -1, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: controlFD, events: Int16(POLLIN), revents: 0))
        var kicked = false
        // XSA-332: kicks that keep bringing no request mute the channel.
        var storm = KickStormGuard()
        while true {
            var consumed = 0
            if !broken && deferred != nil { retryDeferred() }
            if !broken && !waiting { consumed = processRing() }
            if storm.turn(kicked: kicked, foundWork: consumed > 0, now: monotonicNanoseconds()) {
                BlkStats.bump(stats.spuriousStorms)
            }
            kicked = false  // counted once, whichever way this turn goes on
            if let f = fence, (engine?.inFlight ?? 0) == 0 {
                fence = nil
                if case .draining(let q) = f { runFence(q) }
                continue
            }
            // A deferred request whose pages came free in this turn (io_submit
            // refused what held them: nothing is in flight to wake us) goes now;
            // the guest, whose requests wait behind it, will not kick again.
            if !broken && deferredCanGo { continue }
            pushResponses()
            if persistentMisses > 0 { purgeIfDue() }
            var timeout: Int32 = -1
            if !broken && !waiting {
                do {
                    if try ring.finalCheckForRequests() { timeout = 0 }
                } catch {
                    stopRing(error)
                }
            }
            if timeout < 0 && !broken && disk.busyPollNanoseconds > 0 && spinForWork() { timeout = 0 }
            // A stopped ring is no longer listened to (its kicks would wake us for
            // nothing), nor is a storming one until its mute ends.
            var listen = !broken
            if let left = storm.muted(now: monotonicNanoseconds()) {
                listen = false
                if timeout < 0 { timeout = PollTimeout.milliseconds(left) }
            }
            fds.0.fd = listen ? channel.descriptor : -1
            let r = withUnsafeMutableBytes(of: &fds) { p in
                poll(p.baseAddress!.assumingMemoryBound(to: pollfd.self), 3, timeout)
            }
            if r < 0 && errno != EINTR { break }
            if fds.2.revents != 0 { break }
            if fds.1.revents != 0, let e = engine {
                e.reap(complete)
                // The guest hears of its completions now, not after the next
                // pass's submissions: it prepares its next requests meanwhile.
                pushResponses()
            }
            kicked = fds.0.revents != 0
            if kicked { _ = channel.consume() }
        }
        cleanup()
        exit.withLock { $0.ended = true }
        closeDescriptors()
        let finished = exit.withLock { s in
            s.released = true
            defer { s.finished = nil }
            return s.finished
        }
        finished?()
    }

    /// Every 100 ms while misses happen, up to a tenth of the persistent
    /// grants that went unused for a whole period are unmapped, so a changed
    /// working set gets its turn (Linux: purge_persistent_gnt).
    private func purgeIfDue() {
        let t = monotonicNanoseconds()
        guard t &- lastPurge >= disk.purgeIntervalNanoseconds else { return }
        lastPurge = t
        persistentMisses = 0
        grants.purge(max: Swift.max(1, grants.capacity / 10)) { unmapPersistent($0) }
        grantCount.store(grants.count, ordering: .relaxed)
    }

    /// Busy polling (opt-in): before sleeping, watch the ring's producer index
    /// and the aio completion ring for a bounded time, trading CPU for the
    /// wake-up latency of a sleeping thread. Bounded, so a silent or hostile
    /// frontend costs at most this much per sleep.
    private func spinForWork() -> Bool {
        let until = monotonicNanoseconds() &+ disk.busyPollNanoseconds
        var n = 0
        while true {
            if !waiting, ((try? ring.unconsumedRequests()) ?? 1) > 0 { return true }
            if let e = engine, e.hasCompletions { return true }
            n += 1
            if n & 63 == 0, monotonicNanoseconds() >= until { return false }
        }
    }

    /// Detach: nothing may point into guest pages once they are unmapped.
    private func cleanup() {
        engine?.drain(complete)
        if !broken { pushResponses() }
        grants.removeAll { unmapPersistent($0) }
        grantCount.store(0, ordering: .relaxed)
        hv.unmapGrants(ringMapping)
        try? hv.close(port: channel.port)
    }

    private func unmapPersistent(_ handle: GrantHandle) {
        hv.unmap(handle: handle)
        disk.mappingBudget.give()
    }

    /// A request that waited for bounce pages goes once enough are free, or
    /// once nothing is in flight (then all are: at least a largest request's).
    private var deferredCanGo: Bool {
        guard let (q, _) = deferred else { return false }
        return bounceFreeCount >= q.nrSegments || (engine?.inFlight ?? 0) == 0
    }

    private func retryDeferred() {
        guard deferredCanGo, let (q, dsync) = deferred else { return }
        deferred = nil
        startIO(q, geometry: disk.geometry, dsync: dsync, segmentsCopied: true)
        submitBatch()
    }

    /// Submits what the ring pass queued (one io_submit per chunk); a refused
    /// iocb is answered with its error.
    @inline(__always)
    private func submitBatch() {
        if let e = engine, disk.submitRefusalsForTesting.load(ordering: .relaxed) > 0 {
            let n = e.refuseQueued(disk.submitRefusalsForTesting.load(ordering: .relaxed), errno: EINVAL) { slot, err in
                self.complete(slot: slot, result: -Int(err))
            }
            disk.submitRefusalsForTesting.wrappingSubtract(n, ordering: .relaxed)
        }
        engine?.submit(refused: { slot, err in self.complete(slot: slot, result: -Int(err)) }, completed: complete)
    }

    private func stopRing(_ error: RingError) {
        broken = true
        let why = "\(error)"
        reason.withLock { $0 = why }
        disk.logger.error("\(disk.name) queue \(index): \(why); ring stopped")
    }

    @inline(__always)
    private func pushResponses() {
        guard ring.rspProdPvt != lastPushed else { return }
        lastPushed = ring.rspProdPvt
        if ring.pushResponsesAndCheckNotify() { try? channel.notify() }
    }

    /// Consumes what the ring holds (at most one ring's worth), then submits
    /// the batch (IOEngine.submit).
    @discardableResult
    private func processRing() -> Int {
        var budget = nslots
        while budget > 0 && !waiting {
            let raw: R.Request?
            do {
                raw = try ring.nextRequest()
            } catch {
                stopRing(error)
                break
            }
            guard let raw else { break }
            budget -= 1
            handle(R.decode(raw))
        }
        submitBatch()
        return nslots - budget
    }

    // MARK: Requests

    @inline(__always)
    private func respond(_ id: UInt64, _ op: UInt8, _ status: BlkifStatus) {
        switch status {
        case .okay: break
        case .error: BlkStats.bump(stats.errors)
        case .notSupported: BlkStats.bump(stats.unsupported)
        }
        ring.enqueue(R.response(id: id, operation: op, status: status))
    }

    private func fail(_ q: BlkRequest, _ e: BlkRequestError) {
        disk.logger.debug("\(disk.name) queue \(index): request \(q.id) op \(q.operation) refused: \(e)")
        respond(q.id, q.responseOp, e.status)
    }

    private func handle(_ q: BlkRequest) {
        let cmd = q.command
        switch cmd {
        case .read: BlkStats.bump(stats.readRequests)
        case .write: BlkStats.bump(stats.writeRequests)
        case .flush, .writeBarrier: BlkStats.bump(stats.flushRequests)
        case .discard: BlkStats.bump(stats.discardRequests)
        case .unsupported: break
        }
        let g = disk.geometry
        if let e = q.validateHeader(geometry: g) { return fail(q, e) }
        switch cmd {
        case .read, .write:
            startIO(q, geometry: g, dsync: false)
        case .flush, .writeBarrier:
            if let e = engine, e.inFlight > 0 || e.batchCount > 0 {
                fence = .draining(q)  // drained first; processRing stops consuming behind it
            } else {
                runFence(q)
            }
        case .discard:
            // BLKIF_DISCARD_SECURE "is ignored if discard-secure=0" (blkif.h;
            // Linux's dispatch_discard_io): a plain discard then.
            let e = disk.backing.discard(offset: q.sector << 9, length: q.discardSectors << 9,
                                         secure: q.discardSecure && g.discardSecure)
            if e != 0 {
                fail(q, e == EOPNOTSUPP ? .discardNotSupported : .ioError(e))
            } else {
                respond(q.id, q.responseOp, .okay)
            }
        case .unsupported:
            fail(q, .unknownOperation(q.operation))
        }
    }

    /// FLUSH_DISKCACHE / WRITE_BARRIER, once every earlier request has completed:
    /// the cache is flushed, then the request's own data (if any) is written
    /// with RWF_DSYNC, so the response means durable.
    private func runFence(_ q: BlkRequest) {
        let e = disk.backing.flush()
        if e != 0 { return fail(q, .ioError(e)) }
        if q.nrSegments == 0 { return respond(q.id, q.responseOp, .okay) }
        startIO(q, geometry: disk.geometry, dsync: true)
        submitBatch()
        // Nothing behind a barrier is consumed until its write completed (it
        // is the only I/O in flight: every earlier one drained first).
        if q.command == .writeBarrier, (engine?.inFlight ?? 0) > 0 { fence = .barrierWrite }
    }

    /// READ/WRITE (direct or indirect), or the data of a flush: validates every
    /// segment, maps the pages, and queues one vectored iocb reading or writing
    /// straight into the guest's pages. `segmentsCopied`: `segs` already holds
    /// this request's segment list (a deferred request's: nothing else runs
    /// while it waits), so the guest's pages are not read a second time.
    private func startIO(_ q: BlkRequest, geometry g: DiskGeometry, dsync: Bool, segmentsCopied: Bool = false) {
        let write = q.command != .read
        guard freeCount > 0 else {
            BlkStats.bump(stats.outOfRequests)
            return fail(q, .ioError(EBUSY))
        }
        let n = q.nrSegments
        // 1. The segment list, copied once into our scratch (kept from the
        // first attempt when `segmentsCopied`).
        if !segmentsCopied {
            if q.isIndirect {
                let per = BlkifLimits.segmentsPerIndirectPage
                for p in 0..<q.indirectPages {
                    let gref = q.indirectGref(p)
                    let count = Swift.min(per, n - p * per)
                    guard copyIndirectPage(gref, into: segs + p * per, count: count) else {
                        return fail(q, .grantMapFailed(gref))
                    }
                }
            } else {
                withUnsafeBytes(of: q.directSegments) { b in
                    for i in 0..<n { segs[i] = b.load(fromByteOffset: i * 8, as: UInt64.self) }
                }
            }
        }
        // 2. Validation of the copy.
        var total: UInt64 = 0
        for i in 0..<n {
            let s = BlkSegment(raw: segs[i])
            if let e = q.validate(segment: s, index: i, geometry: g) { return fail(q, e) }
            total &+= UInt64(s.sectors)
        }
        if let e = q.validateRange(totalSectors: total, geometry: g) { return fail(q, e) }

        // 3. Map and describe the pages.
        freeCount -= 1
        let slot = Int(freeSlots[freeCount])
        let sp = slots + slot
        sp.pointee = SlotState(id: q.id, operation: q.responseOp, write: write, sectors: total, bytes: Int(total) << 9)
        let iov = iovecs + slot * maxSeg
        let align = disk.backing.directAlignment - 1
        // O_DIRECT needs the file offset aligned too (a 4 KiB-sector filesystem refuses 512).
        var aligned = Int(truncatingIfNeeded: q.sector << 9) & align == 0
        for i in 0..<n {
            let s = BlkSegment(raw: segs[i])
            guard let page = mapSegment(slot: slot, gref: s.gref, offset: s.byteOffset, length: s.sectors << 9) else {
                release(slot: slot)
                freeSlots[freeCount] = Int32(slot)
                freeCount += 1
                // Every bounce page is in flight: wait for completions. Our
                // copies of the request and of its segment list (`segs`, which
                // no other request touches meanwhile: none is consumed while
                // one waits) are used again; the guest's pages are not re-read.
                if !bounceUnavailable, let e = engine, e.inFlight + e.batchCount > 0 {
                    BlkStats.bump(stats.outOfRequests)
                    deferred = (q, dsync)
                    return
                }
                return fail(q, .ioError(ENOMEM))
            }
            let base = page + s.byteOffset
            let len = s.sectors << 9
            if (Int(bitPattern: base) | len) & align != 0 { aligned = false }
            iov[i] = iovec(iov_base: base, iov_len: len)
        }
        if sp.pointee.bounces > 0 { BlkStats.bump(stats.bouncedSegments, by: UInt64(sp.pointee.bounces)) }
        if write && sp.pointee.bounces > 0, let gref = copyBounces(slot: slot, toGuest: false) {
            release(slot: slot)
            freeSlots[freeCount] = Int32(slot)
            freeCount += 1
            return fail(q, .grantMapFailed(gref))
        }
        guard let engine else {
            // Null mode: the grants were mapped; no disk is touched.
            return complete(slot: slot, result: sp.pointee.bytes)
        }
        let b = disk.backing
        let fd = aligned || !b.isDirect ? b.fd : b.bufferedFD
        engine.queueVector(slot: slot, write: write, fd: fd, iov: iov, count: n, offset: q.sector << 9, dsync: dsync)
    }

    /// An I/O finished (or was refused): release its grants and answer.
    private func complete(slot: Int, result: Int) {
        let sp = slots + slot
        var ok = result == sp.pointee.bytes
        if ok && !sp.pointee.write && sp.pointee.bounces > 0 {
            // Once a stop was asked for, the backend reports Closed without
            // waiting for this read, and the frontend may revoke the pages it
            // was for and grant them again for something else: no data goes
            // to them then. Checked and copied under `exit`, which the stop
            // takes to ask.
            ok = exit.withLock { s in
                // nil: every segment copied; else the guest revoked or broke a
                // grant while its read was in flight.
                s.finished == nil && copyBounces(slot: slot, toGuest: true) == nil
            }
        }
        if ok {
            if sp.pointee.write {
                BlkStats.bump(stats.sectorsWritten, by: sp.pointee.sectors)
            } else {
                BlkStats.bump(stats.sectorsRead, by: sp.pointee.sectors)
            }
        } else {
            disk.logger.debug("\(disk.name) queue \(index): I/O of request \(sp.pointee.id) returned \(result)")
        }
        release(slot: slot)
        respond(sp.pointee.id, sp.pointee.operation, ok ? .okay : .error)
        freeSlots[freeCount] = Int32(slot)
        freeCount += 1
    }

    private func release(slot: Int) {
        let sp = slots + slot
        let base = slot * maxSeg
        for i in 0..<Int(sp.pointee.pins) { grants.release(pins[base + i]) }
        if let segs = bounceSegments, let free = bounceFree {
            for i in 0..<Int(sp.pointee.bounces) {
                free[bounceFreeCount] = segs[base + i].page
                bounceFreeCount += 1
            }
        }
        sp.pointee.pins = 0
        sp.pointee.bounces = 0
    }

    // MARK: Bounce pages

    /// A free bounce page for the next segment of `slot` (recorded for its
    /// grant copy), or nil when none is left.
    @inline(__always)
    private func bounceSegment(slot: Int, gref: GrantRef, offset: Int, length: Int) -> UnsafeMutableRawPointer? {
        if bounce == nil && bounceCapacity > 0 && !bounceUnavailable { setUpBounce() }
        guard let b = bounce, let segs = bounceSegments, let free = bounceFree, bounceFreeCount > 0 else { return nil }
        bounceFreeCount -= 1
        let page = free[bounceFreeCount]
        let sp = slots + slot
        segs[slot * maxSeg + Int(sp.pointee.bounces)] = BounceSegment(gref: gref, offset: UInt16(offset), length: UInt16(length), page: page)
        sp.pointee.bounces += 1
        return b + Int(page) * HVLimits.pageSize + offset
    }

    /// The pool, at the first overflow of the persistent set: address space
    /// only until pages are used (MAP_NORESERVE).
    private func setUpBounce() {
        let size = bounceCapacity * HVLimits.pageSize
        guard let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
              p != MAP_FAILED else {
            bounceUnavailable = true
            return
        }
        bounce = p
        let free = UnsafeMutablePointer<Int32>.allocate(capacity: bounceCapacity)
        for i in 0..<bounceCapacity { (free + i).initialize(to: Int32(bounceCapacity - 1 - i)) }
        bounceFree = free
        bounceFreeCount = bounceCapacity
        let segs = UnsafeMutablePointer<BounceSegment>.allocate(capacity: nslots * maxSeg)
        segs.initialize(repeating: BounceSegment(), count: nslots * maxSeg)
        bounceSegments = segs
        copyOps.reserveCapacity(maxSeg)
    }

    /// Grant-copies `slot`'s bounce segments to the guest's pages (a READ's
    /// data) or from them (a WRITE's); the ref that failed, or nil.
    private func copyBounces(slot: Int, toGuest: Bool) -> GrantRef? {
        guard let b = bounce, let segs = bounceSegments else { return nil }
        copyOps.removeAll(keepingCapacity: true)
        let base = slot * maxSeg
        for i in 0..<Int(slots[slot].bounces) {
            let seg = segs[base + i]
            let local = GrantCopyEnd.local(b + Int(seg.page) * HVLimits.pageSize + Int(seg.offset))
            let guest = GrantCopyEnd.grant(domid: frontend, ref: seg.gref, offset: seg.offset)
            copyOps.append(GrantCopy(source: toGuest ? local : guest, dest: toGuest ? guest : local, length: seg.length))
        }
        hv.copyGrants(&copyOps)
        for (i, op) in copyOps.enumerated() where op.status != .okay { return segs[base + i].gref }
        return nil
    }

    // MARK: Grants

    /// The page of `gref` for one segment of `slot`: a persistent grant (kept
    /// mapped, read-write) when the frontend negotiated them and there is room
    /// in the set and in the process's budget; otherwise a bounce page, the
    /// data moving by grant copy (which checks the grant as Xen's
    /// GNTTABOP_copy does), or nil when every bounce page is in flight.
    @inline(__always)
    private func mapSegment(slot: Int, gref: GrantRef, offset: Int, length: Int) -> UnsafeMutableRawPointer? {
        if usePersistent {
            let base = slot * maxSeg
            if let i = grants.lookup(gref) {
                pins[base + Int(slots[slot].pins)] = i
                slots[slot].pins += 1
                return grants.base(i)
            }
            if grants.canInsert, disk.mappingBudget.take() {
                if case .success(let m) = hv.mapGrant(domid: frontend, ref: gref, writable: true) {
                    let p = pointer(of: m)
                    if let i = grants.insert(gref: gref, handle: m.handle, base: p) {
                        grantCount.store(grants.count, ordering: .relaxed)
                        pins[base + Int(slots[slot].pins)] = i
                        slots[slot].pins += 1
                        return p
                    }
                    hv.unmapGrant(m)
                }
                disk.mappingBudget.give()
            }
            persistentMisses &+= 1
        }
        guard let p = bounceSegment(slot: slot, gref: gref, offset: offset, length: length) else { return nil }
        return p - offset  // counted per request, in startIO
    }

    /// The mapped page's address, for iovecs. Sound to keep: the page stays
    /// mapped until this queue unmaps its handle, which it does only after the
    /// I/O using it has completed; iovec ranges are within the page because
    /// `last_sect <= 7` was checked.
    @inline(__always)
    private func pointer(of m: GrantMapping) -> UnsafeMutableRawPointer {
        (try? m.region.withUnsafeBytes(offset: 0, count: m.region.count) { UnsafeMutableRawPointer(mutating: $0.baseAddress!) })!
    }

    /// Copies `count` segment descriptors out of an indirect page (read once,
    /// XSA-155): from the persistent mapping, or by grant copy (nothing mapped).
    private func copyIndirectPage(_ gref: GrantRef, into dst: UnsafeMutablePointer<UInt64>, count: Int) -> Bool {
        if usePersistent, let i = grants.lookup(gref) {
            cxen_copy_from_shared(dst, grants.base(i), count * 8)
            grants.release(i)
            return true
        }
        copyOps.removeAll(keepingCapacity: true)
        copyOps.append(GrantCopy(source: .grant(domid: frontend, ref: gref, offset: 0),
                                 dest: .local(UnsafeMutableRawPointer(dst)), length: UInt16(count * 8)))
        hv.copyGrants(&copyOps)
        return copyOps[0].status == .okay
    }
}

