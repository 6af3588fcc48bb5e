import CXen
import Dispatch
import Glibc
import Logging
import Synchronization
import XenHV
import XenRing

/// How the frontend connected: what the XenBus handshake reads from the
/// frontend's directory (ring-ref / ring-ref0..N, ring-page-order,
/// event-channel, protocol, feature-persistent, multi-queue-num-queues with
/// queue-N/ subdirectories).
public struct FrontendConfig: Sendable {
    /// `frontend-id`.
    public var domid: DomID
    /// `protocol` (missing: native).
    public var abi: BlkifABI
    /// One entry per queue; each has `1 << ring-page-order` ring refs.
    public var queues: [QueueRingConfig]
    /// `feature-persistent` of the frontend (and ours).
    public var persistentGrants: Bool
    /// Persistent grants kept per ring (Linux `max_persistent_grants`).
    public var persistentGrantLimit: Int

    public init(domid: DomID, abi: BlkifABI = .x86_64, queues: [QueueRingConfig], persistentGrants: Bool = true,
                persistentGrantLimit: Int = BlkifLimits.persistentGrantsPerRing) {
        self.domid = domid
        self.abi = abi
        self.queues = queues
        self.persistentGrants = persistentGrants
        self.persistentGrantLimit = persistentGrantLimit
    }

    /// `ring-page-order` implied by the first queue's ring refs.
    public var ringPageOrder: Int { (queues.first?.ringRefs.count ?? 1).trailingZeroBitCount }
}

/// What the backend advertises in XenBus (InitWait, then Connected).
public struct BackendFeatures: Sendable, Equatable {
    public var maxIndirectSegments = BlkifLimits.maxIndirectSegments
    public var maxRingPageOrder = BlkifLimits.maxRingPageOrder
    public var maxQueues: Int
    public var flushCache = true
    /// WRITE_BARRIER is served (drain + flush + FUA write).
    public var barrier = true
    public var persistent = true
    public var discard: Bool
    public var discardGranularity: Int
    public var discardAlignment = 0
    public var discardSecure: Bool
    /// `sectors`, in 512-byte units.
    public var sectors: UInt64
    public var sectorSize: Int
    public var physicalSectorSize: Int
    /// `info`: VDISK_READONLY (4) when read-only.
    public var info: UInt32
}

/// A virtual block device: one disk of one guest, served through one or
/// more queues (rings). Create it when the toolstack names the backing
/// (`params`, `mode`), ``connect(hypervisor:frontend:)`` when the frontend is
/// Initialised, ``disconnect()`` when it closes (or to reconnect later), and
/// ``close()`` when the device is removed. A daemon serving many guests from
/// one thread uses ``stopQueues()`` and ``closeWhenStopped()`` instead, which
/// do not wait for the guest's I/O in flight.
public final class VirtualBlockDevice: @unchecked Sendable {
    // Sound: `Connections` is behind `state`; the rest is immutable, atomic
    // (DiskState.capacity) or a DispatchGroup.
    public let name: String
    let disk: DiskState
    private struct Connections {
        var queues: [any QueueRunner] = []
        /// Queues told to stop whose threads still finish their I/O in flight.
        var stopping: [any QueueRunner] = []
        /// Counters of the queues that ended.
        var retired = BlkStats.Snapshot()
        /// ``closeWhenStopped()`` was called: the last stopping queue closes the backing.
        var closeWhenStopped = false
        var closed = false
    }
    private let state = Mutex(Connections())
    /// One member per stopping queue.
    private let stoppingQueues = DispatchGroup()
    /// Queues one device may have (`multi-queue-max-queues`); Linux: dom0 CPUs.
    public let maxQueues: Int
    /// The image's file or block device (st_dev, st_ino); nil in null mode.
    public let image: ImageIdentity?

    /// Opens the backing store. `name` appears in log lines (e.g. "vbd-5-51712").
    /// `busyPollMicroseconds` > 0 makes each queue spin that long for new
    /// requests or completions before sleeping (lower latency, more CPU).
    /// Persistent grants come out of `mappingBudget` (the process's by
    /// default); unused ones are purged every `purgeIntervalMilliseconds`
    /// while misses happen.
    public init(name: String, backing: BackingOptions, maxQueues: Int = HVLimits.onlineCPUs,
                busyPollMicroseconds: Int = 0, mappingBudget: MappingBudget = .process,
                purgeIntervalMilliseconds: Int = 100, logger: Logger = Logger(label: "blkback")) throws(BlkBackError) {
        self.name = name
        self.maxQueues = Swift.max(1, maxQueues)
        let b = try Backing(backing, logger: logger)
        var st = stat()
        image = b.kind != .null && fstat(b.fd, &st) == 0 ? ImageIdentity(device: UInt64(st.st_dev), inode: UInt64(st.st_ino)) : nil
        disk = DiskState(name: name, backing: b, sectors: try b.sectors(), busyPollMicroseconds: busyPollMicroseconds,
                         mappingBudget: mappingBudget, purgeIntervalMilliseconds: purgeIntervalMilliseconds,
                         logger: logger)
    }

    /// Capacity in 512-byte sectors.
    public var sectors: UInt64 { disk.capacity.load(ordering: .relaxed) }
    public var readOnly: Bool { disk.backing.readOnly }
    /// Whether the image was opened O_DIRECT (false: buffered fallback or null mode).
    public var usesDirectIO: Bool { disk.backing.isDirect }
    public var isNull: Bool { disk.backing.kind == .null }
    public var geometry: DiskGeometry { disk.geometry }

    public var features: BackendFeatures {
        let b = disk.backing
        return BackendFeatures(
            maxQueues: maxQueues, discard: b.discard, discardGranularity: b.sectorSize,
            discardSecure: b.discardSecure, sectors: sectors, sectorSize: b.sectorSize,
            physicalSectorSize: b.sectorSize, info: b.readOnly ? UInt32(VDISK_READONLY) : 0)
    }

    public var isConnected: Bool { state.withLock { !$0.queues.isEmpty } }

    /// Whether queues of an earlier connection still finish their I/O in
    /// flight (``connect(hypervisor:frontend:)`` refuses to connect meanwhile).
    public var isStopping: Bool { state.withLock { !$0.stopping.isEmpty } }

    /// Maps every queue's ring, binds its event channel and starts its thread.
    /// All or nothing: on failure, whatever was set up is released.
    public func connect(hypervisor: Hypervisor, frontend: FrontendConfig) throws(BlkBackError) {
        guard !frontend.queues.isEmpty, frontend.queues.count <= maxQueues else {
            throw .badConfiguration("\(frontend.queues.count) queues (at most \(maxQueues))")
        }
        let pages = frontend.queues[0].ringRefs.count
        guard frontend.queues.allSatisfy({ $0.ringRefs.count == pages }) else {
            throw .badConfiguration("queues with different ring sizes")
        }
        guard !state.withLock({ $0.closeWhenStopped }) else { throw .badConfiguration("\(name) is closed") }
        guard !isConnected else { throw .badConfiguration("\(name) is already connected") }
        // The old rings' I/O may still write into the guest's pages and answer
        // on its old ring (Linux: xen_blkif_disconnect's -EBUSY, "pending I/O").
        guard !isStopping else { throw .pendingIO }
        var made: [any QueueRunner] = []
        do throws(BlkBackError) {
            for (i, q) in frontend.queues.enumerated() {
                let runner: any QueueRunner
                switch frontend.abi {
                case .x86_64:
                    runner = try BlkQueue<BlkifRing>(
                        index: i, hypervisor: hypervisor, frontend: frontend.domid, disk: disk, ring: q,
                        persistentGrants: frontend.persistentGrants, persistentGrantLimit: frontend.persistentGrantLimit)
                case .x86_32:
                    runner = try BlkQueue<BlkifX86_32Ring>(
                        index: i, hypervisor: hypervisor, frontend: frontend.domid, disk: disk, ring: q,
                        persistentGrants: frontend.persistentGrants, persistentGrantLimit: frontend.persistentGrantLimit)
                }
                made.append(runner)
            }
            for r in made { try r.start() }
        } catch {
            retire(made)
            throw error
        }
        state.withLock { $0.queues = made }
        disk.logger.info("\(name): connected to domain \(frontend.domid), \(made.count) queue(s) of \(pages) page(s), \(frontend.abi.rawValue)")
    }

    /// Stops every queue and waits for them: their in-flight I/O, then every
    /// ring page and persistent grant unmapped, every event channel and aio
    /// context closed. The backing stays open (the frontend may reconnect).
    public func disconnect() {
        stopQueues()
        stoppingQueues.wait()
    }

    /// Stops every queue without waiting for the guest's I/O in flight (a
    /// guest on slow storage would hold whoever called): each queue's thread
    /// finishes it and then releases its ring, grants, port and aio context,
    /// as Linux's xen_blkif_disconnect leaves a ring with I/O in flight to its
    /// last completion. ``whenStopped(_:)`` tells when they all have.
    public func stopQueues() {
        let qs = state.withLock { s in
            defer { s.queues = [] }
            return s.queues
        }
        retire(qs)
        if !qs.isEmpty { disk.logger.info("\(name): disconnected") }
    }

    private func retire(_ qs: [any QueueRunner]) {
        guard !qs.isEmpty else { return }
        state.withLock { $0.stopping += qs }
        for q in qs {
            stoppingQueues.enter()
            q.stop { [self] in queueStopped(q) }
        }
    }

    private func queueStopped(_ q: any QueueRunner) {
        let close = state.withLock { s in
            s.stopping.removeAll { $0 === q }
            s.retired = s.retired + q.stats.snapshot
            guard s.stopping.isEmpty, s.closeWhenStopped, !s.closed else { return false }
            s.closed = true
            return true
        }
        if close { disk.backing.close() }
        stoppingQueues.leave()
    }

    /// Calls `body` (on a global queue) once no queue is stopping: at once if none is.
    public func whenStopped(_ body: @escaping @Sendable () -> Void) {
        stoppingQueues.notify(queue: .global(), execute: body)
    }

    /// Removes the device: disconnects, waits for the queues, closes the image.
    public func close() {
        disconnect()
        closeWhenStopped()
    }

    /// Removes the device without waiting: stops its queues, and closes the
    /// image once the last of them has finished its I/O (never under it:
    /// its descriptor number could be another disk's by then).
    public func closeWhenStopped() {
        stopQueues()
        let now = state.withLock { s in
            guard !s.closed else { return false }
            s.closeWhenStopped = true
            guard s.stopping.isEmpty else { return false }
            s.closed = true
            return true
        }
        if now { disk.backing.close() }
    }

    /// Online resize: re-reads the backing size; new requests see it at once.
    /// Returns the new capacity (the handshake writes it to `sectors`).
    @discardableResult
    public func resize() throws(BlkBackError) -> UInt64 {
        let s = try disk.backing.sectors()
        disk.capacity.store(s, ordering: .relaxed)
        disk.logger.info("\(name): capacity now \(s) sectors")
        return s
    }

    /// ``resize()`` when the backing's size changed (Linux's blkif thread
    /// compares vbd_sz with the size it has); nil when it did not.
    public func resizeIfChanged() -> UInt64? {
        guard let s = try? disk.backing.sectors(), s != disk.capacity.load(ordering: .relaxed) else { return nil }
        return try? resize()
    }

    /// Counters summed over all queues, past connections included.
    public var stats: BlkStats.Snapshot {
        state.withLock { s in (s.queues + s.stopping).reduce(s.retired) { $0 + $1.stats.snapshot } }
    }

    /// Per-queue: why a queue stopped serving (a protocol violation), or nil.
    public var stoppedQueues: [Int: String] {
        state.withLock { s in
            var out: [Int: String] = [:]
            for q in s.queues { if let r = q.stoppedReason { out[q.index] = r } }
            return out
        }
    }

    /// Every descriptor the device holds now: the backing's and each queue's
    /// (for tests; a stopping queue's and a closing backing's may be closed
    /// by the time they are looked at).
    var descriptorsForTesting: [CInt] {
        let b = disk.backing
        var fds = b.kind == .null ? [] : (b.fd == b.bufferedFD ? [b.fd] : [b.fd, b.bufferedFD])
        state.withLock { s in for q in s.queues + s.stopping { fds += q.descriptors } }
        return fds
    }

    /// Each queue's event-channel descriptor (for tests).
    var channelDescriptorsForTesting: [CInt] { state.withLock { $0.queues.map(\.channelDescriptor) } }

    /// Each queue's aio context (for tests).
    var aioContextsForTesting: [UInt] { state.withLock { $0.queues.compactMap(\.aioContext) } }

    /// Persistent grants kept, summed over queues.
    public var persistentGrants: Int { state.withLock { $0.queues.reduce(0) { $0 + $1.persistentGrantCount } } }

    deinit {
        // Nothing is stopping (a stopping queue's callback holds the device):
        // stop what is connected, with callbacks that do not hold it.
        let stopped = DispatchGroup()
        for q in state.withLock({ $0.queues }) {
            stopped.enter()
            q.stop { stopped.leave() }
        }
        stopped.wait()
        if !state.withLock({ $0.closed }) { disk.backing.close() }
    }
}

/// Which file or block device an image is (st_dev, st_ino): two devices on
/// one image are told apart from two images under one path.
public struct ImageIdentity: Hashable, Sendable {
    public let device: UInt64
    public let inode: UInt64
}
