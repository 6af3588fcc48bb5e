import CXen
import Dispatch
import Glibc
import Logging
import Synchronization
import XenBus
import XenHV
import XenRing
import XenStore

/// netback's part of the XenBus handshake (Linux's xen-netback/xenbus.c),
/// driven by ``XenBusBackend``:
///
/// 1. probe: the toolstack's keys (mac, mtu, rate) make the tap vif<domid>.<devid>;
///    the backend offers its features; the hotplug script named by `script`
///    (default: our vif-bridge) starts with Xen's conventions — `vif`,
///    `XENBUS_PATH=backend/vif/<domid>/<devid>`, argument `online` — on a
///    thread of its own, and the device goes to InitWait;
/// 2. connect: once the script wrote hotplug-status=connected (Linux's
///    hotplug_status watch; ``hotplugGated``), the frontend's tx/rx-ring-ref,
///    event channel(s), queue-N/ and feature keys, read with ``VifKeys``,
///    connect the vif (then Connected). A script that fails, or runs past
///    ``hotplugSeconds``, writes hotplug-status=error and fails its device;
///    other devices never wait for it;
/// 3. disconnect on Closing/Closed; on removal the script runs `offline`,
///    then the tap goes away, on a thread of its own (libxl runs a removed
///    device's script apart from other devices' work), so a slow `offline`
///    holds back only a new device at the same path, probed once it is done.
public final class NetbackDriver: XenBusBackendDriver, @unchecked Sendable {
    // Sound: the backend's queue makes every driver call but started(recheck:)
    // and drain(), which touch only Mutexes; the hotplug threads touch only
    // their own DeviceScript, `logger`, the Mutexes and the removed vif (no
    // longer the backend's), and the hypervisor not at all.
    public let type = "vif"
    let hv: Hypervisor
    let logger: Logger
    let maxQueues: Int
    /// The default hotplug script, and the environment every script gets
    /// (XENSTORED_PATH so xenstore-read/-write reach our xenstored, XEN_NETLINK).
    let defaultScript: String
    let scriptEnvironment: [String: String]
    /// How long a hotplug script may run before it is killed and its device
    /// fails (libxl's LIBXL_HOTPLUG_TIMEOUT is 40 s).
    let hotplugSeconds: Double
    /// Each device's hotplug script, by backend path.
    private let scripts = Mutex<[String: DeviceScript]>([:])
    /// Removed devices whose `offline` script and tap are still being
    /// dealt with, by backend path (``remove(_:_:)``).
    private let removals = Mutex<[String: Removal]>([:])
    /// The backend's ``started(recheck:)``: probes a device again.
    private let recheck = Mutex<(@Sendable (String) -> Void)?>(nil)

    /// A removal under way: done once its tap (named `tap`) is gone;
    /// `waiting`, the devices turned away meanwhile because they have its
    /// path or would take its tap's name (a `vifname` the toolstack gives
    /// again, say to a guest restarted under a new domid), probed again
    /// when it is done.
    struct Removal {
        let done: DispatchSemaphore
        let tap: String
        var waiting: Set<String> = []
    }

    /// The script a device went online with (`offline` runs the same one, as
    /// libxl does), and its `online` run on a thread of its own, which
    /// ``remove(_:_:)`` cancels and waits for.
    final class DeviceScript: Sendable {
        let script: String
        let cancelled = Atomic<Bool>(false)
        let done = DispatchSemaphore(value: 0)
        init(_ script: String) { self.script = script }
    }

    public var hotplugGated: Bool { true }
    /// Linux netback's frontend_changed: Initialising from any state goes
    /// back to InitWait (a netfront reloaded while connected starts over).
    public var restartsOnInitialising: Bool { true }

    public init(hypervisor: Hypervisor, logger: Logger, maxQueues: Int = 1, defaultScript: String,
                scriptEnvironment: [String: String], hotplugSeconds: Double = 40) {
        hv = hypervisor
        self.logger = logger
        self.maxQueues = maxQueues
        self.defaultScript = defaultScript
        self.scriptEnvironment = scriptEnvironment
        self.hotplugSeconds = hotplugSeconds
    }

    /// A `script` the toolstack wrote: a relative name is one of the scripts
    /// directory (the default script's), as libxl reads it against
    /// /etc/xen/scripts, never a file of netback's working directory.
    func resolve(_ script: String?) -> String {
        guard let script, !script.isEmpty else { return defaultScript }
        if script.hasPrefix("/") { return script }
        let dir = defaultScript.lastIndex(of: "/").map { String(defaultScript[..<$0]) } ?? "."
        return dir + "/" + script
    }

    public func probe(_ dev: XenBusDevice, frontendPath: String, xs: XenBusClient) throws -> Vif? {
        let path = dev.backendPath
        guard try xs.readIfExists(path + "/mac") != nil else { return nil }  // the toolstack's keys are not in yet
        let cfg = try VifKeys.config(frontendDomid: XenHV.DomID(dev.frontendDomid), devid: UInt32(dev.devid),
                                     maxQueues: maxQueues, warn: { logger.warning("\(path): \($0)") }) { k in
            (try? xs.readIfExists(path + "/" + k)) ?? nil
        }
        // A removed device's tap, of the name this one takes, is still there
        // while its `offline` script runs: probed again once it is gone.
        let tap = cfg.effectiveTapName
        let waits = removals.withLock { r -> Bool in
            guard let key = r.first(where: { $0.key == path || $0.value.tap == tap })?.key else { return false }
            r[key]!.waiting.insert(path)
            return true
        }
        if waits {
            logger.info("\(path): waiting for a removed device's offline script before making \(tap)")
            return nil
        }
        let vif = try Vif(hypervisor: hv, config: cfg, logger: logger)
        do {
            try xs.transaction { t in
                for (k, v) in Vif.backendFeatures(maxQueues: maxQueues) { try t.write(path + "/" + k, v) }
            }
            let script = resolve((try xs.readIfExists(path + "/script")) ?? nil)
            // What a previous netback's script wrote is not this one's answer.
            try xs.transaction { t in
                try t.rmIfPresent(path + "/hotplug-status")
                try t.rmIfPresent(path + "/hotplug-error")
            }
            let run = DeviceScript(script)
            scripts.withLock { $0[path] = run }
            let name = vif.name
            guard DetachedThread.start(name: "hotplug-\(dev.frontendDomid).\(dev.devid)", { [self] in
                defer { run.done.signal() }
                online(run, vif: name, dev: dev, xs: xs)
            }) else {
                throw VifKeys.KeyError("no thread for the hotplug script \(script)")
            }
        } catch {
            scripts.withLock { _ = $0.removeValue(forKey: path) }
            vif.close()
            throw error
        }
        logger.info("\(path): \(vif.name) ready for the frontend")
        return vif
    }

    public func connect(_ vif: Vif, _ dev: XenBusDevice, frontendPath: String, xs: XenBusClient) throws {
        let c = try VifKeys.connection(maxQueues: maxQueues) { k in (try? xs.readIfExists(frontendPath + "/" + k)) ?? nil }
        try vif.connect(c)
    }

    public func disconnect(_ vif: Vif) { vif.disconnect() }

    /// Linux's credit watch (xen_net_rate_changed): a `rate` the toolstack
    /// writes or removes while the vif runs applies at once; one that does
    /// not parse means unlimited, as at probe.
    public func backendKeyChanged(_ vif: Vif, _ dev: XenBusDevice, key: String, xs: XenBusClient) {
        guard key == "rate" else { return }
        let path = dev.backendPath
        let rate = VifKeys.rate((try? xs.readIfExists(path + "/rate")) ?? nil) { logger.warning("\(path): \($0)") }
        vif.changeRate(rate)
    }

    /// A netfront goes Connected before the backend does (xen-netfront's
    /// talk_to_netback), its rx ring already filled with buffers. Rings on
    /// which no backend ever answered (each shared ring's `rsp_prod` still 0)
    /// and no frame was sent (tx `req_prod` still 0)
    /// are its offer as made: every posted rx request is still outstanding, so
    /// a new backend consuming them from the start agrees with the frontend.
    /// Read through read-only maps, unmapped at once.
    public func frontendRingsUnused(_ dev: XenBusDevice, frontendPath: String, xs: XenBusClient) -> Bool {
        guard let c = try? VifKeys.connection(maxQueues: maxQueues, frontend: { k in (try? xs.readIfExists(frontendPath + "/" + k)) ?? nil }) else {
            return false
        }
        let domid = XenHV.DomID(dev.frontendDomid)
        func untouched(_ ref: GrantRef, requests: Bool) -> Bool {
            guard case .success(let m) = hv.mapGrant(domid: domid, ref: ref, writable: false) else { return false }
            defer { _ = hv.unmapGrant(m) }
            let rspProd = (try? m.region.load(UInt32.self, at: RingLayout.rspProdOffset)) ?? 1
            let reqProd = requests ? (try? m.region.load(UInt32.self, at: RingLayout.reqProdOffset)) ?? 1 : 0
            return rspProd == 0 && reqProd == 0
        }
        return c.queues.allSatisfy { untouched($0.txRingRef, requests: true) && untouched($0.rxRingRef, requests: false) }
    }

    /// Per-vif counters, drops and errors by reason.
    public func counters(_ vif: Vif) -> [(String, UInt64)] {
        let s = vif.stats.snapshot
        var out: [(String, UInt64)] = [("tx_packets", s.txPackets), ("tx_bytes", s.txBytes), ("rx_packets", s.rxPackets),
                                      ("rx_bytes", s.rxBytes), ("tx_drops", s.txDrops), ("rx_drops", s.rxDrops),
                                      ("tx_errors", s.txErrors), ("tx_rate_limited", s.txRateLimited),
                                      ("tx_in_place", s.txInPlace), ("rx_in_place", s.rxInPlace)]
        if s.queueTxPackets.count > 1 {
            for (q, n) in s.queueTxPackets.enumerated() { out.append(("queue\(q)_tx_packets", n)) }
            for (q, n) in s.queueRxPackets.enumerated() { out.append(("queue\(q)_rx_packets", n)) }
        }
        for (reason, n) in s.reasons.sorted(by: { $0.key < $1.key }) {
            out.append(("reason_" + reason.map { $0.isLetter || $0.isNumber ? $0 : "_" }.reduce("") { $0 + String($1) }, n))
        }
        return out
    }

    /// The `online` script's thread: runs it, and unless the device was
    /// removed meanwhile, answers for a script that failed, timed out or
    /// did not write hotplug-status=connected (hotplug-status=error and
    /// hotplug-error, as Xen's scripts report their own failures). Written
    /// only while the device's directory exists, so a late answer never
    /// re-creates a removed device.
    func online(_ run: DeviceScript, vif: String, dev: XenBusDevice, xs: XenBusClient) {
        let path = dev.backendPath
        var failure: String?
        do {
            try hotplug(run.script, "online", vif: vif, dev: dev, run: run)
            if (try xs.readIfExists(path + "/hotplug-status")) != "connected" {
                failure = "the hotplug script \(run.script) did not write hotplug-status=connected"
            }
        } catch {
            failure = "\(error)"
        }
        guard let failure, !run.cancelled.load(ordering: .acquiring) else { return }
        logger.error("\(path): \(failure)")
        try? xs.transaction { t in
            guard try t.readIfExists(path + "/state") != nil else { return }
            try t.write(path + "/hotplug-error", failure)
            try t.write(path + "/hotplug-status", "error")
        }
    }

    public func started(recheck: @escaping @Sendable (String) -> Void) {
        self.recheck.withLock { $0 = recheck }
    }

    /// Runs the device's `offline` script and then closes its tap, on a
    /// thread of its own (in line only when no thread can be made). An
    /// `online` script still running is stopped first (killed with what it
    /// started), so `offline` never runs beside it.
    public func remove(_ vif: Vif, _ dev: XenBusDevice) {
        let path = dev.backendPath
        let run = scripts.withLock { $0.removeValue(forKey: path) }
        run?.cancelled.store(true, ordering: .releasing)
        let done = DispatchSemaphore(value: 0)
        removals.withLock { $0[path] = Removal(done: done, tap: vif.name) }
        let finish: @Sendable () -> Void = { [self] in
            run?.done.wait()  // at once if it ended long ago
            do { try hotplug(run?.script ?? defaultScript, "offline", vif: vif.name, dev: dev) } catch {
                logger.warning("\(path): \(error)")
            }
            vif.close()
            let waiting = removals.withLock { $0.removeValue(forKey: path)?.waiting ?? [] }
            done.signal()
            if let recheck = recheck.withLock({ $0 }) { for p in waiting.sorted() { recheck(p) } }
        }
        if !DetachedThread.start(name: "offline-\(dev.frontendDomid).\(dev.devid)", finish) { finish() }
    }

    /// Waits for every removal under way (daemon shutdown).
    public func drain() {
        for r in removals.withLock({ Array($0.values) }) {
            r.done.wait()
            r.done.signal()
        }
    }

    /// Runs a hotplug script the way Xen's hotplug runner does, in a session
    /// of its own; one still running after ``hotplugSeconds`` is killed with
    /// everything it started, and fails its device. The kernel kills the
    /// script if netback dies meanwhile (left running, it would answer into
    /// the device a restarted netback probes again); a command it started
    /// finishes (a `xenstore-write` under way may still land).
    func hotplug(_ script: String, _ action: String, vif: String, dev: XenBusDevice, run: DeviceScript? = nil) throws {
        var env = scriptEnvironment
        env["vif"] = vif
        env["XENBUS_PATH"] = "backend/vif/\(dev.frontendDomid)/\(dev.devid)"
        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        defer { close(null) }
        let pid = try ProcessLauncher.spawn(script, arguments: [action], environment: env,
                                            descriptors: [(null, 0), (null, 1), (2, 2)], newSession: true,
                                            tiedToThread: true)
        // Woken by the script's exit; without a pidfd (an old kernel, no
        // descriptor left), waitpid(WNOHANG) every 50 ms.
        let process = ProcessHandle(pid)
        let deadline = monotonicSeconds() + hotplugSeconds
        var st: Int32 = 0
        var timedOut = false
        // Looked at every 100 ms when the device may be removed meanwhile.
        let slice = run == nil ? 1.0 : 0.1
        while true {
            let r = waitpid(pid, &st, WNOHANG)
            if r == pid || (r < 0 && errno != EINTR) { break }
            let left = deadline - monotonicSeconds()
            let cancelled = run?.cancelled.load(ordering: .acquiring) == true
            guard left > 0 && !cancelled else {
                timedOut = !cancelled
                kill(-pid, SIGKILL)  // its process group: the script and what it started
                while waitpid(pid, &st, 0) < 0 && errno == EINTR {}
                break
            }
            if let process { _ = process.waitForExit(until: monotonicSeconds() + min(left, slice)) } else { idle(milliseconds: 50) }
        }
        if timedOut {
            throw VifKeys.KeyError("hotplug script \(script) \(action) did not finish within \(Int(hotplugSeconds)) s; killed")
        }
        guard st & 0x7F == 0, (st >> 8) & 0xFF == 0 else {
            throw VifKeys.KeyError("hotplug script \(script) \(action) failed (status \(st))")
        }
    }
}

/// netback as a XenBus backend service.
public typealias NetbackService = XenBusBackend<NetbackDriver>
