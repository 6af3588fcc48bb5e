import CXen
import Foundation
import Glibc
import XenBus
import XenHV
import XenStore

extension Toolstack {
    /// What `xenctl create` made.
    public struct CreatedGuest: Sendable {
        public let name: String
        public let domid: XenHV.DomID
        public let pid: pid_t
        /// (vdev, NBD URI) per disk.
        public let disks: [(String, String)]
        /// The lines pvguest printed for its NICs ("nic IFNAME netns NS mac MAC").
        public let nics: [String]
    }

    func connectStore() throws -> XenBusClient {
        do { return try XenBusClient.connect(socketPath: xenstoreSocket) } catch {
            throw Failure("xenstored is not running at \(xenstoreSocket) (xenctl up starts it)")
        }
    }

    /// `xl create CONFIG`: the domain, its store directory, each disk as a vbd
    /// for blkback, a pvguest process as its kernel, and the domain's monitor
    /// (xl's daemonised create), which applies on_poweroff, on_reboot and
    /// on_crash. Any failure undoes all of it: no domain, no store node, no
    /// process is left behind.
    public func create(configPath: String) throws -> CreatedGuest {
        guard let text = try? String(contentsOfFile: configPath, encoding: .utf8) else {
            throw Failure("\(configPath): cannot read the file")
        }
        let config: DomainConfig
        do { config = try DomainConfig(try XLConfig(parsing: text, file: configPath)) } catch {
            throw Failure("\(error)")
        }
        let guest = try create(config, configPath: configPath, text: text)
        do { try startMonitor(for: guest, configText: text, configPath: configPath) } catch {
            if let hv = try? connect() { try? hv.destroyDomain(guest.domid) }
            removeStoreEntries(of: guest.domid)
            unlink(monitorConfigPath(guest.name))
            throw error
        }
        return guest
    }

    /// The domain of a parsed config (`text` is its file, for error lines);
    /// the monitor calls this to restart a domain, with its signalfd of
    /// termination signals as `interruptFD`: one arriving while the guest
    /// boots undoes the domain, as Ctrl-C does for `xenctl create`.
    func create(_ config: DomainConfig, configPath: String, text: String, appendLog: Bool = false,
                interruptFD: CInt = -1) throws -> CreatedGuest {
        for d in config.disks {
            if let why = Self.missingTarget(d) { throw Failure("\(configPath):\(configLine(text, "disk")): \(why)") }
        }
        for v in config.vifs {
            if let why = Self.missingBridge(v) { throw Failure("\(configPath):\(configLine(text, "vif")): \(why)") }
        }
        if !config.vifs.isEmpty, let why = Self.tunUnusableByGuests() { throw Failure(why) }
        if let why = guestsDirectoryUnreachable() { throw Failure(why) }
        let hv = try connect()
        let xs = try connectStore()
        defer { xs.close() }
        if try hv.listDomains().contains(where: { $0.name == config.name }) {
            throw Failure("domain '\(config.name)' already exists")
        }
        let dom: Hypervisor.CreatedDomain
        do { dom = try hv.createDomain(pages: config.memory * 256, name: config.name, guestIDBase: guestID(of: 0)) } catch {
            throw Failure("creating domain '\(config.name)': \(error)")
        }
        var child: pid_t = 0
        // Taps of ours to wait out on failure: not a vifname some other device has.
        let taps = config.vifs.enumerated().map { Self.tapName($1, domid: dom.domid, devid: $0) }
            .filter { access("/sys/class/net/\($0)", F_OK) != 0 }
        do {
            // The guest's end of its xenhv connection: the child's from the
            // spawn on, closed here whatever fails before.
            var guestFD = dom.guestDescriptor
            defer { if guestFD >= 0 { close(guestFD) } }
            try hv.setMaxEventChannels(dom.domid, config.maxEventChannels)  // libxl: xc_domain_set_max_evtchn
            let id = XenStore.DomID(dom.domid)
            let home = "/local/domain/\(dom.domid)"
            try xs.transaction { t in
                // The home first, owned by the guest; its children inherit that (libxl's order).
                try t.mkdir(home)
                try t.setPermissions(home, [XSPerm(id, [])])
                try t.write(home + "/name", config.name)
                try t.write(home + "/domid", "\(dom.domid)")
                try t.write(home + "/memory/target", "\(UInt64(config.memory) * 1024)")
            }
            try xs.introduce(domid: id, mfn: dom.storeMFN, port: dom.storePort)
            for disk in config.disks { try addDisk(disk, to: id, xs) }
            for (i, vif) in config.vifs.enumerated() { _ = try addVif(vif, devid: i, to: id, xs) }
            // The guest's own directory (its NBD sockets and devices list) and
            // the name its network namespace will have.
            let confinement = confinement(of: dom.domid)
            let guestDir = runDir + "/guests/\(dom.domid)"
            try FileManager.default.createDirectory(atPath: guestDir, withIntermediateDirectories: true)
            guard chown(guestDir, confinement.uid, confinement.gid) == 0 else {
                throw Failure("chown \(guestDir): \(String(cString: strerror(errno)))")
            }
            let namespace = networkNamespace(of: dom.domid)
            NetNamespace.remove(namespace)  // a stale one of an earlier domain with this id
            try NetNamespace.makeMountPoint(namespace)
            let log = Self.openGuestLog(runDir + "/logs/guest-\(config.name).log", append: appendLog)
            defer { if log >= 0 { close(log) } }
            var ready: [CInt] = [-1, -1]
            guard pipe(&ready) == 0 else { throw Failure("pipe: \(String(cString: strerror(errno)))") }
            _ = fcntl(ready[0], F_SETFD, FD_CLOEXEC)
            defer { close(ready[0]) }
            defer { if ready[1] >= 0 { close(ready[1]) } }
            let null = open("/dev/null", O_RDONLY | O_CLOEXEC)
            defer { close(null) }
            child = try ProcessLauncher.spawn(
                ProcessLauncher.executableDirectory + "/pvguest",
                arguments: ["--nbd-dir", guestDir, "--netns", namespace, "--ready-fd", "4"],
                environment: ["XENHV_GUEST_FD": "3", "XEN_RUN_DIR": runDir],
                descriptors: [(null, 0), (log >= 0 ? log : null, 1), (log >= 0 ? log : null, 2), (guestFD, 3), (ready[1], 4)],
                newSession: true, cpus: config.cpus, confinement: confinement)
            close(ready[1])
            ready[1] = -1
            close(guestFD)
            guestFD = -1
            try hv.attachProcess(child, to: dom.domid)
            var disks: [(String, String)] = []
            var nics: [String] = []
            var up = false
            // The guest is not trusted to answer, or to answer briefly: its
            // boot waits at most 120 s for its devices.
            let deadline = monotonicSeconds() + Self.guestBootSeconds
            for _ in 0..<1024 {
                guard let raw = ProcessLauncher.readLine(ready[0], deadline: deadline, interruptFD: interruptFD) else {
                    var signal = pollfd(fd: interruptFD, events: Int16(POLLIN), revents: 0)
                    if cxen_termination_noted() != 0 || (interruptFD >= 0 && poll(&signal, 1, 0) > 0) {
                        throw Failure("domain '\(config.name)': interrupted; undone")
                    }
                    throw Failure("domain '\(config.name)': the guest did not come up within \(Int(Self.guestBootSeconds)) s; see \(runDir)/logs/guest-\(config.name).log")
                }
                if raw.isEmpty { break }
                // The guest's words, printed to the user: one line each, no
                // escape sequence, and no more NICs than it was given.
                let line = raw.escapingControlCharacters
                let w = line.split(separator: " ")
                if let disk = Self.diskEntry(line), disks.count < config.disks.count { disks.append(disk) }
                if w.first == "nic" && nics.count < config.vifs.count { nics.append(line) }
                if line.hasPrefix("pvguest ready") { up = true }
            }
            guard up else {
                throw Failure("domain '\(config.name)': the guest did not come up; see \(runDir)/logs/guest-\(config.name).log")
            }
            try checkConnected(config, domid: id, disks: disks.map(\.0), nics: nics.count, xs)
            return CreatedGuest(name: config.name, domid: dom.domid, pid: child, disks: disks, nics: nics)
        } catch {
            try? hv.destroyDomain(dom.domid)  // also stops the guest process
            // Unless xenhv never learnt it (the attach failed, the domain was
            // destroyed meanwhile, xenhv went away): ours is not reaped yet,
            // so its pid is still its own.
            if child > 0 { kill(child, SIGKILL); var st: Int32 = 0; waitpid(child, &st, 0) }
            removeStoreEntries(of: dom.domid, xs)
            // netback removes the taps once their vifs are gone from the store.
            for tap in taps { awaitTapGone(tap) }
            throw error as? Failure ?? Failure("creating domain '\(config.name)': \(error)")
        }
    }

    /// How long `create` waits for a guest's ready line (pvguest waits up to
    /// 120 s for its devices).
    static let guestBootSeconds = 150.0

    /// Removes a domain's home and its device directories (libxl's part of
    /// destroy), its run directory and its network namespace's name; the
    /// last two also when the store cannot be reached.
    func removeStoreEntries(of domid: XenHV.DomID) {
        let xs = try? connectStore()
        removeStoreEntries(of: domid, xs)
        xs?.close()
    }

    /// The same, through the store connection `xs` (nil: the store cannot be reached).
    func removeStoreEntries(of domid: XenHV.DomID, _ xs: XenBusClient?) {
        NetNamespace.remove(networkNamespace(of: domid))
        removeGuestDirectory(runDir + "/guests/\(domid)")
        _ = try? xs?.transaction { t in
            for type in ["vbd", "vif"] {
                try t.rmIfPresent("/local/domain/0/backend/\(type)/\(domid)")
            }
            try t.rmIfPresent("/local/domain/\(domid)")
        }
    }

    /// `xl block-list DOMAIN`.
    public func blockList(_ domain: String) throws -> String {
        let hv = try connect()
        let d = try resolve(hv, domain)
        let xs = try connectStore()
        defer { xs.close() }
        var out = "Vdev  BE  handle state evt-ch ring-ref BE-path"
        let root = "/local/domain/0/backend/vbd/\(d.domid)"
        for devid in ((try? xs.directory(root)) ?? []).sorted() {
            let be = root + "/" + devid
            let fe = (try? xs.read(be + "/frontend")) ?? ""
            let state = (try? xs.read(be + "/state")) ?? "?"
            // Multi-queue frontends keep their keys under queue-0/ and up.
            func key(_ k: String) -> String? {
                for dir in [fe, fe + "/queue-0"] {
                    if let v = (try? xs.readIfExists(dir + "/" + k)) ?? nil { return v }
                }
                return nil
            }
            // The guest writes these: printed as the numbers they must be
            // (libxl reads them with strtoul), never as the bytes it chose.
            let evt = Self.guestNumber(key("event-channel"))
            let ring = Self.guestNumber(key("ring-ref") ?? key("ring-ref0"))
            out += "\n" + devid.padding(6) + "0".padding(4) + "0".padding(7) + state.padding(6) + evt.padding(7) + ring.padding(9) + be
        }
        return out
    }
}

/// The line of the last `key =` setting in an xl.cfg text (for errors that
/// name a setting found only after parsing).
func configLine(_ text: String, _ key: String) -> Int {
    var last = 1
    for (i, line) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
        let t = line.drop { $0 == " " || $0 == "\t" }
        if t.hasPrefix(key), t.dropFirst(key.count).drop(while: { $0 == " " }).first.map({ $0 == "=" || $0 == "+" }) == true {
            last = i + 1
        }
    }
    return last
}

extension Toolstack {
    /// `xl block-detach DOMAIN VDEV` / `xl network-detach DOMAIN DEVID|MAC`, as
    /// libxl removes a device: the backend is told to go offline (online=0,
    /// state Closing), given up to `seconds` to reach Closed, and both
    /// directories are removed; the backend then releases the device.
    public func detach(_ domain: String, type: String, device: String, seconds: Double = 10) throws {
        let hv = try connect()
        let d = try resolve(hv, domain)
        let xs = try connectStore()
        defer { xs.close() }
        let devid: Int
        if type == "vbd" {
            // The names and numbers a disk spec takes (xl's block-detach reads them the same way).
            guard let id = try? DiskSpec.devid(of: device) else {
                throw Failure("'\(device)' is not a virtual device (xvda, d0p1, 51712, ...)")
            }
            devid = Int(id)
        } else if device.contains(":") {
            // xl network-detach: a MAC address (libxl_mac_to_device_nic), as
            // dom0's record of each vif has it.
            let mac: MACAddress
            do { mac = try MACAddress(parsing: device) } catch { throw Failure(error.message) }
            let root = XenBusDevice.backendRoot(type: "vif") + "/\(d.domid)"
            let ids = ((try? xs.directory(root)) ?? []).compactMap(Int.init).sorted()
            guard let id = ids.first(where: { id in
                ((try? xs.readIfExists(root + "/\(id)/mac")) ?? nil).flatMap { try? MACAddress(parsing: $0) } == mac
            }) else { throw Failure("domain '\(d.name)' has no vif with MAC \(mac)") }
            devid = id
        } else {
            guard let id = Int(device) else { throw Failure("'\(device)' is not a vif device id or MAC address") }
            devid = id
        }
        let dev = XenBusDevice(type: type, frontendDomid: XenStore.DomID(d.domid), devid: devid)
        guard (try? xs.exists(dev.backendPath)) == true else {
            throw Failure("domain '\(d.name)' has no \(type) \(device)")
        }
        try removeDevice(dev, xs, seconds: seconds)
    }

    /// `xl network-list DOMAIN`.
    public func networkList(_ domain: String) throws -> String {
        let hv = try connect()
        let d = try resolve(hv, domain)
        let xs = try connectStore()
        defer { xs.close() }
        var out = "Idx BE Mac Addr.         handle state evt-ch   tx-/rx-ring-ref BE-path"
        let root = "/local/domain/0/backend/vif/\(d.domid)"
        for devid in ((try? xs.directory(root)) ?? []).sorted(by: { (Int($0) ?? 0) < (Int($1) ?? 0) }) {
            let be = root + "/" + devid
            func r(_ p: String) -> String { ((try? xs.readIfExists(p)) ?? nil) ?? "-1" }
            let fe = r(be + "/frontend")
            // The frontend's keys are the guest's: numbers, or -1. A
            // multi-queue netfront keeps them under queue-0/ and up, and
            // split event channels show their tx port.
            func g(_ p: String) -> String {
                Self.guestNumber(((try? xs.readIfExists(fe + "/" + p)) ?? nil) ?? ((try? xs.readIfExists(fe + "/queue-0/" + p)) ?? nil))
            }
            out += "\n" + devid.padding(4) + "0".padding(3) + r(be + "/mac").padding(18) + devid.padding(7)
                + r(be + "/state").padding(6) + { let e = g("event-channel"); return e == "-1" ? g("event-channel-tx") : e }().padding(9)
                + (g("tx-ring-ref") + "/" + g("rx-ring-ref")).padding(16) + be
        }
        return out
    }
}

extension Toolstack {
    /// `xl shutdown DOMAIN` / `xl reboot DOMAIN`: asks the guest to power off
    /// or reboot (control/shutdown, as libxl_domain_shutdown / _reboot), then
    /// waits up to `seconds` until the domain's monitor has applied
    /// on_poweroff / on_reboot: the domain is gone (destroyed, or restarted
    /// under a new domid, which is returned), or it stays shut down (preserve,
    /// or nobody follows it).
    @discardableResult
    public func shutdown(_ domain: String, reboot: Bool = false, seconds: Double = 30) throws -> XenHV.DomID? {
        let hv = try connect()
        let d = try resolve(hv, domain)
        guard d.domid != 0 else { throw Failure("domain 0 cannot be \(reboot ? "rebooted" : "shut down") from here") }
        let xs = try connectStore()
        defer { xs.close() }
        try xs.write("/local/domain/\(d.domid)/control/shutdown", reboot ? "reboot" : "poweroff")
        let end = monotonicSeconds() + seconds
        while true {
            let follower = monitor(of: d.name)
            let now = (try hv.listDomains()).first { $0.domid == d.domid }
            let followed = follower?.domid == d.domid
            if now == nil && !followed {
                // Restarted: the monitor now follows the new domain of that name.
                if let f = follower, try hv.listDomains().contains(where: { $0.domid == f.domid }) { return f.domid }
                return nil
            }
            if let now, now.isShutdown, !followed { return nil }
            guard monotonicSeconds() < end else {
                throw Failure("domain '\(d.name)' did not \(reboot ? "reboot" : "shut down") within \(Int(seconds)) s")
            }
            idle(milliseconds: 20)
        }
    }
}

extension Toolstack {
    /// A number the guest wrote (a port, a grant ref) as listings print it:
    /// the decimal value, or -1 when it is not one (as libxl's strtoul reads).
    static func guestNumber(_ value: String?) -> String {
        value.flatMap { UInt32($0) }.map { "\($0)" } ?? "-1"
    }
}
