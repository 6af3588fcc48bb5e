import CLibAIO
import CXen
import Dispatch
import Logging
import Synchronization
import XenBus
import XenHV
import XenStore

/// blkback's part of the XenBus handshake (Linux's xen-blkback/xenbus.c),
/// driven by ``XenBusBackend``:
///
/// 1. probe: the toolstack's keys (params, mode, discard-enable) open the disk;
///    the backend offers feature-max-indirect-segments, max-ring-page-order,
///    multi-queue-max-queues and feature-persistent (then InitWait);
/// 2. connect: the frontend's ring-ref(s), ring-page-order, event-channel(s),
///    queue-N/ directories and protocol are read and checked, the rings
///    mapped, and sectors, info, sector-size, physical-sector-size and the
///    flush/barrier/discard features written (then Connected);
/// 3. disconnect on Closing/Closed; remove when the directory goes.
///
/// Neither waits for the guest's I/O in flight (one guest's slow storage
/// would hold every other guest's handshakes on the backend's one queue):
/// the queues finish it on their own threads, as Linux's
/// xen_blkif_disconnect leaves the rest to the last completion. A frontend
/// reconnecting meanwhile, or another device of the same image (a detach and
/// attach), is connected once they have, so no old write lands after a new
/// one; Linux instead fails a reconnect with I/O pending ("pending I/O") and
/// does not look at other devices.
public final class BlkbackDriver: XenBusBackendDriver, @unchecked Sendable {
    // Sound: the backend's queue makes every call but started(recheck:)
    // and drain(); what they and the queues' threads share is behind Mutexes
    // or in a DispatchGroup.
    public let type = "vbd"
    let hv: Hypervisor
    let logger: Logger
    /// One member per device whose queues are stopping.
    private let stopping = DispatchGroup()
    /// Those devices, by image: a device of the same image waits for them.
    private let stoppingDevices = Mutex<[ObjectIdentifier: VirtualBlockDevice]>([:])
    /// The backend's ``started(recheck:)``, and the waits armed for it
    /// (backend path, stopping device).
    private let recheck = Mutex<(@Sendable (String) -> Void)?>(nil)
    private let recheckArmed = Mutex<Set<RecheckKey>>([])
    private struct RecheckKey: Hashable { let path: String; let device: ObjectIdentifier }

    public init(hypervisor: Hypervisor, logger: Logger) {
        hv = hypervisor
        self.logger = logger
    }

    public func probe(_ dev: XenBusDevice, frontendPath: String, xs: XenBusClient) throws -> VirtualBlockDevice? {
        let path = dev.backendPath
        // The toolstack writes its keys in one transaction, or one by one:
        // wait for both (Linux's backend_changed reads `mode` before it opens
        // anything), so a disk is never opened writable for want of its mode.
        guard let params = try xs.readIfExists(path + "/params"),
              let mode = try xs.readIfExists(path + "/mode") else { return nil }
        let discard = (try xs.readIfExists(path + "/discard-enable")) ?? "1"
        let device = try VirtualBlockDevice(
            name: "vbd\(dev.frontendDomid).\(dev.devid)",
            backing: BackingOptions(path: params, readOnly: !mode.contains("w"), discard: discard != "0"),
            logger: logger)
        let f = device.features
        try xs.transaction { t in
            try t.write(path + "/feature-max-indirect-segments", "\(f.maxIndirectSegments)")
            try t.write(path + "/max-ring-page-order", "\(f.maxRingPageOrder)")
            try t.write(path + "/multi-queue-max-queues", "\(f.maxQueues)")
            try t.write(path + "/feature-persistent", f.persistent ? "1" : "0")
            try t.write(path + "/hotplug-status", "connected")
        }
        logger.info("\(path): \(params) (\(mode)) waiting for the frontend")
        return device
    }

    public func started(recheck: @escaping @Sendable (String) -> Void) {
        self.recheck.withLock { $0 = recheck }
    }

    /// A frontend reconnecting while its previous connection's I/O is still
    /// in flight, or while another device of the same image finishes its
    /// own, connects once that has finished (one recheck per wait).
    public func connectDeferred(_ device: VirtualBlockDevice, _ dev: XenBusDevice) -> Bool {
        let busy: VirtualBlockDevice? = device.isStopping ? device : device.image.flatMap { image in
            stoppingDevices.withLock { $0.values.first { $0 !== device && $0.image == image && $0.isStopping } }
        }
        guard let busy else { return false }
        let path = dev.backendPath
        let key = RecheckKey(path: path, device: ObjectIdentifier(busy))
        if recheckArmed.withLock({ $0.insert(key).inserted }) {
            logger.info("\(path): the frontend connects once \(busy === device ? "the previous connection's" : "\(busy.name)'s") I/O in flight has finished")
            busy.whenStopped { [self] in
                recheckArmed.withLock { _ = $0.remove(key) }
                recheck.withLock { $0 }?(path)
            }
        }
        return true
    }

    public func connect(_ device: VirtualBlockDevice, _ dev: XenBusDevice, frontendPath: String, xs: XenBusClient) throws {
        _ = device.resizeIfChanged()  // grown or shrunk while no frontend was connected
        try device.connect(hypervisor: hv, frontend: try readRings(device, dev, frontendPath, xs))
        let f = device.features
        let path = dev.backendPath
        try xs.transaction { t in
            try t.write(path + "/sectors", "\(device.sectors)")
            try t.write(path + "/info", "\(f.info)")
            try t.write(path + "/sector-size", "\(f.sectorSize)")
            try t.write(path + "/physical-sector-size", "\(f.physicalSectorSize)")
            try t.write(path + "/feature-flush-cache", f.flushCache ? "1" : "0")
            try t.write(path + "/feature-barrier", f.barrier ? "1" : "0")
            try t.write(path + "/feature-discard", f.discard ? "1" : "0")
            if f.discard {
                try t.write(path + "/discard-granularity", "\(f.discardGranularity)")
                try t.write(path + "/discard-alignment", "\(f.discardAlignment)")
                try t.write(path + "/discard-secure", f.discardSecure ? "1" : "0")
            }
        }
    }

    /// Online resize (Linux's xen_vbd_resize): a connected disk whose image or
    /// device changed size gets its new `sectors`, and its state written
    /// again so the frontend looks (blkfront re-reads the size on it).
    public var ticks: Bool { true }
    public func tick(_ device: VirtualBlockDevice, _ dev: XenBusDevice, xs: XenBusClient) {
        guard device.isConnected else { return }
        let old = device.sectors
        guard let new = device.resizeIfChanged() else { return }
        let path = dev.backendPath
        try? xs.transaction { t in
            guard let state = try t.readIfExists(path + "/state") else { return }
            try t.write(path + "/sectors", "\(new)")
            try t.write(path + "/state", state)
        }
        logger.info("\(path): resized from \(old) to \(new) sectors")
    }

    public func disconnect(_ device: VirtualBlockDevice) {
        guard device.isConnected else { return }  // nothing to stop (a state storm calls this often)
        stop(device)
    }

    public func remove(_ device: VirtualBlockDevice, _ dev: XenBusDevice) {
        stop(device, thenClose: true)
    }

    /// Stops the device's queues (and closes it) without waiting; ``drain()`` waits.
    private func stop(_ device: VirtualBlockDevice, thenClose close: Bool = false) {
        let id = ObjectIdentifier(device)
        stoppingDevices.withLock { $0[id] = device }
        if close { device.closeWhenStopped() } else { device.stopQueues() }
        stopping.enter()
        device.whenStopped { [self] in
            stoppingDevices.withLock { if $0[id]?.isStopping == false { $0[id] = nil } }
            // A queue's per-slot arrays (a few hundred KiB) are freed by now;
            // glibc keeps freed heap in its arenas unless asked, so a daemon
            // that attaches and detaches for weeks would hold its high-water mark.
            _ = clibaio_malloc_trim()
            stopping.leave()
        }
    }

    /// Waits for every device's queues to finish (daemon shutdown).
    public func drain() { stopping.wait() }

    /// Linux blkback's statistics (oo_req, rd_req, wr_req, f_req, ds_req, rd_sect, wr_sect) and ours.
    public func counters(_ device: VirtualBlockDevice) -> [(String, UInt64)] {
        let s = device.stats
        return [("oo_req", s.outOfRequests), ("rd_req", s.readRequests), ("wr_req", s.writeRequests),
                ("f_req", s.flushRequests), ("ds_req", s.discardRequests), ("rd_sect", s.sectorsRead),
                ("wr_sect", s.sectorsWritten), ("errors", s.errors), ("unsupported", s.unsupported),
                ("event_storms", s.spuriousStorms), ("persistent_grants", UInt64(device.persistentGrants)),
                ("bounced_segments", s.bouncedSegments)]
    }

    /// Reads and checks the frontend's ring keys (blkif.h), single or multi-queue.
    func readRings(_ device: VirtualBlockDevice, _ dev: XenBusDevice, _ fe: String, _ xs: XenBusClient) throws -> FrontendConfig {
        // Each key is read once: what the frontend writes meanwhile is not seen twice.
        func parse(_ key: String, _ s: String) throws -> UInt32 {
            guard let n = UInt32(s) else { throw BlkBackError.badConfiguration("\(key) is '\(s)', not a number") }
            return n
        }
        func number(_ key: String) throws -> UInt32 { try parse(key, try xs.read(key)) }
        // Linux's connect_ring: a `ring-page-order` present, even 0, means the
        // refs are ring-ref0..N (multi_ref); absent, the one ring-ref.
        let orderKey = try xs.readIfExists(fe + "/ring-page-order")
        let order = try orderKey.map { try parse(fe + "/ring-page-order", $0) } ?? 0
        guard order <= UInt32(BlkifLimits.maxRingPageOrder) else {
            throw BlkBackError.badConfiguration("ring-page-order \(order) above \(BlkifLimits.maxRingPageOrder)")
        }
        let queues = try xs.readIfExists(fe + "/multi-queue-num-queues").map { try parse(fe + "/multi-queue-num-queues", $0) } ?? 1
        guard queues >= 1, Int(queues) <= device.maxQueues else {
            throw BlkBackError.badConfiguration("multi-queue-num-queues \(queues) (at most \(device.maxQueues))")
        }
        func ring(in dir: String) throws -> QueueRingConfig {
            let refs: [GrantRef] = orderKey == nil
                ? [try number(dir + "/ring-ref")]
                : try (0..<(1 << order)).map { try number(dir + "/ring-ref\($0)") }
            return QueueRingConfig(ringRefs: refs, eventChannel: try number(dir + "/event-channel"))
        }
        let rings = queues == 1 ? [try ring(in: fe)] : try (0..<queues).map { try ring(in: fe + "/queue-\($0)") }
        // Missing or empty: native, as Linux's connect_ring ("unspecified,
        // assuming default").
        let proto = try xs.readIfExists(fe + "/protocol")
        guard let abi = BlkifABI(protocolName: proto) else {
            throw BlkBackError.badConfiguration("unknown protocol '\(proto ?? "")'")
        }
        // Any non-zero number, as xenbus_read_unsigned reads it.
        let persistent = (try xs.readIfExists(fe + "/feature-persistent")).flatMap { UInt32($0) }.map { $0 != 0 } ?? false
        return FrontendConfig(domid: XenHV.DomID(dev.frontendDomid), abi: abi, queues: rings, persistentGrants: persistent)
    }
}

/// blkback as a XenBus backend service.
public typealias BlkbackService = XenBusBackend<BlkbackDriver>

extension XenBusBackend where Driver == BlkbackDriver {
    public convenience init(hypervisor: Hypervisor, xenbus: XenBusClient, logger: Logger) {
        self.init(xenbus: xenbus, driver: BlkbackDriver(hypervisor: hypervisor, logger: logger), logger: logger)
    }
}
