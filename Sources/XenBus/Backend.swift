import Dispatch
import Glibc
import Logging
import Synchronization
import XenHV
import XenStore

/// What one kind of backend (vbd, vif) does at each step of the XenBus
/// handshake; ``XenBusBackend`` drives it. All calls come on the backend's
/// serial queue, one at a time.
public protocol XenBusBackendDriver: AnyObject, SendableMetatype {
    associatedtype Device
    /// The `<type>` directory under /local/domain/0/backend.
    var type: String { get }
    /// The toolstack's keys are in `dev.backendPath`: open the device, write
    /// what the backend offers. Return nil to wait for more keys. The engine
    /// switches to InitWait afterwards.
    func probe(_ dev: XenBusDevice, frontendPath: String, xs: XenBusClient) throws -> Device?
    /// The frontend is Initialised or Connected and the backend in InitWait (or
    /// Connected but torn down): read its keys, connect, write what the
    /// frontend needs. The engine switches to Connected afterwards.
    func connect(_ device: Device, _ dev: XenBusDevice, frontendPath: String, xs: XenBusClient) throws
    /// Whether the device cannot connect yet, for work of its own still
    /// under way (blkback: the previous connection's I/O in flight, where
    /// Linux's xen_blkif_disconnect answers -EBUSY); the driver then has
    /// the device looked at again when it can (``started(recheck:)``).
    /// Default: false.
    func connectDeferred(_ device: Device, _ dev: XenBusDevice) -> Bool
    /// Frontend Closing/Closed/gone, or a reconnect: release rings and ports.
    func disconnect(_ device: Device)
    /// The backend directory is gone: release everything the device holds.
    func remove(_ device: Device, _ dev: XenBusDevice)
    /// The device's statistics as named counters (Linux's sysfs statistics).
    func counters(_ device: Device) -> [(String, UInt64)]
    /// Whether the rings a Connected frontend announced have never carried a
    /// request (every producer index still 0): the frontend is waiting in its
    /// handshake for a backend's Connected — a frontend that goes Connected
    /// before the backend does (xen-netfront) — rather than using them with a
    /// backend that died. Default: false (wait for the frontend to start over).
    func frontendRingsUnused(_ dev: XenBusDevice, frontendPath: String, xs: XenBusClient) -> Bool
    /// A key under an open device's backend directory changed (`key` is
    /// relative to it): the toolstack may change some while the device runs,
    /// as Linux netback watches `rate`. Our own writes come here too.
    /// Default: nothing.
    func backendKeyChanged(_ device: Device, _ dev: XenBusDevice, key: String, xs: XenBusClient)
    /// Whether a probed device connects only once its hotplug script has
    /// written `hotplug-status` = `connected`, as Linux netback waits on its
    /// hotplug_status watch; `error` there fails the device with the script's
    /// `hotplug-error`. The script runs meanwhile (the driver starts it), so
    /// a slow one holds back its own device only. Default: false.
    var hotplugGated: Bool { get }
    /// Whether a frontend going Initialising while the device is connected
    /// (a guest's driver reloaded, a kexec'd kernel) is disconnected and
    /// offered the device again, as Linux netback's frontend_changed does
    /// (set_backend_state to InitWait from any state). Linux blkback acts
    /// only on an Initialising after Closed. Default: false.
    var restartsOnInitialising: Bool { get }
    /// Whether ``tick(_:_:xs:)`` is to be called: once a second, on the
    /// backend's queue, for every probed device. Default: false.
    var ticks: Bool { get }
    /// A driver following something of its own over time (blkback: its
    /// image's size, for online resize). Default: nothing.
    func tick(_ device: Device, _ dev: XenBusDevice, xs: XenBusClient)
    /// Once, as the backend starts: `recheck(path)` has it look at a device
    /// again, for a driver whose ``probe(_:frontendPath:xs:)`` returned nil,
    /// or whose ``connectDeferred(_:_:)`` was true, while work of its own on
    /// that device (a removal's script, I/O in flight) was under way, and
    /// which has now finished. Default: nothing.
    func started(recheck: @escaping @Sendable (_ backendPath: String) -> Void)
    /// Waits for what the driver finishes after ``remove(_:_:)`` returned
    /// (netback's `offline` scripts): ``XenBusBackend/stop()`` calls it once
    /// every device is torn down. Default: nothing.
    func drain()
}

extension XenBusBackendDriver {
    public var hotplugGated: Bool { false }
    public var restartsOnInitialising: Bool { false }
    public var ticks: Bool { false }
    public func connectDeferred(_ device: Device, _ dev: XenBusDevice) -> Bool { false }
    public func tick(_ device: Device, _ dev: XenBusDevice, xs: XenBusClient) {}
    public func counters(_ device: Device) -> [(String, UInt64)] { [] }
    public func frontendRingsUnused(_ dev: XenBusDevice, frontendPath: String, xs: XenBusClient) -> Bool { false }
    public func backendKeyChanged(_ device: Device, _ dev: XenBusDevice, key: String, xs: XenBusClient) {}
    public func started(recheck: @escaping @Sendable (_ backendPath: String) -> Void) {}
    public func drain() {}
}

/// The backend half of the XenBus state machine, as Linux's xenbus_probe and
/// each driver's frontend_changed do it: watches /local/domain/0/backend/<type>,
/// probes new devices, follows each frontend's `state`, and detaches devices
/// whose directory the toolstack removed. A failure is reported like
/// xenbus_dev_fatal: the reason in `<backend>/error`, the device Closing.
public final class XenBusBackend<Driver: XenBusBackendDriver>: @unchecked Sendable {
    // Sound: `devices`, `stopped` and the driver are only touched on
    // `queue`, but for the driver's started(recheck:) and drain(), which are
    // its own to make safe.
    public let xs: XenBusClient
    let driver: Driver
    let logger: Logger
    let queue: DispatchQueue
    let root: String
    var devices: [String: Entry] = [:]
    /// Devices whose frontend changed with an event queued for them: a
    /// guest writing its state in a loop gets one pending handler, not one
    /// per write (Linux: XSA-349, a watch with an event pending drops more).
    let frontendEventPending = Mutex<Set<String>>([])
    /// Frontend state events handled (tests: a storm is coalesced).
    var frontendEventsHandled = 0
    /// This backend's probes, for ``Entry/marker``.
    var probes: UInt64 = 0
    /// Set by ``stop()``: a driver's late recheck probes nothing.
    var stopped = false
    var rootWatch: XenBusWatch?

    final class Entry {
        let dev: XenBusDevice
        let frontendPath: String
        var device: Driver.Device?
        var frontendWatch: XenBusWatch?
        /// The frontend was already Connected when we probed, on rings it used
        /// with a previous backend (one that died): it tears them down when it
        /// notices, so we connect only after it has started over (Closed, then
        /// Initialising). An Initialised frontend (or a Connected one whose
        /// rings never carried a request) is not stale: it published fresh
        /// rings and waits for any backend's Connected before using them, and
        /// nothing it can observe tells it that the backend it saw in InitWait
        /// died before connecting (the new one's InitWait is the same value),
        /// so the new backend must connect — as Linux's frontend_changed does
        /// for an Initialised frontend at probe.
        var frontendStale = false
        /// What this probe wrote in `<backend>/<markerKey>`: a directory
        /// without it is another device the toolstack made in this one's
        /// place, however its state reads (Linux: a removal unregisters the
        /// xenbus device, and a new directory is probed afresh).
        var marker: String?
        init(dev: XenBusDevice, frontendPath: String) {
            self.dev = dev
            self.frontendPath = frontendPath
        }
    }

    public init(xenbus: XenBusClient, driver: Driver, logger: Logger) {
        xs = xenbus
        self.driver = driver
        self.logger = logger
        queue = DispatchQueue(label: "xenbus-backend-\(driver.type)")
        root = XenBusDevice.backendRoot(type: driver.type)
    }

    /// Starts watching the backend directory (the first event rescans all).
    public func start() throws {
        driver.started { [weak self] path in
            guard let self else { return }
            self.queue.async { if !self.stopped { self.reconcile(path) } }
        }
        rootWatch = try xs.watch(root, token: "backend-\(driver.type)") { [weak self] e in
            guard let self else { return }
            self.queue.async { self.changed(e.path) }
        }
        if driver.ticks { scheduleTick() }
    }

    /// ``XenBusBackendDriver/tick(_:_:xs:)`` for every probed device, once a
    /// second until ``stop()``.
    func scheduleTick() {
        queue.asyncAfter(deadline: .now() + 1) { [weak self] in
            guard let self, !self.stopped else { return }
            for (_, e) in self.devices { if let d = e.device { self.driver.tick(d, e.dev, xs: self.xs) } }
            self.scheduleTick()
        }
    }

    /// Returns once every watch event xenstored sent before now has been
    /// handled: a round trip on our connection (events precede the reply on the
    /// wire), then a pass through the event queue.
    public func settle() {
        _ = try? xs.exists("/")
        queue.sync {}
    }

    /// Devices currently open, by backend path.
    public var deviceNames: [String] { queue.sync { devices.filter { $0.value.device != nil }.keys.sorted() } }

    /// Runs `body` on the queue with the open devices (statistics, tests).
    public func withDevices<R>(_ body: ([String: Driver.Device]) -> R) -> R {
        queue.sync { body(devices.compactMapValues(\.device)) }
    }

    /// Every open device's counters as lines `TYPE DOMID DEVID COUNTER VALUE`.
    public func statisticsText() -> String {
        queue.sync {
            var out = ""
            for (_, e) in devices.sorted(by: { $0.key < $1.key }) {
                guard let d = e.device else { continue }
                for (name, value) in driver.counters(d) {
                    out += "\(driver.type) \(e.dev.frontendDomid) \(e.dev.devid) \(name) \(value)\n"
                }
            }
            return out
        }
    }

    /// Publishes ``statisticsText()`` to `path` every `seconds` (written to a
    /// temporary file and renamed, so readers never see half a file), for the
    /// toolstack's `xenctl top` and metrics.
    public func publishStatistics(to path: String, every seconds: Double = 1) {
        let timer = DispatchQueue(label: "xenbus-backend-stats-\(driver.type)")
        @Sendable func tick() {
            let text = statisticsText()
            let tmp = path + ".tmp"
            if let f = fopen(tmp, "w") {
                fputs(text, f)
                fclose(f)
                rename(tmp, path)
            }
            timer.asyncAfter(deadline: .now() + seconds, execute: tick)
        }
        timer.async(execute: tick)
    }

    /// A backend daemon's life once connected: watches its directory, settles,
    /// publishes its counters to `statisticsPath` (its directory created),
    /// prints `readyLine` on stdout for the supervisor, serves until
    /// `signalFD` (a termination signalfd) is readable, then detaches every
    /// device.
    public func serve(statisticsPath: String, readyLine: String, untilReadable signalFD: CInt) throws {
        try start()
        settle()
        if let slash = statisticsPath.lastIndex(of: "/") { mkdir(String(statisticsPath[..<slash]), 0o755) }
        publishStatistics(to: statisticsPath)
        ServiceReadiness.announce(readyLine)
        var pfd = pollfd(fd: signalFD, events: Int16(POLLIN), revents: 0)
        while poll(&pfd, 1, -1) < 0 && errno == EINTR {}
        logger.info("stopping: detaching \(deviceNames.count) device(s)")
        stop()
    }

    /// Detaches everything (daemon shutdown).
    public func stop() {
        if let w = rootWatch { try? xs.unwatch(w) }
        queue.sync {
            stopped = true
            for (_, e) in devices { teardown(e) }
            devices.removeAll()
        }
        driver.drain()
    }

    /// Waits for what the driver still finishes of devices it let go
    /// (``XenBusBackendDriver/drain()``: blkback's queues their I/O in
    /// flight, netback's `offline` scripts).
    public func drain() { driver.drain() }

    func changed(_ path: String) {
        let rel = path.hasPrefix(root) ? path.dropFirst(root.count).split(separator: "/") : []
        if rel.count < 2 {
            rescan()
        } else {
            let path = root + "/" + rel[0] + "/" + rel[1]
            if rel.count > 2, let e = devices[path], let device = e.device {
                driver.backendKeyChanged(device, e.dev, key: rel[2...].joined(separator: "/"), xs: xs)
            }
            reconcile(path)
        }
    }

    /// A directory's children, none when it does not exist; other errors
    /// (a request that timed out, a lost connection) are thrown: a device is
    /// never torn down because the store could not be read.
    func children(_ path: String) throws(XenBusError) -> [String] {
        do { return try xs.directory(path) } catch .xs(.ENOENT) { return [] }
    }

    func rescan() {
        var seen = Set<String>()
        let frontends: [String]
        do { frontends = try children(root) } catch {
            logger.warning("\(root): cannot list devices (\(error)); they are left as they are")
            return
        }
        for fe in frontends {
            let dir = root + "/" + fe
            let devs: [String]
            do { devs = try children(dir) } catch {
                logger.warning("\(dir): cannot list devices (\(error)); they are left as they are")
                for p in devices.keys where p.hasPrefix(dir + "/") { seen.insert(p) }
                continue
            }
            for dev in devs {
                let p = dir + "/" + dev
                seen.insert(p)
                reconcile(p)
            }
        }
        for (p, e) in devices where !seen.contains(p) {
            teardown(e)
            devices.removeValue(forKey: p)
        }
    }

    /// The key a probe marks its backend directory with (``Entry/marker``).
    public static var markerKey: String { "swiftxen-probe" }

    /// Whether `e`'s device is still the one in the store: its probe's marker
    /// is there (an entry that never probed a device has none to check).
    func stillOurs(_ e: Entry) -> Bool {
        guard let marker = e.marker else { return true }
        return ((try? xs.readIfExists(e.dev.backendPath + "/" + Self.markerKey)) ?? nil) == marker
    }

    func reconcile(_ path: String) {
        // A device whose `state` is gone was removed by the toolstack, even
        // if its directory is back: a late writer (a hotplug script's
        // hotplug-status, before or after our teardown) re-created it, and
        // what it re-created is removed again.
        let state: String?
        do { state = try xs.readIfExists(path + "/state") } catch {
            logger.warning("\(path): cannot read its state (\(error)); left as it is")
            return
        }
        if state == nil {
            if let e = devices.removeValue(forKey: path) {
                logger.info("\(path): removed by the toolstack")
                teardown(e)
            }
            if (try? xs.exists(path)) == true { removeRecreated(path) }
            return
        }
        let online = (try? xs.readIfExists(path + "/online")) ?? nil
        if let e = devices[path], !stillOurs(e) || (online != "0" && (try? xs.state(at: path)) == .initialising) {
            // The toolstack removed the device and created it again between two
            // looks (the removal's event found the directory back): Initialising
            // is only ever the toolstack's, written as it creates a device, and
            // this entry went past it. The entry is the old device's: release it
            // and probe the new one, or the new one would never be offered.
            logger.info("\(path): removed and created again by the toolstack")
            devices.removeValue(forKey: path)
            teardown(e)
        }
        if let e = devices[path] {
            // The toolstack takes the device offline (libxl's device removal:
            // online=0, state Closing): disconnect, and report Closed once the
            // frontend has closed (Linux: frontend_changed(Closed) switches the
            // backend Closed, which libxl waits for, up to its timeout), so a
            // detach returns after the guest let the device go. A frontend
            // that is not using the device, or a device whose probe failed,
            // is reported Closed at once. An offline device is never offered
            // again (Linux's xenbus_dev_is_online): later events leave it Closed.
            if online == "0" {
                if (try? xs.state(at: path)) == .closing {
                    if let device = e.device { driver.disconnect(device) }
                    if !Self.frontendUsesDevice((try? xs.state(at: e.frontendPath)) ?? .unknown) {
                        try? switchState(path, to: .closed)
                    }
                }
                return
            }
            guard e.device != nil else { return }
            frontendChanged(e)
            return
        }
        // A device already being removed (a backend restarted during the
        // toolstack's removal finds it offline) is not probed: it is reported
        // Closed, at once unless its frontend is still using it; then once the
        // frontend has closed, as above (an entry with no device, watching the
        // frontend's state).
        if online == "0" {
            guard (try? xs.state(at: path)) == .closing else { return }
            if let dev = XenBusDevice(backendPath: path), let fe = (try? xs.readIfExists(path + "/frontend")) ?? nil,
               Self.frontendUsesDevice((try? xs.state(at: fe)) ?? .unknown) {
                let e = Entry(dev: dev, frontendPath: fe)
                devices[path] = e
                do { try watchFrontend(e) } catch { try? switchState(path, to: .closed) }
            } else {
                try? switchState(path, to: .closed)
            }
            return
        }
        guard let dev = XenBusDevice(backendPath: path), dev.frontendDomid < 0x7FF0,
              let fe = (try? xs.readIfExists(path + "/frontend")) ?? nil else { return }
        let e = Entry(dev: dev, frontendPath: fe)
        do {
            guard let device = try driver.probe(dev, frontendPath: fe, xs: xs) else { return }
            devices[path] = e
            e.device = device
            probes += 1
            let marker = "\(getpid()).\(probes)"
            try xs.transaction { t in
                guard try t.readIfExists(path + "/state") != nil else { return }
                try t.write(path + "/" + Self.markerKey, marker)
            }
            e.marker = marker
            let feState = (try? xs.state(at: fe)) ?? .unknown
            e.frontendStale = feState == .connected && !driver.frontendRingsUnused(dev, frontendPath: fe, xs: xs)
            if e.frontendStale {
                logger.info("\(path): the frontend is \(feState) with a previous backend's rings; waiting for it to reconnect")
            } else if feState == .initialised || feState == .connected {
                logger.info("\(path): the frontend is \(feState) with rings that never carried a request; connecting to them")
            }
            try switchState(path, to: .initWait)
            try watchFrontend(e)
        } catch {
            devices[path] = e  // remembered, so the failure is not retried on every event
            fatal(path, "probing the device: \(error)")
        }
    }

    /// Watches the frontend's state for `e`: a device in use follows it
    /// (``frontendChanged(_:)``); one being removed (offline, or found
    /// offline with no device by a restarted backend) is reconciled, which
    /// reports it Closed once the frontend has closed.
    func watchFrontend(_ e: Entry) throws {
        let path = e.dev.backendPath
        e.frontendWatch = try xs.watch(e.frontendPath + "/state", token: "backend:" + path) { [weak self] _ in
            guard let self, self.frontendEventPending.withLock({ $0.insert(path).inserted }) else { return }
            self.queue.async {
                // Taken off first: a change after this look gets a turn of its own.
                self.frontendEventPending.withLock { _ = $0.remove(path) }
                self.frontendEventsHandled += 1
                guard let e = self.devices[path] else { return }
                if e.device != nil, self.stillOurs(e), (try? self.xs.readIfExists(path + "/online")) != "0" {
                    self.frontendChanged(e)
                } else {
                    self.reconcile(path)
                }
            }
        }
    }

    /// Whether a frontend in `state` still has the device set up (it will
    /// close it when it sees the backend Closing).
    static func frontendUsesDevice(_ state: XenbusState) -> Bool {
        state == .initialised || state == .connected || state == .closing
    }

    /// Linux's frontend_changed.
    func frontendChanged(_ e: Entry) {
        guard let device = e.device else { return }
        let path = e.dev.backendPath
        let fe = (try? xs.state(at: e.frontendPath)) ?? .unknown
        let be = (try? xs.state(at: path)) ?? .unknown
        let hotplugState = hotplug(path)
        // A failed hotplug script fails the device, whatever the frontend
        // does; offered again to a frontend that started over, again.
        if case .failed(let why) = hotplugState, be != .closing && be != .closed {
            driver.disconnect(device)
            fatal(path, "hotplug script: \(why)")
            return
        }
        if fe != .initialised && fe != .connected { e.frontendStale = false }
        switch fe {
        case .initialising:
            // A frontend coming back after Closed: offer the device again,
            // unless the toolstack is taking it away.
            let restart = be == .closed || be == .closing || (driver.restartsOnInitialising && be == .connected)
            if restart, (try? xs.readIfExists(path + "/online")) != "0" {
                driver.disconnect(device)
                try? switchState(e, to: .initWait)
            }
        case .initialised, .connected:
            guard be == .initWait, !e.frontendStale, case .done = hotplugState,
                  !driver.connectDeferred(device, e.dev) else { return }
            do {
                try driver.connect(device, e.dev, frontendPath: e.frontendPath, xs: xs)
                try switchState(e, to: .connected)
            } catch {
                driver.disconnect(device)
                fatal(path, "connecting to the frontend: \(error)")
            }
        case .closing:
            driver.disconnect(device)
            try? switchState(e, to: .closing)
        case .closed, .unknown:
            driver.disconnect(device)
            try? switchState(e, to: .closed)
        default:
            break
        }
    }

    enum HotplugState { case done, running, failed(String) }

    /// Where the device's hotplug script is (``XenBusBackendDriver/hotplugGated``;
    /// always done for a driver that is not gated).
    func hotplug(_ path: String) -> HotplugState {
        guard driver.hotplugGated else { return .done }
        switch (try? xs.readIfExists(path + "/hotplug-status")) ?? nil {
        case "connected": return .done
        case "error": return .failed(((try? xs.readIfExists(path + "/hotplug-error")) ?? nil) ?? "failed")
        default: return .running
        }
    }

    /// xenbus_dev_fatal. The message quotes what the frontend wrote (a key's
    /// value): its control characters are escaped, so a guest cannot forge
    /// lines of dom0's log or reach an operator's terminal.
    func fatal(_ path: String, _ message: String) {
        let message = message.escapingControlCharacters
        logger.error("\(path): \(message)")
        try? xs.transaction { t in
            guard try t.readIfExists(path + "/state") != nil else { return }
            try t.write(path + "/error", message)
        }
        try? switchState(path, to: .closing)
    }

    /// xenbus_switch_state: writes `<path>/state` only while it exists, checked in
    /// the same transaction (as Linux's __xenbus_switch_state does), so a late event
    /// for a device the toolstack removed cannot re-create its directory (which
    /// would also keep the device open: its removal would never be seen).
    func switchState(_ path: String, to new: XenbusState) throws {
        try xs.switchStateIfPresent(at: path, to: new)
    }

    /// The same for a probed device: only into the directory its probe
    /// marked, never a device the toolstack made in its place.
    func switchState(_ e: Entry, to new: XenbusState) throws {
        try xs.switchStateIfPresent(at: e.dev.backendPath, to: new, owner: e.marker == nil ? nil : Self.markerKey)
    }

    /// Removes what late writes re-created of a removed device's directory:
    /// a directory with no state holding only hotplug keys. Never a device
    /// the toolstack is making (it writes its keys with the state, or at
    /// least keys of its own).
    func removeRecreated(_ path: String) {
        try? xs.transaction { t in
            guard try t.readIfExists(path) != nil, try t.readIfExists(path + "/state") == nil,
                  try t.directory(path).allSatisfy({ $0 == "hotplug-status" || $0 == "hotplug-error" }) else { return }
            try t.rm(path)
        }
    }

    func teardown(_ e: Entry) {
        if let w = e.frontendWatch { try? xs.unwatch(w) }
        if let d = e.device {
            driver.disconnect(d)
            driver.remove(d, e.dev)
        }
        e.device = nil
    }
}
