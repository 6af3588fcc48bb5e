import CXen
import Foundation
import Glibc
import Logging
import XenBus
import XenHV
import XenStore

/// The domain monitor: what `xl create` leaves behind when it daemonises
/// (tools/xl/xl_vmcontrol.c, create_domain's event loop and
/// handle_domain_death). It follows one domain through VIRQ_DOM_EXC and, when
/// the domain shuts down or crashes, applies the configured action:
/// destroy, restart (the same config, the same name and devices, a new
/// domid, then it follows the new domain), rename-restart (the old domain is
/// kept under `<name>-<YYYYMMDDTHHMMZ>`), preserve, or coredump-destroy /
/// coredump-restart (a Xen dump-core file in `$runDir/dump/<name>-<domid>.core`
/// first). When the domain is destroyed by someone else (`xenctl destroy`,
/// `xenctl down`) or xenhv goes away, it just exits, as xl's does on
/// DOMAIN_DEATH.
///
/// Files under `$runDir/monitors/`: `<name>.pid` holds "pid domid" and is
/// locked (flock) by the live monitor for its whole life, so a dead one is
/// never mistaken for a live one; `<name>.cfg` is the config the domain was
/// created from (libxl keeps its copy as userdata), used for restarts.
/// Logs go to `$runDir/logs/monitor-<name>.log`.
extension Toolstack {
    var monitorDir: String { runDir + "/monitors" }
    func monitorLockPath(_ name: String) -> String { monitorDir + "/\(name).pid" }
    func monitorConfigPath(_ name: String) -> String { monitorDir + "/\(name).cfg" }

    /// The live monitor that follows domain `name`: its pid and the domid it
    /// follows now; nil when no monitor runs for that name.
    public func monitor(of name: String) -> (pid: pid_t, domid: XenHV.DomID)? {
        let fd = open(monitorLockPath(name), O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        if flock(fd, LOCK_SH | LOCK_NB) == 0 {
            flock(fd, LOCK_UN)
            return nil
        }
        // The record is rewritten in place with one fixed-width write; a read
        // that overlapped it is simply read again.
        for _ in 0..<3 {
            var buf = [UInt8](repeating: 0, count: 64)
            let n = pread(fd, &buf, buf.count, 0)
            let words = String(decoding: buf.prefix(max(0, n)), as: UTF8.self).split(whereSeparator: { $0 == " " || $0 == "\n" })
            if words.count == 2, let pid = pid_t(words[0]), pid > 0, let domid = XenHV.DomID(words[1]) { return (pid, domid) }
        }
        return nil
    }

    /// Spawns the monitor of a domain just created (`xenctl monitor`, in its
    /// own session) and waits until it follows the domain.
    func startMonitor(for guest: CreatedGuest, configText: String, configPath: String) throws {
        Self.makePrivateDirectory(monitorDir)
        // A new file (renamed into place), never the old one rewritten: a
        // previous monitor of the name, leaving, removes only its own.
        let staged = monitorConfigPath(guest.name) + ".new"
        guard FileManager.default.createFile(atPath: staged, contents: Data(configText.utf8)),
              rename(staged, monitorConfigPath(guest.name)) == 0 else {
            unlink(staged)
            throw Failure("cannot write \(monitorConfigPath(guest.name))")
        }
        let log = open(runDir + "/logs/monitor-\(guest.name).log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        defer {
            if log >= 0 { close(log) }
            close(null)
        }
        var ready: [CInt] = [-1, -1]
        guard pipe(&ready) == 0 else { throw Failure("pipe: \(String(cString: strerror(errno)))") }
        for fd in ready { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        defer { close(ready[0]) }
        do {
            _ = try ProcessLauncher.spawn(
                ProcessLauncher.executableDirectory + "/xenctl",
                arguments: ["monitor", "--run-dir", runDir, "--name=" + guest.name, "--domid", "\(guest.domid)",
                            "--config-path", configPath, "--ready-fd", "3"],
                descriptors: [(null, 0), (log >= 0 ? log : null, 1), (log >= 0 ? log : null, 2), (ready[1], 3)],
                newSession: true)
        } catch {
            close(ready[1])
            throw Failure("domain '\(guest.name)': cannot start its monitor: \(error)")
        }
        close(ready[1])
        guard ProcessLauncher.readLine(ready[0], deadline: monotonicSeconds() + 30)?.hasPrefix("monitor ready") == true else {
            throw Failure("domain '\(guest.name)': its monitor did not start; see \(runDir)/logs/monitor-\(guest.name).log")
        }
    }

    /// Stops every live monitor (SIGTERM; they exit without acting) and waits,
    /// bounded, until their locks are free: `xenctl down` leaves none behind.
    public func stopMonitors(seconds: Double = 10) {
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: monitorDir)) ?? [])
            .filter { $0.hasSuffix(".pid") }.map { String($0.dropLast(4)) }
        // Each through a pidfd taken while its lock showed that pid alive, so
        // no signal reaches a process that got the pid later.
        let live: [(String, ProcessHandle)] = names.compactMap { n in
            guard let m = monitor(of: n), let process = ProcessHandle(m.pid), monitor(of: n)?.pid == m.pid else { return nil }
            return (n, process)
        }
        for (_, process) in live { process.signal(SIGTERM) }
        let deadline = monotonicSeconds() + seconds
        for (name, process) in live {
            while monitor(of: name) != nil {
                guard monotonicSeconds() < deadline else {
                    process.signal(SIGKILL)
                    break
                }
                idle(milliseconds: 10)
            }
        }
    }

    /// Whether `descriptor` is the file `path` names now.
    static func sameFile(descriptor: CInt, path: String) -> Bool {
        var held = stat(), named = stat()
        return fstat(descriptor, &held) == 0 && stat(path, &named) == 0
            && held.st_dev == named.st_dev && held.st_ino == named.st_ino
    }

    /// `xenctl monitor`: follows domain `domid` called `name` until it is
    /// destroyed, applying its config's actions. `readyFD` gets one line once
    /// the monitor follows the domain. Returns the exit status.
    public func runMonitor(name: String, domid first: XenHV.DomID, configPath: String, readyFD: CInt?, logger: Logger) -> Int32 {
        func ready() {
            if let readyFD {
                ProcessLauncher.writeLine(readyFD, "monitor ready")
                close(readyFD)
            }
        }
        guard let text = try? String(contentsOfFile: monitorConfigPath(name), encoding: .utf8) else {
            logger.error("cannot read \(monitorConfigPath(name))")
            return 1
        }
        // The config file as written for this monitor: removed as it leaves,
        // unless a later create of the name wrote a new one meanwhile.
        var configFile = stat()
        let haveConfigFile = stat(monitorConfigPath(name), &configFile) == 0
        let config: DomainConfig
        do { config = try DomainConfig(try XLConfig(parsing: text, file: configPath)) } catch {
            logger.error("\(error)")
            return 1
        }
        Self.makePrivateDirectory(monitorDir)
        var lock: CInt = -1
        while true {
            lock = open(monitorLockPath(name), O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
            guard lock >= 0 else {
                logger.error("cannot open \(monitorLockPath(name)): \(String(cString: strerror(errno)))")
                return 1
            }
            // A previous monitor of this name may still be on its way out;
            // it removes the file as it leaves, so the lock taken must be on
            // the file the path names now.
            while flock(lock, LOCK_EX) != 0 && errno == EINTR {}
            if Self.sameFile(descriptor: lock, path: monitorLockPath(name)) { break }
            close(lock)
        }
        defer {
            // Its files go with the monitor (libxl removes a domain's userdata
            // with it): the pid file while the lock is still held.
            var now = stat()
            if haveConfigFile, stat(monitorConfigPath(name), &now) == 0,
               now.st_dev == configFile.st_dev, now.st_ino == configFile.st_ino {
                unlink(monitorConfigPath(name))
            }
            unlink(monitorLockPath(name))
            close(lock)
        }
        _ = ftruncate(lock, 0)
        func publish(_ d: XenHV.DomID) {
            // Fixed width, one write, never truncated: readers never see it empty.
            let line = Array((String(getpid()).leftPadding(10) + " " + String(d).leftPadding(5) + "\n").utf8)
            _ = pwrite(lock, line, line.count, 0)
        }
        var domid = first
        publish(domid)
        let signals = cxen_termination_signalfd()
        let hv: Hypervisor
        let virq: EventChannel
        do {
            hv = try connect()
            virq = try hv.bindVirq(UInt32(VIRQ_DOM_EXC))
        } catch {
            logger.error("cannot follow domain \(domid): \(error)")
            return 1
        }
        ready()
        logger.info("following domain \(domid) (\(name)): on_poweroff=\(config.onPoweroff.rawValue) on_reboot=\(config.onReboot.rawValue) on_crash=\(config.onCrash.rawValue)")
        while true {
            while waitpid(-1, nil, WNOHANG) > 0 {}  // guest processes we started
            // Checked after binding VIRQ_DOM_EXC and after every event, so no change is missed.
            guard let all = try? hv.listDomains() else {
                logger.info("xenhv went away; exiting")
                return 0
            }
            guard let info = all.first(where: { $0.domid == domid }) else {
                logger.info("domain \(domid) has been destroyed; exiting")
                return 0
            }
            if info.isShutdown {
                let reason = info.shutdownReason ?? .crash
                guard let action = config.action(for: reason) else {
                    logger.info("domain \(domid) has suspended; exiting")
                    return 0
                }
                logger.info("domain \(domid) shut down, reason \(reason): action \(action.rawValue)")
                do {
                    guard let next = try apply(action, to: info, config: config, text: text, configPath: configPath, hv: hv,
                                               interruptFD: signals, logger: logger) else {
                        logger.info("done; exiting")
                        return 0
                    }
                    domid = next
                    publish(domid)
                    continue
                } catch {
                    logger.error("domain '\(name)': \(error); exiting")
                    return 1
                }
            }
            var pfds = [pollfd(fd: virq.descriptor, events: Int16(POLLIN), revents: 0),
                        pollfd(fd: signals, events: Int16(POLLIN), revents: 0),
                        pollfd(fd: hv.connectionDescriptor, events: 0, revents: 0)]
            if poll(&pfds, nfds_t(pfds.count), -1) < 0 && errno != EINTR {
                logger.error("poll: \(String(cString: strerror(errno)))")
                return 1
            }
            if pfds[1].revents != 0 {
                logger.info("stopping on signal; domain \(domid) is left as it is")
                return 0
            }
            if pfds[2].revents != 0 {
                logger.info("xenhv went away; exiting")
                return 0
            }
            _ = virq.consume()
        }
    }

    /// handle_domain_death: carries out `action` on a domain that shut down.
    /// Returns the domid to follow next (a restart), or nil when done.
    func apply(_ action: DomainConfig.Action, to info: Hypervisor.DomainInfo, config: DomainConfig, text: String,
               configPath: String, hv: Hypervisor, interruptFD: CInt = -1, logger: Logger) throws -> XenHV.DomID? {
        var action = action
        if action == .coredumpDestroy || action == .coredumpRestart {
            mkdir(runDir + "/dump", 0o700)
            let core = runDir + "/dump/\(config.name)-\(info.domid).core"
            logger.info("dumping core to \(core)")
            // As xl: no point crying over spilled milk, continue on failure.
            do { try CoreDump.write(hv, domid: info.domid, pages: info.pages, vcpus: config.vcpus, to: core) } catch {
                logger.error("core dump failed: \(error)")
            }
            action = action == .coredumpDestroy ? .destroy : .restart
        }
        switch action {
        case .preserve:
            logger.info("preserving domain \(info.domid) until it is destroyed")
            return nil
        case .destroy, .softReset, .coredumpDestroy, .coredumpRestart:
            logger.info("destroying domain \(info.domid)")
            try destroyForRestart(info.domid, hv)
            return nil
        case .restart, .renameRestart:
            // reload_domain_config: the devices the domain has now, with the MACs it had.
            let xs = try connectStore()
            let next = currentConfiguration(of: info.domid, from: config, xs)
            if action == .renameRestart {
                let kept = try preserveName(info, hv, xs)
                logger.info("preserving domain \(info.domid) as '\(kept)'")
                xs.close()
            } else {
                xs.close()
                logger.info("destroying domain \(info.domid) to restart it")
                // `xenctl destroy` got there first: the user's word wins over on_reboot.
                guard try destroyForRestart(info.domid, hv) else {
                    logger.info("domain \(info.domid) was destroyed meanwhile; not restarting it")
                    return nil
                }
            }
            let g = try create(next, configPath: configPath, text: text, appendLog: true, interruptFD: interruptFD)
            logger.info("restarted '\(g.name)' as domain \(g.domid), guest process \(g.pid)")
            for (vdev, uri) in g.disks { logger.info("  disk \(vdev): \(uri)") }
            for n in g.nics { logger.info("  \(n)") }
            return g.domid
        }
    }

    /// libxl_retrieve_domain_configuration: `config` with the devices domain
    /// `domid` has now, read from its backend directories. A disk or vif
    /// attached after create is kept, one detached is dropped, and every vif
    /// keeps the MAC it had; a config entry is reused where the device is
    /// still the one it describes (same target, same bridge).
    func currentConfiguration(of domid: XenHV.DomID, from config: DomainConfig, _ xs: XenBusClient) -> DomainConfig {
        func key(_ dir: String, _ k: String) -> String? { (try? xs.readIfExists(dir + "/" + k)) ?? nil }
        func ids(_ type: String) -> [String] {
            ((try? xs.directory("/local/domain/0/backend/\(type)/\(domid)")) ?? []).sorted { (Int($0) ?? 0) < (Int($1) ?? 0) }
        }
        var next = config
        next.disks = ids("vbd").compactMap { id -> DiskSpec? in
            let be = "/local/domain/0/backend/vbd/\(domid)/\(id)"
            guard let target = key(be, "params") else { return nil }
            if let d = config.disks.first(where: { "\($0.devid)" == id && $0.target == target }) { return d }
            guard let dev = key(be, "dev"), var d = try? DiskSpec(parsing: "vdev=\(dev), target=\(target)") else { return nil }
            d.access = key(be, "mode") == DiskSpec.Access.readOnly.rawValue ? .readOnly : .readWrite
            d.isCDROM = key(be, "device-type") == "cdrom"
            d.discard = key(be, "discard-enable") != "0"
            return d
        }
        next.vifs = ids("vif").compactMap { id -> VifSpec? in
            let be = "/local/domain/0/backend/vif/\(domid)/\(id)"
            guard let bridge = key(be, "bridge") else { return nil }
            let mac = key(be, "mac").flatMap { try? MACAddress(parsing: $0) }
            var v: VifSpec
            if let i = Int(id), i < config.vifs.count, config.vifs[i].bridge == bridge,
               config.vifs[i].mac == nil || config.vifs[i].mac == mac {
                v = config.vifs[i]
            } else {
                guard let parsed = try? VifSpec(parsing: "bridge=\(bridge)") else { return nil }
                v = parsed
                v.script = key(be, "script")
                v.mtu = key(be, "mtu").flatMap(UInt32.init)
                if let r = key(be, "rate")?.split(separator: ","), r.count == 2, let b = UInt64(r[0]), let u = UInt32(r[1]) {
                    v.rate = VifSpec.Rate(bytesPerInterval: b, intervalMicroseconds: u)
                }
            }
            v.mac = v.mac ?? mac
            return v
        }
        return next
    }

    /// Destroys the domain and removes what the toolstack made for it;
    /// false when it was gone already (someone else destroyed it).
    @discardableResult
    func destroyForRestart(_ domid: XenHV.DomID, _ hv: Hypervisor) throws -> Bool {
        var destroyed = true
        do { try hv.destroyDomain(domid) } catch let e as XenErrno where e == .ESRCH { destroyed = false }
        removeStoreEntries(of: domid)
        return destroyed
    }

    /// preserve_domain: renames the old domain to `<name>-<YYYYMMDDTHHMMZ>`
    /// (in xenhv and in its store home) so the name is free for the new one.
    func preserveName(_ info: Hypervisor.DomainInfo, _ hv: Hypervisor, _ xs: XenBusClient) throws -> String {
        var now = time(nil)
        var tm = tm()
        gmtime_r(&now, &tm)
        var buf = [CChar](repeating: 0, count: 24)
        strftime(&buf, buf.count, "-%Y%m%dT%H%MZ", &tm)
        let suffix = cString(buf)
        var candidate = info.name.prefix(utf8: 64 - suffix.utf8.count) + suffix
        do { try hv.renameDomain(info.domid, to: candidate) } catch let e as XenErrno where e == .EEXIST {
            // Twice in one minute: the old domid keeps the names apart.
            let more = suffix + "-\(info.domid)"
            candidate = info.name.prefix(utf8: 64 - more.utf8.count) + more
            try hv.renameDomain(info.domid, to: candidate)
        }
        try xs.write("/local/domain/\(info.domid)/name", candidate)
        return candidate
    }
}
