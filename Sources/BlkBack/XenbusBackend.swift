import CXen
import Dispatch
import Logging
import XenBus
import XenHV
import XenStore

/// blkback's XenBus side (Linux's xen-blkback/xenbus.c): watches
/// /local/domain/0/backend/vbd, opens each device the toolstack writes there,
/// and runs the blkif.h handshake with its frontend:
///
/// 1. the toolstack's keys (params, mode, device-type, discard-enable) open the
///    disk; the backend writes what it offers (feature-max-indirect-segments,
///    max-ring-page-order, multi-queue-max-queues, feature-persistent) and
///    switches to InitWait;
/// 2. when the frontend is Initialised (or Connected), its ring-ref(s),
///    ring-page-order, event-channel(s), queue-N/ directories and protocol are
///    read and checked, the rings mapped, and sectors, info, sector-size,
///    physical-sector-size and the flush/barrier/discard features written
///    before Connected;
/// 3. frontend Closing/Closed disconnects (every mapping and port released);
///    Closed -> Initialising is a reconnect; the backend directory's removal
///    detaches the device.
///
/// Events are handled one at a time on a serial queue; each device's data path
/// runs on its own queue threads.
public final class BlkbackService: @unchecked Sendable {
    // Sound: `devices` and every device's state are touched only on `queue`.
    let hv: Hypervisor
    let xs: XenBusClient
    let logger: Logger
    let queue = DispatchQueue(label: "blkback-xenbus")
    let root = XenBusDevice.backendRoot(type: "vbd")
    var devices: [String: Vbd] = [:]
    var rootWatch: XenBusWatch?

    final class Vbd {
        let path: String
        let frontendDomid: XenHV.DomID
        var frontendPath = ""
        var device: VirtualBlockDevice?
        var frontendWatch: XenBusWatch?
        init(path: String, frontendDomid: XenHV.DomID) {
            self.path = path
            self.frontendDomid = frontendDomid
        }
    }

    public init(hypervisor: Hypervisor, xenbus: XenBusClient, logger: Logger) {
        hv = hypervisor
        xs = xenbus
        self.logger = logger
    }

    /// Starts watching the backend directory (the first event rescans all).
    public func start() throws {
        rootWatch = try xs.watch(root, token: "blkback") { [weak self] e in
            guard let self else { return }
            self.queue.async { self.changed(e.path) }
        }
    }

    /// Returns once every watch event xenstored sent before now has been
    /// handled: a round trip on our connection (events precede the reply on
    /// the wire), then a pass through the event queue.
    public func settle() {
        _ = try? xs.exists("/")
        queue.sync {}
    }

    /// Devices currently open, by backend path.
    public var deviceNames: [String] { queue.sync { devices.keys.sorted() } }

    /// Detaches everything (daemon shutdown): rings unmapped, files closed.
    public func stop() {
        queue.sync {
            for (_, v) in devices { teardown(v, state: nil) }
            devices.removeAll()
        }
    }

    /// A path under the backend root changed: reconcile the device it belongs to,
    /// or every device on the root's own event.
    func changed(_ path: String) {
        let rel = path.hasPrefix(root) ? path.dropFirst(root.count).split(separator: "/") : []
        if rel.count < 2 {
            rescan()
            return
        }
        reconcile(root + "/" + rel[0] + "/" + rel[1])
    }

    func rescan() {
        var seen = Set<String>()
        for fe in (try? xs.directory(root)) ?? [] {
            for dev in (try? xs.directory(root + "/" + fe)) ?? [] {
                let p = root + "/" + fe + "/" + dev
                seen.insert(p)
                reconcile(p)
            }
        }
        for (p, v) in devices where !seen.contains(p) {
            teardown(v, state: nil)
            devices.removeValue(forKey: p)
        }
    }

    func reconcile(_ path: String) {
        guard (try? xs.exists(path)) == true else {
            if let v = devices.removeValue(forKey: path) {
                logger.info("\(path): removed by the toolstack")
                teardown(v, state: nil)
            }
            return
        }
        if let v = devices[path] {
            frontendChanged(v)
            return
        }
        guard let d = XenBusDevice(backendPath: path), d.frontendDomid < UInt32(HVLimits.firstReservedDomID) else { return }
        // Wait for the toolstack's keys (it writes them in one transaction).
        guard let params = try? xs.readIfExists(path + "/params"), let fe = try? xs.readIfExists(path + "/frontend") else { return }
        let v = Vbd(path: path, frontendDomid: XenHV.DomID(d.frontendDomid))
        devices[path] = v
        v.frontendPath = fe
        do {
            let mode = (try xs.readIfExists(path + "/mode")) ?? "w"
            let discard = (try xs.readIfExists(path + "/discard-enable")) ?? "1"
            let device = try VirtualBlockDevice(
                name: "vbd\(d.frontendDomid).\(d.devid)",
                backing: BackingOptions(path: params, readOnly: !mode.contains("w"), discard: discard != "0"),
                logger: logger)
            v.device = device
            let f = device.features
            try xs.transaction { t in
                try t.write(path + "/feature-max-indirect-segments", "\(f.maxIndirectSegments)")
                try t.write(path + "/max-ring-page-order", "\(f.maxRingPageOrder)")
                try t.write(path + "/multi-queue-max-queues", "\(f.maxQueues)")
                try t.write(path + "/feature-persistent", f.persistent ? "1" : "0")
                try t.write(path + "/hotplug-status", "connected")
            }
            try xs.switchState(at: path, to: .initWait)
            v.frontendWatch = try xs.watch(fe + "/state", token: "blkback:" + path) { [weak self] _ in
                guard let self else { return }
                self.queue.async { if let v = self.devices[path] { self.frontendChanged(v) } }
            }
            logger.info("\(path): \(params) (\(mode)) waiting for the frontend")
        } catch {
            fatal(v, "opening \(params): \(error)")
        }
    }

    /// The frontend's state moved: act as Linux's frontend_changed does.
    func frontendChanged(_ v: Vbd) {
        guard let device = v.device else { return }
        let fe = (try? xs.state(at: v.frontendPath)) ?? .unknown
        let be = (try? xs.state(at: v.path)) ?? .unknown
        switch fe {
        case .initialising:
            // A frontend coming back after Closed: offer the device again.
            if be == .closed || be == .closing {
                if device.isConnected { device.disconnect() }
                try? xs.switchState(at: v.path, to: .initWait)
            }
        case .initialised, .connected:
            guard be == .initWait || (be == .connected && !device.isConnected) else { return }
            do {
                let config = try readRings(v)
                try device.connect(hypervisor: hv, frontend: config)
                let f = device.features
                try xs.transaction { t in
                    try t.write(v.path + "/sectors", "\(device.sectors)")
                    try t.write(v.path + "/info", "\(f.info)")
                    try t.write(v.path + "/sector-size", "\(f.sectorSize)")
                    try t.write(v.path + "/physical-sector-size", "\(f.physicalSectorSize)")
                    try t.write(v.path + "/feature-flush-cache", f.flushCache ? "1" : "0")
                    try t.write(v.path + "/feature-barrier", f.barrier ? "1" : "0")
                    try t.write(v.path + "/feature-discard", f.discard ? "1" : "0")
                    if f.discard {
                        try t.write(v.path + "/discard-granularity", "\(f.discardGranularity)")
                        try t.write(v.path + "/discard-alignment", "\(f.discardAlignment)")
                        try t.write(v.path + "/discard-secure", f.discardSecure ? "1" : "0")
                    }
                }
                try xs.switchState(at: v.path, to: .connected)
            } catch {
                device.disconnect()
                fatal(v, "connecting to the frontend: \(error)")
            }
        case .closing:
            device.disconnect()
            try? xs.switchState(at: v.path, to: .closing)
        case .closed, .unknown:
            device.disconnect()
            try? xs.switchState(at: v.path, to: .closed)
        default:
            break
        }
    }

    /// Reads and checks the frontend's ring keys (blkif.h), single or multi-queue.
    func readRings(_ v: Vbd) throws -> FrontendConfig {
        let fe = v.frontendPath
        func number(_ key: String) throws -> UInt32 {
            let s = try xs.read(key)
            guard let n = UInt32(s) else { throw BlkBackError.badConfiguration("\(key) is '\(s)', not a number") }
            return n
        }
        let order = try xs.readIfExists(fe + "/ring-page-order").map { _ in try number(fe + "/ring-page-order") } ?? 0
        guard order <= UInt32(BlkifLimits.maxRingPageOrder) else {
            throw BlkBackError.badConfiguration("ring-page-order \(order) above \(BlkifLimits.maxRingPageOrder)")
        }
        let queues = try xs.readIfExists(fe + "/multi-queue-num-queues").map { _ in try number(fe + "/multi-queue-num-queues") } ?? 1
        guard queues >= 1, Int(queues) <= v.device!.maxQueues else {
            throw BlkBackError.badConfiguration("multi-queue-num-queues \(queues) (at most \(v.device!.maxQueues))")
        }
        func ring(in dir: String) throws -> QueueRingConfig {
            let refs: [GrantRef] = order == 0
                ? [try number(dir + "/ring-ref")]
                : try (0..<(1 << order)).map { try number(dir + "/ring-ref\($0)") }
            return QueueRingConfig(ringRefs: refs, eventChannel: try number(dir + "/event-channel"))
        }
        let rings = queues == 1 ? [try ring(in: fe)] : try (0..<queues).map { try ring(in: fe + "/queue-\($0)") }
        let proto = try xs.readIfExists(fe + "/protocol")
        guard let abi = proto.map({ BlkifABI(rawValue: $0) }) ?? .x86_64 else {
            throw BlkBackError.badConfiguration("unknown protocol '\(proto ?? "")'")
        }
        let persistent = (try xs.readIfExists(fe + "/feature-persistent")) == "1"
        return FrontendConfig(domid: v.frontendDomid, abi: abi, queues: rings, persistentGrants: persistent)
    }

    /// xenbus_dev_fatal: the reason goes to `<backend>/error`, the device closes.
    func fatal(_ v: Vbd, _ message: String) {
        logger.error("\(v.path): \(message)")
        try? xs.write(v.path + "/error", message)
        try? xs.switchState(at: v.path, to: .closing)
    }

    func teardown(_ v: Vbd, state: XenBus.XenbusState?) {
        if let w = v.frontendWatch { try? xs.unwatch(w) }
        v.device?.disconnect()
        v.device?.close()
        v.device = nil
        if let state { try? xs.switchState(at: v.path, to: state) }
    }
}
