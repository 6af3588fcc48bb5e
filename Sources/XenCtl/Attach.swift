import CXen
import Foundation
import Glibc
import XenBus
import XenHV
import XenStore

/// Device hotplug: the store layout `create` and the attach verbs share, and
/// `xl block-attach` / `xl network-attach`.
extension Toolstack {
    /// libxl_device_disk_add's store part: the vbd's backend and frontend
    /// directories for blkback and the guest. `exclusive`: an existing device
    /// with that vdev is an error (EEXIST), not replaced.
    func addDisk(_ disk: DiskSpec, to domid: XenStore.DomID, _ xs: XenBusClient, exclusive: Bool = false) throws {
        try checkSharing(disk, with: domid, xs)
        try xs.createDevice(
            XenBusDevice(type: "vbd", frontendDomid: domid, devid: Int(disk.devid)),
            backend: ["params": disk.target, "mode": disk.access.rawValue, "type": "file", "dev": disk.vdev,
                      "device-type": disk.isCDROM ? "cdrom" : "disk", "discard-enable": disk.discard ? "1" : "0",
                      "removable": "0", "bootable": "1"],
            frontend: ["virtual-device": "\(disk.devid)", "device-type": disk.isCDROM ? "cdrom" : "disk"],
            exclusive: exclusive)
    }

    /// Xen's block hotplug script (`check_sharing`): a disk is not shared
    /// with another running domain when either has it writable, so two
    /// guests never write one image or device at once. The same file (device
    /// and inode) or block device (its number) under any path counts; a domain
    /// shut down or crashed (a preserved one) does no I/O and does not count.
    func checkSharing(_ disk: DiskSpec, with domid: XenStore.DomID, _ xs: XenBusClient) throws {
        var mine = stat()
        guard stat(disk.target, &mine) == 0 else { return }  // a missing target is refused on its own
        func same(_ other: stat) -> Bool {
            let block = mine.st_mode & S_IFMT == S_IFBLK
            guard block == (other.st_mode & S_IFMT == S_IFBLK) else { return false }
            return block ? mine.st_rdev == other.st_rdev : mine.st_dev == other.st_dev && mine.st_ino == other.st_ino
        }
        let running = (try? connect().listDomains()).map { Set($0.filter { !$0.isShutdown }.map { "\($0.domid)" }) }
        let root = XenBusDevice.backendRoot(type: "vbd")
        for other in (try? xs.directory(root)) ?? [] where other != "\(domid)" && running?.contains(other) != false {
            for dev in (try? xs.directory(root + "/" + other)) ?? [] {
                let be = root + "/\(other)/\(dev)"
                guard let params = (try? xs.readIfExists(be + "/params")) ?? nil else { continue }
                var theirs = stat()
                guard stat(params, &theirs) == 0, same(theirs) else { continue }
                let writable = ((try? xs.readIfExists(be + "/mode")) ?? nil) != "r"
                if disk.access == .readWrite || writable {
                    throw Failure("disk \(disk.vdev): \(disk.target) is in use by domain \(other)\(writable ? ", writable" : ", read-only"); a disk is shared only read-only by all")
                }
            }
        }
    }

    /// libxl_device_nic_add's store part: the vif's directories for netback
    /// and the guest; returns the MAC (the spec's, or a random one in Xen's OUI).
    @discardableResult
    func addVif(_ vif: VifSpec, devid: Int, to domid: XenStore.DomID, _ xs: XenBusClient, exclusive: Bool = false) throws -> String {
        let mac = (vif.mac ?? MACAddress.randomXen()).description
        var be = ["mac": mac, "bridge": vif.bridge, "handle": "\(devid)", "type": "vif"]
        if let script = vif.script { be["script"] = script }
        if let rate = vif.rate { be["rate"] = rate.xenstoreValue }
        if let mtu = vif.mtu { be["mtu"] = "\(mtu)" }
        // For netback (the tap's name) and the hotplug script, as libxl writes them.
        if let name = vif.vifname { be["vifname"] = name }
        if let ip = vif.ip { be["ip"] = ip }
        try xs.createDevice(XenBusDevice(type: "vif", frontendDomid: domid, devid: devid), backend: be,
                            frontend: ["mac": mac, "handle": "\(devid)"], exclusive: exclusive)
        return mac
    }

    /// libxl's create fails when a device does not connect: the guest listed
    /// `disks` (vdevs) and `nics` NICs; any configured one missing is an error
    /// naming it, with the backend's reason when it gave one.
    func checkConnected(_ config: DomainConfig, domid: XenStore.DomID, disks: [String], nics: Int, _ xs: XenBusClient) throws {
        func reason(_ dev: XenBusDevice) -> String {
            ((try? xs.readIfExists(dev.backendPath + "/error")) ?? nil).map { ": the backend failed: \($0)" } ?? ""
        }
        for d in config.disks where !disks.contains(d.vdev) {
            let why = reason(XenBusDevice(type: "vbd", frontendDomid: domid, devid: Int(d.devid)))
            throw Failure("domain '\(config.name)': disk \(d.vdev) did not connect\(why); see \(runDir)/logs/guest-\(config.name).log")
        }
        if nics < config.vifs.count {
            throw Failure("domain '\(config.name)': \(config.vifs.count - nics) of its \(config.vifs.count) vifs did not connect; see \(runDir)/logs/guest-\(config.name).log")
        }
    }

    /// Why a disk cannot be attached as given (its target is missing), or nil.
    static func missingTarget(_ d: DiskSpec) -> String? {
        access(d.target, F_OK) == 0 ? nil : "disk \(d.vdev): target \(d.target) does not exist"
    }

    /// Why a vif cannot be attached as given (its bridge is missing), or nil.
    static func missingBridge(_ v: VifSpec) -> String? {
        access("/sys/class/net/\(v.bridge)/bridge", F_OK) == 0
            ? nil : "bridge '\(v.bridge)' does not exist (xen-netlink bridge-add \(v.bridge) creates it)"
    }

    /// (vdev, NBD URI) from a guest's line "disk NAME SECTORS sectors [ro] URI".
    static func diskEntry(_ line: String) -> (String, String)? {
        let w = line.split(separator: " ")
        guard w.first == "disk", w.count >= 3, let uri = w.last else { return nil }
        return (String(w[1]), String(uri))
    }

    /// `xl block-attach DOMAIN DISKSPEC...`: the disk's directories as
    /// `create` writes them, then a bounded wait for the guest to bring it
    /// up; returns its (vdev, NBD URI). The disk may come in several strings,
    /// as xl takes it (`phy:/dev/sdb xvdb w`). On any failure the device is
    /// removed again.
    public func blockAttach(_ domain: String, spec: String, seconds: Double = 30) throws -> (vdev: String, uri: String) {
        try blockAttach(domain, specs: [spec], seconds: seconds)
    }

    public func blockAttach(_ domain: String, specs: [String], seconds: Double = 30) throws -> (vdev: String, uri: String) {
        let spec = specs.joined(separator: " ")
        var disk: DiskSpec
        do { disk = try DiskSpec(parsing: specs) } catch { throw Failure("disk '\(spec)': \(error.message)") }
        // Relative to this directory, not blkback's: checked and written absolute.
        if !disk.target.hasPrefix("/") {
            guard let cwd = DiskSpec.currentDirectory() else {
                throw Failure("disk '\(spec)': the target is relative and this process has no current directory to resolve it against")
            }
            disk = disk.resolvingTarget(against: cwd)
        }
        if let why = Self.missingTarget(disk) { throw Failure(why) }
        let (hv, d) = try attachTarget(domain)
        let xs = try connectStore()
        defer { xs.close() }
        let dev = XenBusDevice(type: "vbd", frontendDomid: XenStore.DomID(d.domid), devid: Int(disk.devid))
        do { try addDisk(disk, to: dev.frontendDomid, xs, exclusive: true) } catch XenBusError.xs(.EEXIST) {
            throw Failure("domain '\(d.name)' already has a disk \(disk.vdev) (device \(disk.devid))")
        }
        let line = try awaitGuest(dev, "disk \(disk.vdev)", domain: d, hv, xs, seconds: seconds)
        guard let entry = Self.diskEntry(line) else {
            try? removeDevice(dev, xs)
            throw Failure("domain '\(d.name)': disk \(disk.vdev): the guest reported '\(line)'; removed")
        }
        return entry
    }

    /// `xl network-attach DOMAIN VIFSPEC` on the lowest free device id: the
    /// vif's directories as `create` writes them, then a bounded wait for the
    /// guest's NIC; returns the guest's line ("nic IFNAME netns NS mac MAC").
    /// On any failure the device (and so its tap) is removed again.
    public func networkAttach(_ domain: String, spec: String, seconds: Double = 30) throws -> String {
        let vif: VifSpec
        do { vif = try VifSpec(parsing: spec) } catch { throw Failure("vif '\(spec)': \(error.message)") }
        return try networkAttach(domain, vif: vif, seconds: seconds)
    }

    /// The same with xl's arguments: one setting each (`mac=..` `bridge=..`),
    /// or one comma-separated spec in a single argument.
    public func networkAttach(_ domain: String, settings: [String], seconds: Double = 30) throws -> String {
        guard settings.count > 1 else { return try networkAttach(domain, spec: settings.first ?? "", seconds: seconds) }
        let vif: VifSpec
        do { vif = try VifSpec(settings: settings) } catch { throw Failure("vif '\(settings.joined(separator: " "))': \(error.message)") }
        return try networkAttach(domain, vif: vif, seconds: seconds)
    }

    func networkAttach(_ domain: String, vif: VifSpec, seconds: Double) throws -> String {
        if let why = Self.missingBridge(vif) ?? Self.tunUnusableByGuests() { throw Failure(why) }
        let (hv, d) = try attachTarget(domain)
        let xs = try connectStore()
        defer { xs.close() }
        let id = XenStore.DomID(d.domid)
        // A vifname some other device has already (netback refuses it): not ours to wait out.
        let preexisting = Set([vif.vifname].compactMap { $0 }.filter { access("/sys/class/net/\($0)", F_OK) == 0 })
        var dev: XenBusDevice
        while true {
            // libxl: the lowest device id dom0's records do not use (not the
            // guest's own directory, which it may fill as it likes).
            let used = Set((try? xs.directory(XenBusDevice.backendRoot(type: "vif") + "/\(d.domid)")) ?? [])
            dev = XenBusDevice(type: "vif", frontendDomid: id, devid: (0...).first { !used.contains("\($0)") }!)
            do {
                try addVif(vif, devid: dev.devid, to: id, xs, exclusive: true)
                break
            } catch XenBusError.xs(.EEXIST) {
                continue  // another attach took that id meanwhile
            }
        }
        let tap = Self.tapName(vif, domid: d.domid, devid: dev.devid)
        let ours = !preexisting.contains(tap)
        do {
            return try awaitGuest(dev, "vif \(dev.devid)", domain: d, hv, xs, seconds: seconds)
        } catch {
            if ours { awaitTapGone(tap) }
            throw error
        }
    }

    /// The domain to attach to, checked: it exists and is a guest.
    func attachTarget(_ domain: String) throws -> (Hypervisor, Hypervisor.DomainInfo) {
        let hv = try connect()
        let d = try resolve(hv, domain)
        guard d.domid != 0 else { throw Failure("domain 0 takes no devices here (its kernel is the host's)") }
        return (hv, d)
    }

    /// Waits (at most `seconds`) until the guest lists `dev` in its devices
    /// file (it connected: the disk's NBD socket listens, the NIC is up) and
    /// returns the guest's line. A backend that reports an error, a domain
    /// that goes away or the timeout fail it, and the device is removed.
    func awaitGuest(_ dev: XenBusDevice, _ what: String, domain d: Hypervisor.DomainInfo, _ hv: Hypervisor, _ xs: XenBusClient,
                    seconds: Double) throws -> String {
        let file = runDir + "/guests/\(d.domid)/devices"
        let key = "\(dev.type)/\(dev.devid) "
        let end = monotonicSeconds() + seconds
        var failure: String
        while true {
            // Connected first: a line still listed for a device this one
            // replaced (detached and attached while the guest was busy) goes
            // before the new device connects.
            if (try? xs.state(at: dev.frontendPath)) == .connected,
               let text = Self.readGuestFile(file),
               let line = text.split(separator: "\n").first(where: { $0.hasPrefix(key) }) {
                return String(line.dropFirst(key.count)).escapingControlCharacters  // the guest's words, printed
            }
            if let error = (try? xs.readIfExists(dev.backendPath + "/error")) ?? nil {
                failure = "the backend failed: \(error)"
                break
            }
            guard (try? hv.listDomains())?.contains(where: { $0.domid == d.domid }) == true else {
                failure = "the domain went away"
                break
            }
            guard monotonicSeconds() < end else {
                failure = "the guest did not connect it within \(Int(seconds)) s (see \(runDir)/logs/guest-\(d.name).log)"
                break
            }
            guard cxen_termination_noted() == 0 else {
                failure = "interrupted"
                break
            }
            idle(milliseconds: 50)
        }
        try? removeDevice(dev, xs)
        throw Failure("domain '\(d.name)': \(what): \(failure); removed")
    }

    /// libxl's device removal: the backend goes offline (online=0, state
    /// Closing), gets up to `seconds` to reach Closed, then both directories go.
    func removeDevice(_ dev: XenBusDevice, _ xs: XenBusClient, seconds: Double = 10) throws {
        // Only while the backend directory exists: a write would re-create it.
        try? xs.transaction { t in
            guard try t.readIfExists(dev.backendPath + "/state") != nil else { return }
            try t.write(dev.backendPath + "/online", "0")
            try t.write(dev.backendPath + "/state", "\(XenbusState.closing.rawValue)")
        }
        _ = xs.awaitState(at: dev.backendPath, seconds: seconds) { $0 == .closed || $0 == .unknown }
        try xs.destroyDevice(dev)
    }

    /// The tap netback makes for a vif: its `vifname`, else vif<domid>.<devid>.
    static func tapName(_ vif: VifSpec, domid: XenHV.DomID, devid: Int) -> String {
        vif.vifname ?? "vif\(domid).\(devid)"
    }

    /// Waits (bounded) until netback has removed the vif's tap, so a failed
    /// attach or create leaves none behind.
    func awaitTapGone(_ name: String, seconds: Int = 10) {
        let deadline = time(nil) + seconds
        while access("/sys/class/net/\(name)", F_OK) == 0 && time(nil) < deadline {
            idle(milliseconds: 50)
        }
    }
}
