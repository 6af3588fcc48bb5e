import Dispatch
import Glibc
import Logging
import NBD
import Synchronization
import XenBus
import XenHV

/// The guest kernel's frontend bus (Linux's xenbus_probe_frontend): the
/// devices under the domain's `device/vbd` and `device/vif`, brought up when
/// the toolstack adds them — at boot or any time later — and torn down when
/// it takes them away (libxl's removal: backend `online`=0 and Closing, then
/// both directories removed).
///
/// A vbd becomes a blkfront exported over NBD on `<nbdDir>/<vdev>.sock`; a vif
/// becomes a netfront whose NIC is `eth<devid>` in the guest's network
/// namespace, created with the first NIC (``Options/namespaceCreated`` is told,
/// to start its reaper) and removed with the last one when this guest made it.
///
/// Each device has its own serial queue: one that is slow to connect delays
/// no other, nor the shutdown path beyond ``stopAll(seconds:)``'s bound. A
/// device that fails to connect is logged and left out, as a Linux guest
/// boots without it; detaching and attaching it again retries.
///
/// What runs is listed in `<nbdDir>/devices`, one `<type>/<devid> <line>` per
/// device (the lines pvguest prints at boot), replaced atomically on every
/// change: the toolstack's block-attach and network-attach read it.
///
/// Threading: watch callbacks (on the XenBus reader thread, which must not
/// wait for a reply) only call `wake`; the owner then calls ``rescan()`` on
/// its own thread.
public final class GuestDevices: @unchecked Sendable {
    // Sound: `slots` and the watches are touched only by the owner's thread
    // (rescan, stopAll); each slot's device is touched only on its queue;
    // `shared` is behind its mutex.
    public struct Options: Sendable {
        public var nbdDir: String
        public var ringPageOrder: Int
        /// Segments per disk request with indirect descriptors (Linux's
        /// xen_blkif_max_segments), capped by the backend's offer.
        public var indirectSegments = BlkFrontDevice.defaultIndirectSegments
        public var namespace: String
        /// Queues and event channels each NIC may use.
        public var netfront: NetFrontDevice.Options
        /// Called once, the first time this guest creates `namespace`.
        public var namespaceCreated: @Sendable (String) -> Void
        public init(nbdDir: String, ringPageOrder: Int, namespace: String, netfront: NetFrontDevice.Options = .init(),
                    namespaceCreated: @escaping @Sendable (String) -> Void) {
            self.nbdDir = nbdDir
            self.ringPageOrder = ringPageOrder
            self.namespace = namespace
            self.netfront = netfront
            self.namespaceCreated = namespaceCreated
        }
    }

    let hv: Hypervisor
    let xs: XenBusClient
    let home: String
    let pages: GuestPages
    let grants: GrantRefs
    let options: Options
    let logger: Logger
    let wake: @Sendable () -> Void
    var slots: [String: Slot] = [:]
    var deviceWatch: XenBusWatch?
    var stopping = false
    /// Operations queued or running on the slots' queues.
    let busy = DispatchGroup()

    struct Shared {
        /// Key ("vbd/51712") -> the line listed for it.
        var lines: [String: String] = [:]
        /// Export names in use (each one socket in the NBD directory) -> the slot's key.
        var exports: [String: String] = [:]
        /// NICs being brought up or up: the namespace goes when this is 0 again.
        var nics = 0
        var createdNamespace = false
        var reaperStarted = false
    }
    let shared = Mutex(Shared())

    enum Running {
        case disk(BlkFrontDevice, NBDServer)
        case nic(NetFrontDevice)

        var isDetached: Bool {
            switch self {
            case let .disk(d, _): d.isDetached
            case let .nic(n): n.isDetached
            }
        }
    }

    /// One `<type>/<devid>`: what the toolstack wants and what runs.
    final class Slot: @unchecked Sendable {
        // Sound: `want` is behind its mutex; `running` and `attempted` are
        // only touched on `queue`; the watch fields only by the owner's thread.
        let type: String
        let devid: String
        let frontendPath: String
        let queue: DispatchQueue
        /// Whether the device should run, and how often it was (re)attached:
        /// a failed bring-up is retried only for a new attachment.
        let want = Mutex<(wanted: Bool, generation: Int)>((false, 0))
        var attempted = 0
        var running: Running?
        /// Set while a bring-up waits for the backend: shutdown does not wait for it.
        let connecting = Atomic<Bool>(false)
        var watch: XenBusWatch?
        var watchedBackend: String?

        var key: String { type + "/" + devid }

        init(type: String, devid: String, frontendPath: String) {
            self.type = type
            self.devid = devid
            self.frontendPath = frontendPath
            queue = DispatchQueue(label: "pvguest-\(type)-\(devid)")
        }
    }

    public init(hypervisor hv: Hypervisor, xenstore xs: XenBusClient, home: String, pages: GuestPages, grants: GrantRefs,
                options: Options, logger: Logger, wake: @escaping @Sendable () -> Void) {
        self.hv = hv
        self.xs = xs
        self.home = home
        self.pages = pages
        self.grants = grants
        self.options = options
        self.logger = logger
        self.wake = wake
    }

    /// Watches `device` under the home (the first event arrives at once) and
    /// brings up what is there now.
    public func start() throws {
        deviceWatch = try xs.watch(home + "/device", token: "pvguest-devices") { [wake] _ in wake() }
        rescan()
    }

    /// Waits (at most `seconds`) until every bring-up and teardown queued so
    /// far has finished; false on timeout.
    @discardableResult
    public func settle(seconds: Double) -> Bool {
        busy.wait(timeout: .now() + seconds) == .success
    }

    /// The listed lines, disks first (by devid), then NICs (by number).
    public var lines: [String] {
        let l = shared.withLock { $0.lines }
        func order(_ k: String) -> (Int, Int, String) {
            let p = k.split(separator: "/")
            return (p.first == "vbd" ? 0 : 1, Int(p.last ?? "") ?? 0, k)
        }
        return l.keys.sorted { order($0) < order($1) }.map { l[$0]! }
    }

    // MARK: Scanning (the owner's thread)

    /// Compares the store with what runs and queues the differences.
    public func rescan() {
        guard !stopping else { return }
        var seen = Set<String>()
        for type in ["vbd", "vif"] {
            for devid in (try? xs.directory(home + "/device/" + type)) ?? [] {
                let fe = home + "/device/" + type + "/" + devid
                let slot = slots[type + "/" + devid] ?? {
                    let s = Slot(type: type, devid: devid, frontendPath: fe)
                    slots[s.key] = s
                    return s
                }()
                seen.insert(slot.key)
                let be = (try? xs.readIfExists(fe + "/backend")) ?? nil
                if let be, slot.watchedBackend != be {
                    // The backend's state tells of a detach (online=0, Closing).
                    if let w = slot.watch { try? xs.unwatch(w) }
                    slot.watch = try? xs.watch(be + "/state") { [wake] _ in wake() }
                    slot.watchedBackend = be
                }
                let online = be.flatMap { (try? xs.readIfExists($0 + "/online")) ?? nil }
                set(slot, wanted: online != nil && online != "0", recheck: true)
            }
        }
        for (key, slot) in slots where !seen.contains(key) {
            if let w = slot.watch { try? xs.unwatch(w) }
            slot.watch = nil
            slot.watchedBackend = nil
            set(slot, wanted: false)
        }
    }

    /// `recheck`: reconcile even when nothing changed here, in case a device
    /// lost its backend under it (a detach and re-attach between two scans).
    func set(_ slot: Slot, wanted: Bool, recheck: Bool = false) {
        let changed = slot.want.withLock { w -> Bool in
            guard w.wanted != wanted else { return false }
            w.wanted = wanted
            if wanted { w.generation += 1 }
            return true
        }
        guard changed || recheck else { return }
        busy.enter()
        slot.queue.async { [self] in
            reconcile(slot)
            busy.leave()
        }
    }

    /// Tears every device down (the guest's shutdown), waiting at most
    /// `seconds` for them; one still connecting is not waited for (it ends
    /// at its own timeout, or with the process).
    public func stopAll(seconds: Double = 5) {
        // The watches stay (the guest is ending; a rescan now does nothing):
        // no request here that a dead xenstored would make wait.
        stopping = true
        let stopped = DispatchGroup()
        for slot in slots.values {
            set(slot, wanted: false)
            guard !slot.connecting.load(ordering: .acquiring) else { continue }
            // Queued behind the teardown on the slot's serial queue.
            stopped.enter()
            slot.queue.async { stopped.leave() }
        }
        if stopped.wait(timeout: .now() + seconds) != .success {
            logger.warning("some devices did not stop within \(Int(seconds)) s")
        }
        let remove = shared.withLock { s -> Bool in
            defer { s.createdNamespace = false }
            return s.createdNamespace
        }
        if remove { NetNamespace.remove(options.namespace) }
    }

    // MARK: One device (its queue)

    func reconcile(_ slot: Slot) {
        if slot.want.withLock({ $0.wanted }), let r = slot.running, r.isDetached || isReplaced(slot), isOnline(slot) {
            // The store has the device, the running one lost its backend or
            // its directory: the toolstack removed it and added it again
            // before we looked.
            logger.info("\(slot.key): its backend went away and came back; bringing it up anew")
            slot.running = nil
            tearDown(slot, r)
            slot.attempted = 0
        }
        let (wanted, generation) = slot.want.withLock { ($0.wanted, $0.generation) }
        if wanted, slot.running == nil, slot.attempted != generation {
            slot.attempted = generation
            bringUp(slot)
            // Detached while it connected: reconcile again below.
            if slot.want.withLock({ $0.wanted }) { return }
        }
        if !slot.want.withLock({ $0.wanted }), let r = slot.running {
            slot.running = nil
            tearDown(slot, r)
        }
    }

    /// Whether the frontend directory lost the keys the running device wrote:
    /// it is a new device in the old one's place.
    func isReplaced(_ slot: Slot) -> Bool {
        let key = slot.type == "vbd" ? BlkFrontDevice.handshakeKey : NetFrontDevice.handshakeKey
        return (try? xs.readIfExists(slot.frontendPath + "/" + key)) ?? nil == nil
    }

    /// What the store says now: the frontend names a backend that is online.
    func isOnline(_ slot: Slot) -> Bool {
        guard let be = (try? xs.readIfExists(slot.frontendPath + "/backend")) ?? nil,
              let online = (try? xs.readIfExists(be + "/online")) ?? nil else { return false }
        return online != "0"
    }

    func bringUp(_ slot: Slot) {
        slot.connecting.store(true, ordering: .releasing)
        defer { slot.connecting.store(false, ordering: .releasing) }
        do {
            switch slot.type {
            case "vbd": try bringUpDisk(slot)
            default: try bringUpNIC(slot)
            }
        } catch {
            logger.error("\(slot.key): \(error); the guest has no such device (detach and attach it again to retry)")
        }
    }

    func bringUpDisk(_ slot: Slot) throws {
        let device = try BlkFrontDevice(hypervisor: hv, xenstore: xs, frontendPath: slot.frontendPath, pages: pages, grants: grants,
                                        ringPageOrder: options.ringPageOrder, indirectSegments: options.indirectSegments,
                                        logger: logger)
        let be = device.backendPath
        // The backend's name for the disk (xl's vdev), unless another disk has
        // it: a backend naming a second disk after the first must not put its
        // socket in the first one's place.
        let wanted = (try? xs.readIfExists(be + "/dev")).flatMap { $0 }.flatMap { Self.isSafeName($0) ? $0 : nil }
        let name = shared.withLock { s -> String? in
            for n in [wanted, "d\(slot.devid)"].compactMap({ $0 }) where s.exports[n] == nil || s.exports[n] == slot.key {
                s.exports[n] = slot.key
                return n
            }
            return nil
        }
        guard let name else {
            device.close()
            throw HypervisorError.protocolViolation("the disk's names ('\(wanted ?? "")', 'd\(slot.devid)') are another disk's")
        }
        let server = NBDServer(exportName: name, device: device, logger: logger)
        let socket = "\(options.nbdDir)/\(name).sock"
        do { try server.listen(unixPath: socket) } catch {
            shared.withLock { _ = $0.exports.removeValue(forKey: name) }
            device.close()
            throw error
        }
        slot.running = .disk(device, server)
        publish(slot, "disk \(name) \(device.size / 512) sectors\(device.isReadOnly ? " ro" : "") nbd+unix:///\(name)?socket=\(socket)")
    }

    func bringUpNIC(_ slot: Slot) throws {
        guard let devid = Int(slot.devid), devid >= 0 else {
            throw HypervisorError.protocolViolation("'\(slot.devid)' is not a vif device id")
        }
        try enterNamespace()
        let nic: NetFrontDevice
        do {
            nic = try NetFrontDevice(hypervisor: hv, xenstore: xs, frontendPath: slot.frontendPath, pages: pages, grants: grants,
                                     namespace: options.namespace, interfaceName: "eth\(devid)", options: options.netfront, logger: logger)
        } catch {
            leaveNamespace()
            throw error
        }
        slot.running = .nic(nic)
        publish(slot, "nic \(nic.interfaceName) netns \(options.namespace) mac \(nic.mac)")
    }

    func tearDown(_ slot: Slot, _ r: Running) {
        unpublish(slot)
        switch r {
        case let .disk(device, server):
            server.stop()  // the socket goes; open connections get EIO
            shared.withLock { _ = $0.exports.removeValue(forKey: server.exportName) }
            device.close()
        case let .nic(nic):
            nic.stop()
            leaveNamespace()
        }
        logger.info("\(slot.key): removed")
    }

    /// Makes sure the namespace exists before a NIC goes into it (one at a
    /// time, so two NICs never race to create it), and counts the NIC.
    func enterNamespace() throws {
        let ns = options.namespace
        let startReaper = try shared.withLock { s throws -> Bool in
            s.nics += 1
            guard !NetNamespace.exists(ns) else { return false }
            do {
                _ = try NetNamespace.run(in: ns, create: true) {}
            } catch {
                s.nics -= 1
                throw error
            }
            s.createdNamespace = true
            defer { s.reaperStarted = true }
            return !s.reaperStarted
        }
        if startReaper { options.namespaceCreated(ns) }
    }

    /// A NIC went (or never came): the namespace this guest made goes with the last one.
    /// Removed under the same lock that creates it: a NIC entering meanwhile
    /// on another device's queue finds it either still there or gone, never
    /// one about to go.
    func leaveNamespace() {
        shared.withLock { s in
            s.nics -= 1
            guard s.nics == 0, s.createdNamespace else { return }
            s.createdNamespace = false
            NetNamespace.remove(options.namespace)
        }
    }

    // MARK: The devices file

    func publish(_ slot: Slot, _ line: String) {
        logger.info("\(slot.key): \(line)")
        shared.withLock { s in
            s.lines[slot.key] = line
            writeList(s.lines)
        }
    }

    func unpublish(_ slot: Slot) {
        shared.withLock { s in
            s.lines[slot.key] = nil
            writeList(s.lines)
        }
    }

    /// `<nbdDir>/devices`, written to a temporary file and renamed.
    func writeList(_ lines: [String: String]) {
        let path = options.nbdDir + "/devices"
        let text = lines.keys.sorted().map { $0 + " " + lines[$0]! + "\n" }.joined()
        guard let f = fopen(path + ".tmp", "w") else { return }
        fputs(text, f)
        fclose(f)
        rename(path + ".tmp", path)
    }

    /// An export name the toolstack wrote (`dev`) is used as a file name.
    static func isSafeName(_ n: String) -> Bool {
        !n.isEmpty && n.utf8.count <= 64 && n != "." && n != ".." && !n.contains { $0 == "/" || $0.isWhitespace || $0 == "?" }
    }
}
