import Foundation
import Glibc
import Testing
import XenCtl
import XenTestKit

/// Device hotplug end to end: `xenctl block-attach` / `network-attach` /
/// `*-detach` against the real daemons and a running pvguest that brings its
/// frontends up and down (root: bridges, taps, network namespaces). Part of
/// the serialized xenctl suite.
extension XenctlCLITests {
    /// Runs a program (bounded); its exit status.
    @discardableResult
    func sh(_ exe: String, _ args: [String], environment: [String: String] = [:]) -> Int32 {
        CommandResult.run(exe, args, environment: environment).status
    }


    /// Whether `path` exists in the run directory's xenstore (Debian's xenstore-exists).
    func storeHas(_ path: String, runDir: String) -> Bool {
        sh("/usr/bin/xenstore-exists", [path], environment: ["XENSTORED_PATH": runDir + "/xenstored/socket"]) == 0
    }

    /// The value at `path` in the run directory's xenstore (Debian's xenstore-read), or nil.
    func storeRead(_ path: String, runDir: String) -> String? {
        let r = CommandResult.run("/usr/bin/xenstore-read", [path], environment: ["XENSTORED_PATH": runDir + "/xenstored/socket"])
        return r.status == 0 ? r.out.trimmingCharacters(in: .newlines) : nil
    }

    /// The first 4 bytes of `file` at `offset`.
    func bytes(_ file: String, at offset: UInt64 = 0) -> [UInt8] {
        guard let h = FileHandle(forReadingAtPath: file) else { return [] }
        defer { try? h.close() }
        try? h.seek(toOffset: offset)
        return [UInt8]((try? h.read(upToCount: 4)) ?? Data())
    }

    func qemuIO(_ uri: String, _ commands: [String]) -> Int32 {
        sh("/usr/bin/qemu-io", ["-f", "raw", uri] + commands.flatMap { ["-c", $0] })
    }

    /// A guest with no devices, then disks attached and detached while it
    /// runs: real I/O through each printed NBD URI lands in its image, a
    /// detach takes only that disk's socket away, a re-attach works, and
    /// every bad input is one line, a non-zero exit and no store node.
    @Test func blockAttachHotplugsDisksIntoARunningGuest() throws {
        let run = NSTemporaryDirectory() + "xenctl-hpblk-\(UUID().uuidString.prefix(8))"
        var stopped: Int32 = 0
        defer {
            if stopped > 0 { kill(stopped, SIGCONT) }
            tearDown(run)
        }
        try FileManager.default.createDirectory(atPath: run, withIntermediateDirectories: true)
        #expect(try xenctl("up", runDir: run).0 == 0)
        let imgA = run + "/a.img", imgB = run + "/b.img"
        for img in [imgA, imgB] {
            #expect(FileManager.default.createFile(atPath: img, contents: nil) && truncate(img, 32 << 20) == 0)
        }
        let cfg = run + "/bare.cfg"
        #expect(FileManager.default.createFile(atPath: cfg, contents: Data("name = 'bare'\nmemory = 64\n".utf8)))
        let (crc, cout, cerr) = try xenctl("create", cfg, runDir: run)
        #expect(crc == 0, "\(cerr)")
        #expect(!cout.contains("disk") && !cout.contains("nic"), "\(cout)")
        let domid = cout.split(separator: "(id ").last?.split(separator: ")").first.map(String.init) ?? "?"
        let guestPID = Int32(cout.split(separator: "guest process ").last?.split(separator: "\n").first ?? "") ?? 0
        let sockets = run + "/guests/\(domid)"

        // Two disks, attached one after the other; each prints its URI.
        let (arc, aout, aerr) = try xenctl("block-attach", "bare", "format=raw, vdev=xvdb, access=rw, target=\(imgA)", runDir: run)
        #expect(arc == 0, "\(aerr)")
        #expect(aout == "disk xvdb: nbd+unix:///xvdb?socket=\(sockets)/xvdb.sock\n", "\(aout)")
        let uriA = "nbd+unix:///xvdb?socket=\(sockets)/xvdb.sock"
        #expect(qemuIO(uriA, ["write -P 0x61 4096 65536", "read -P 0x61 4096 65536", "flush"]) == 0)
        #expect(bytes(imgA, at: 4096) == [0x61, 0x61, 0x61, 0x61])
        // xl's older form: the disk in several arguments.
        let (brc, bout, berr) = try xenctl("block-attach", "bare", "phy:\(imgB)", "xvdc", "w", runDir: run)
        #expect(brc == 0 && bout == "disk xvdc: nbd+unix:///xvdc?socket=\(sockets)/xvdc.sock\n", "\(bout)\(berr)")
        let uriB = "nbd+unix:///xvdc?socket=\(sockets)/xvdc.sock"
        #expect(qemuIO(uriB, ["write -P 0x62 0 65536", "flush"]) == 0)
        #expect(bytes(imgB) == [0x62, 0x62, 0x62, 0x62])
        let list = try xenctl("block-list", "bare", runDir: run).1
        #expect(list.contains("51728") && list.contains("51744"), "\(list)")

        // Detach one: its socket goes, the other keeps working.
        #expect(try xenctl("block-detach", "bare", "xvdb", runDir: run).0 == 0)
        #expect(eventually { access(sockets + "/xvdb.sock", F_OK) != 0 }, "xvdb's socket outlived the detach")
        #expect(access(sockets + "/xvdc.sock", F_OK) == 0)
        #expect(qemuIO(uriB, ["write -P 0x63 65536 65536", "read -P 0x63 65536 65536", "read -P 0x62 0 65536", "flush"]) == 0)
        #expect(bytes(imgB, at: 65536) == [0x63, 0x63, 0x63, 0x63])
        #expect(qemuIO(uriA, ["read 0 4096"]) != 0)
        #expect(!storeHas("/local/domain/\(domid)/device/vbd/51728", runDir: run))

        // Attached again, the same disk comes back with its data.
        #expect(try xenctl("block-attach", "bare", "vdev=xvdb, target=\(imgA)", runDir: run).0 == 0)
        #expect(qemuIO(uriA, ["read -P 0x61 4096 65536"]) == 0)

        // Bad input: one line naming the object, non-zero exit, nothing left.
        let bad: [([String], String)] = [
            (["ghost", "vdev=xvdd, target=\(imgA)"], "xenctl: no domain 'ghost'\n"),
            (["bare", "vdev=xvdd"], "xenctl: disk 'vdev=xvdd': no target given (e.g. target=/path/disk.img)\n"),
            (["bare", "vdev=zzz, target=\(imgA)"], "xenctl: disk 'vdev=zzz, target=\(imgA)': 'zzz' is not a virtual device name (xvda, xvdb1, d0p1, hda, sda or a device number such as 51712), or is out of range\n"),
            (["bare", "vdev=xvdd, target=\(run)/nope.img"], "xenctl: disk xvdd: target \(run)/nope.img does not exist\n"),
            (["bare", "vdev=xvdc, target=\(imgA)"], "xenctl: domain 'bare' already has a disk xvdc (device 51744)\n"),
        ]
        for (args, message) in bad {
            let (rc, out, err) = try xenctl("block-attach", args[0], args[1], runDir: run)
            #expect(rc != 0 && out.isEmpty && err == message, "\(args): \(err)")
        }
        #expect(!storeHas("/local/domain/0/backend/vbd/\(domid)/51760", runDir: run))
        // The duplicate left the existing xvdc alone.
        #expect(qemuIO(uriB, ["read -P 0x62 0 65536"]) == 0)

        // Another running domain gets no disk that `bare` has writable, not
        // even read-only, under any path to it (Xen's block script,
        // check_sharing): one line, nothing made.
        let otherCfg = run + "/other.cfg"
        #expect(FileManager.default.createFile(atPath: otherCfg, contents: Data("name = 'other'\nmemory = 16\n".utf8)))
        #expect(try xenctl("create", otherCfg, runDir: run).0 == 0)
        let alias = run + "/alias.img"
        #expect(link(imgB, alias) == 0)
        for spec in ["vdev=xvdb, target=\(imgB)", "vdev=xvdb, access=ro, target=\(alias)"] {
            let (rc, out, err) = try xenctl("block-attach", "other", spec, runDir: run)
            let target = spec.hasSuffix(alias) ? alias : imgB
            #expect(rc != 0 && out.isEmpty && err == "xenctl: disk xvdb: \(target) is in use by domain \(domid), writable; a disk is shared only read-only by all\n", "\(err)")
        }
        #expect(try xenctl("block-list", "other", runDir: run).1.split(separator: "\n").count == 1, "nothing was attached")
        #expect(try xenctl("destroy", "other", runDir: run).0 == 0)

        // A backend that fails (a directory is no disk): its reason, at once,
        // and the device removed; the guest left it out, and attaching it again
        // (with a real image) brings it up.
        let dirTarget = run + "/notadisk"
        try FileManager.default.createDirectory(atPath: dirTarget, withIntermediateDirectories: true)
        let (frc, fout, ferr) = try xenctl("block-attach", "bare", "vdev=xvde, target=\(dirTarget)", runDir: run)
        #expect(frc != 0 && fout.isEmpty && ferr.split(separator: "\n").count == 1, "\(ferr)")
        #expect(ferr.hasPrefix("xenctl: domain 'bare': disk xvde: the backend failed: probing the device: open \(dirTarget): Is a directory"), "\(ferr)")
        #expect(!storeHas("/local/domain/0/backend/vbd/\(domid)/51776", runDir: run))
        #expect(!storeHas("/local/domain/\(domid)/device/vbd/51776", runDir: run))
        #expect(try xenctl("block-attach", "bare", "vdev=xvde, target=\(imgB)", "--timeout", "10", runDir: run).0 == 0)
        // block-detach takes every vdev form a disk spec takes: 0xca40 is xvde (51776).
        #expect(try xenctl("block-detach", "bare", "0xca40", runDir: run).0 == 0)
        // create fails the same way when a configured disk does not connect, and leaves no domain.
        let broken = run + "/broken.cfg"
        #expect(FileManager.default.createFile(atPath: broken, contents: Data("name = 'broken'\ndisk = [ 'vdev=xvda, target=\(dirTarget)' ]\n".utf8)))
        let (xrc, _, xerr) = try xenctl("create", broken, runDir: run)
        #expect(xrc != 0 && xerr.hasPrefix("xenctl: domain 'broken': disk xvda did not connect: the backend failed: probing the device: open \(dirTarget)"), "\(xerr)")
        #expect(try xenctl("list", runDir: run).1.split(separator: "\n").count == 3)

        // A guest that never connects: the attach times out and takes the device away.
        #expect(guestPID > 0 && kill(guestPID, SIGSTOP) == 0)
        stopped = guestPID
        let (trc, tout, terr) = try xenctl("block-attach", "bare", "vdev=xvdd, target=\(imgA)", "--timeout", "1", runDir: run)
        #expect(trc != 0 && tout.isEmpty && terr.split(separator: "\n").count == 1, "\(terr)")
        #expect(terr.hasPrefix("xenctl: domain 'bare': disk xvdd: the guest did not connect it within 1 s"), "\(terr)")
        #expect(!storeHas("/local/domain/0/backend/vbd/\(domid)/51760", runDir: run))
        #expect(!storeHas("/local/domain/\(domid)/device/vbd/51760", runDir: run))
        // Detached and attached again (another image) before the guest looks:
        // it brings up the new disk, not the old one, and prints the new line.
        let imgC = run + "/c.img"
        #expect(FileManager.default.createFile(atPath: imgC, contents: Data(repeating: 0x64, count: 4096)) && truncate(imgC, 48 << 20) == 0)
        #expect(try xenctl("block-detach", "bare", "xvdc", runDir: run).0 == 0)
        let again = Process()
        again.executableURL = URL(fileURLWithPath: Self.bin)
        again.arguments = ["block-attach", "bare", "vdev=xvdc, target=\(imgC)", "--run-dir", run]
        let againOut = Pipe()
        again.standardOutput = againOut
        again.standardError = againOut
        try again.run()
        #expect(eventually { storeHas("/local/domain/\(domid)/device/vbd/51744", runDir: run) })
        kill(guestPID, SIGCONT)
        stopped = 0
        again.waitUntilExit()
        let againText = String(decoding: againOut.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(again.terminationStatus == 0 && againText == "disk xvdc: \(uriB)\n", "\(againText)")
        // The new image's bytes, and its size (48 MiB, the old one had 32).
        #expect(qemuIO(uriB, ["read -P 0x64 0 4096", "read 40M 4096"]) == 0, "xvdc does not serve its new image")
        // The guest, running again, never brings the removed disk up; a new attach works.
        #expect(try xenctl("block-attach", "bare", "vdev=xvdd, target=\(imgA)", runDir: run).0 == 0)
        #expect(access(sockets + "/xvdd.sock", F_OK) == 0)
        #expect(try xenctl("block-list", "bare", runDir: run).1.split(separator: "\n").count == 4)

        // A device whose backend never answers (no backend serves its type)
        // holds up neither another attach nor the guest's shutdown.
        let env = ["XENSTORED_PATH": run + "/xenstored/socket"]
        let fe = "/local/domain/\(domid)/device/vbd/51792", be = "/local/domain/0/backend/nobody/\(domid)/51792"
        #expect(sh("/usr/bin/xenstore-write", [be + "/state", "1", be + "/online", "1", be + "/frontend", fe], environment: env) == 0)
        #expect(sh("/usr/bin/xenstore-chmod", ["-r", be, "n0", "r\(domid)"], environment: env) == 0)
        #expect(sh("/usr/bin/xenstore-write", [fe + "/backend", be, fe + "/backend-id", "0", fe + "/state", "1"], environment: env) == 0)
        #expect(sh("/usr/bin/xenstore-chmod", ["-r", fe, "n\(domid)", "r0"], environment: env) == 0)
        var started = Date()
        #expect(try xenctl("block-attach", "bare", "vdev=xvdg, target=\(imgB)", runDir: run).0 == 0)
        #expect(Date().timeIntervalSince(started) < 10, "the attach waited for the stuck device")
        started = Date()
        let (src, _, serr) = try xenctl("shutdown", "bare", runDir: run)
        #expect(src == 0, "\(serr)")
        #expect(Date().timeIntervalSince(started) < 20, "the shutdown waited for the stuck device")
        let log = (try? String(contentsOfFile: run + "/logs/guest-bare.log", encoding: .utf8)) ?? ""
        #expect(log.contains("shut down at the toolstack's request"), "\(log.suffix(2000))")

        let (drc, _, _) = try xenctl("down", runDir: run)
        #expect(drc == 0)
        #expect(processes(mentioning: run).isEmpty)
    }

    /// NICs attached to and detached from a running guest: the tap joins the
    /// bridge, eth<devid> appears in the guest's namespace and pings a peer
    /// on the bridge; a detach takes tap and NIC away, the other NIC stays;
    /// bad input leaves no store node and no tap.
    @Test func networkAttachHotplugsNICsIntoARunningGuest() throws {
        let run = NSTemporaryDirectory() + "xenctl-hpnet-\(UUID().uuidString.prefix(8))"
        let tag = "\(getpid() % 100000)"
        let bridge = "xhb\(tag)", vethHost = "xhv\(tag)a", vethPeer = "xhv\(tag)b", peerNS = "xhp\(tag)"
        let ip = "/usr/sbin/ip"
        let netlink = URL(fileURLWithPath: Self.bin).deletingLastPathComponent().appendingPathComponent("xen-netlink").path
        var stopped: Int32 = 0
        var guestNS = ""
        defer {
            if stopped > 0 { kill(stopped, SIGCONT) }
            _ = try? xenctl("down", runDir: run)
            for pid in processes(mentioning: run) { kill(pid, SIGKILL) }
            sh(ip, ["netns", "del", peerNS])
            if !guestNS.isEmpty { sh(ip, ["netns", "del", guestNS]) }
            sh(ip, ["link", "del", vethHost])
            sh(netlink, ["bridge-del", bridge])
            try? FileManager.default.removeItem(atPath: run)
        }
        try FileManager.default.createDirectory(atPath: run, withIntermediateDirectories: true)
        #expect(try xenctl("up", runDir: run).0 == 0)
        // The peer: a namespace on a veth whose other end is on the bridge.
        #expect(sh(netlink, ["bridge-add", bridge]) == 0)
        #expect(sh(ip, ["netns", "add", peerNS]) == 0)
        #expect(sh(ip, ["link", "add", vethHost, "type", "veth", "peer", "name", vethPeer, "netns", peerNS]) == 0)
        #expect(sh(ip, ["link", "set", vethHost, "master", bridge, "up"]) == 0)
        #expect(sh(ip, ["-n", peerNS, "addr", "add", "10.215.0.1/24", "dev", vethPeer]) == 0)
        #expect(sh(ip, ["-n", peerNS, "link", "set", vethPeer, "up"]) == 0)

        let cfg = run + "/bare.cfg"
        #expect(FileManager.default.createFile(atPath: cfg, contents: Data("name = 'bare'\nmemory = 32\n".utf8)))
        let (crc, cout, cerr) = try xenctl("create", cfg, runDir: run)
        #expect(crc == 0, "\(cerr)")
        let domid = cout.split(separator: "(id ").last?.split(separator: ")").first.map(String.init) ?? "?"
        let guestPID = Int32(cout.split(separator: "guest process ").last?.split(separator: "\n").first ?? "") ?? 0
        guestNS = Toolstack(runDir: run).networkNamespace(of: UInt16(domid) ?? 0)
        // The guest runs unprivileged, as its domain's uid, in a network
        // namespace of its own that has the domain's name from the start.
        let status = (try? String(contentsOfFile: "/proc/\(guestPID)/status", encoding: .utf8)) ?? ""
        let uid = UInt16(domid).map { Toolstack(runDir: run).guestID(of: $0) } ?? 0
        #expect(status.split(separator: "\n").contains { $0.hasPrefix("Uid:\t\(uid)\t\(uid)\t\(uid)\t\(uid)") }, "\(status)")
        var own = stat(), named = stat()
        #expect(stat("/proc/\(guestPID)/ns/net", &own) == 0 && stat("/run/netns/" + guestNS, &named) == 0 && own.st_ino == named.st_ino)
        // xl pause / unpause: the guest's process stops, and so does
        // everything in its PID namespace; the state letters say so.
        func isStopped(_ pid: Int32) -> Bool {
            ((try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? "").split(separator: ")").last?
                .split(separator: " ").first == "T"
        }
        #expect(try xenctl("pause", "bare", runDir: run).0 == 0)
        #expect(eventually { isStopped(guestPID) }, "the paused guest still runs")
        #expect(try xenctl("list", runDir: run).1.contains("--p---"))
        #expect(try xenctl("unpause", "bare", runDir: run).0 == 0)
        #expect(eventually { !isStopped(guestPID) }, "the unpaused guest is still stopped")
        #expect(try xenctl("pause", "0", runDir: run).2 == "xenctl: domain 0 cannot be paused\n")
        #expect(try xenctl("pause", "ghost", runDir: run).2 == "xenctl: no domain 'ghost'\n")
        // Other guests' logs and configs are closed to it.
        for dir in ["logs", "monitors"] {
            var st = stat()
            #expect(stat(run + "/" + dir, &st) == 0 && st.st_mode & 0o007 == 0, "\(dir) is open to guests")
        }

        let (arc, aout, aerr) = try xenctl("network-attach", "bare", "mac=00:16:3e:00:15:01, bridge=\(bridge)", runDir: run)
        #expect(arc == 0, "\(aerr)")
        #expect(aout == "nic eth0 netns \(guestNS) mac 00:16:3e:00:15:01\n", "\(aout)")
        #expect(access("/sys/class/net/\(bridge)/brif/vif\(domid).0", F_OK) == 0)
        #expect(sh(ip, ["-n", guestNS, "link", "show", "eth0"]) == 0)
        #expect(sh(ip, ["-n", guestNS, "addr", "add", "10.215.0.2/24", "dev", "eth0"]) == 0)
        // ARP and ICMP through netfront, the rings, netback, the tap and the bridge.
        var pinged = false
        for _ in 0..<20 where !pinged {
            pinged = sh(ip, ["netns", "exec", guestNS, "ping", "-c", "1", "-W", "1", "10.215.0.1"]) == 0
        }
        #expect(pinged, "no ping reply from the peer through the hotplugged NIC")

        // A second NIC takes the lowest free id; its tap has the vifname
        // asked for, and the store has that and `ip` for hotplug scripts.
        let vifname = "xhn\(tag)"
        // One setting per argument, as xl takes them.
        let (brc, bout, berr) = try xenctl("network-attach", "bare", "bridge=\(bridge)", "vifname=\(vifname)", "ip=10.215.0.3", runDir: run)
        #expect(brc == 0 && bout.hasPrefix("nic eth1 netns \(guestNS) mac 00:16:3e:"), "\(bout)\(berr)")
        #expect(access("/sys/class/net/\(bridge)/brif/\(vifname)", F_OK) == 0)
        #expect(access("/sys/class/net/vif\(domid).1", F_OK) != 0)
        #expect(storeRead("/local/domain/0/backend/vif/\(domid)/1/ip", runDir: run) == "10.215.0.3")
        // A vifname some device has already is refused, never joined (that
        // would hand the guest's frames to it).
        let (nrc, nout, nerr) = try xenctl("network-attach", "bare", "bridge=\(bridge), vifname=\(bridge)", runDir: run)
        #expect(nrc != 0 && nout.isEmpty && nerr.hasPrefix("xenctl: domain 'bare': vif 2: the backend failed: ")
                && nerr.split(separator: "\n").count == 1, "\(nerr)")
        #expect(!storeHas("/local/domain/0/backend/vif/\(domid)/2", runDir: run))

        // Detaching eth0: tap and NIC go, eth1 stays.
        #expect(try xenctl("network-detach", "bare", "0", runDir: run).0 == 0)
        #expect(eventually { access("/sys/class/net/vif\(domid).0", F_OK) != 0 }, "the tap outlived the detach")
        #expect(eventually { sh(ip, ["-n", guestNS, "link", "show", "eth0"]) != 0 }, "eth0 outlived the detach")
        #expect(sh(ip, ["-n", guestNS, "link", "show", "eth1"]) == 0)
        #expect(access("/sys/class/net/\(bridge)/brif/\(vifname)", F_OK) == 0)

        // Bad input: one line naming the object, non-zero exit, no node, no tap.
        let bad: [([String], String)] = [
            (["ghost", "bridge=\(bridge)"], "xenctl: no domain 'ghost'\n"),
            (["bare", "bridge=\(bridge), colour=red"], "xenctl: vif 'bridge=\(bridge), colour=red': unknown vif keyword 'colour'\n"),
            (["bare", "mac=01:02:03:04:05:06, bridge=\(bridge)"], "xenctl: vif 'mac=01:02:03:04:05:06, bridge=\(bridge)': '01:02:03:04:05:06' is a multicast address; a NIC needs a unicast one\n"),
            (["bare", "bridge=nosuch\(tag)"], "xenctl: bridge 'nosuch\(tag)' does not exist (xen-netlink bridge-add nosuch\(tag) creates it)\n"),
        ]
        for (args, message) in bad {
            let (rc, out, err) = try xenctl("network-attach", args[0], args[1], runDir: run)
            #expect(rc != 0 && out.isEmpty && err == message, "\(args): \(err)")
        }
        #expect(!storeHas("/local/domain/0/backend/vif/\(domid)/0", runDir: run))

        // A guest that never connects: timeout, the device and its tap go again.
        #expect(guestPID > 0 && kill(guestPID, SIGSTOP) == 0)
        stopped = guestPID
        let (trc, tout, terr) = try xenctl("network-attach", "bare", "bridge=\(bridge)", "--timeout", "1", runDir: run)
        #expect(trc != 0 && tout.isEmpty && terr.hasPrefix("xenctl: domain 'bare': vif 0: the guest did not connect it within 1 s"), "\(terr)")
        #expect(terr.split(separator: "\n").count == 1)
        #expect(!storeHas("/local/domain/0/backend/vif/\(domid)/0", runDir: run))
        #expect(!storeHas("/local/domain/\(domid)/device/vif/0", runDir: run))
        #expect(access("/sys/class/net/vif\(domid).0", F_OK) != 0, "a failed attach left its tap")
        // The same with a vifname: that tap is gone too when the attach returns.
        let timedOut = "xht\(tag)"
        let (vrc, _, verr) = try xenctl("network-attach", "bare", "bridge=\(bridge), vifname=\(timedOut)", "--timeout", "1", runDir: run)
        #expect(vrc != 0 && verr.split(separator: "\n").count == 1, "\(verr)")
        #expect(access("/sys/class/net/\(timedOut)", F_OK) != 0, "a failed attach left its tap \(timedOut)")
        // Ctrl-C while the guest does not connect: one line, and undone too.
        let interrupted = Process()
        interrupted.executableURL = URL(fileURLWithPath: Self.bin)
        interrupted.arguments = ["network-attach", "bare", "bridge=\(bridge)", "--timeout", "60", "--run-dir", run]
        let interruptedErr = Pipe()
        interrupted.standardOutput = FileHandle.nullDevice
        interrupted.standardError = interruptedErr
        try interrupted.run()
        #expect(eventually { storeHas("/local/domain/0/backend/vif/\(domid)/0", runDir: run) })
        kill(interrupted.processIdentifier, SIGINT)
        interrupted.waitUntilExit()
        let interruptedText = String(decoding: interruptedErr.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(interrupted.terminationStatus != 0 && interruptedText == "xenctl: domain 'bare': vif 0: interrupted; removed\n", "\(interruptedText)")
        // Gone, though not always at once: vif-bridge's hotplug-status may
        // land just after the removal and re-create the directory, which
        // netback then removes again.
        #expect(eventually { !storeHas("/local/domain/0/backend/vif/\(domid)/0", runDir: run) })
        #expect(!storeHas("/local/domain/\(domid)/device/vif/0", runDir: run))
        kill(guestPID, SIGCONT)
        stopped = 0

        // The last NIC, detached by its MAC as xl network-detach takes it,
        // leaves the guest's namespace (it lives in it); the domain's end
        // takes it away. A MAC no NIC has is one error line.
        let (mrc, _, merr) = try xenctl("network-detach", "bare", "00:16:3e:7f:7f:7f", runDir: run)
        #expect(mrc != 0 && merr == "xenctl: domain 'bare' has no vif with MAC 00:16:3e:7f:7f:7f\n", "\(merr)")
        let mac1 = bout.split(separator: " ").last.map { String($0).trimmingCharacters(in: .whitespacesAndNewlines) } ?? "?"
        #expect(try xenctl("network-detach", "bare", mac1.uppercased(), runDir: run).0 == 0)
        #expect(eventually { access("/sys/class/net/\(vifname)", F_OK) != 0 })
        #expect(eventually { sh(ip, ["-n", guestNS, "link", "show", "eth1"]) != 0 }, "eth1 outlived the detach")
        #expect(access("/run/netns/" + guestNS, F_OK) == 0)
        #expect(try xenctl("network-list", "bare", runDir: run).1.split(separator: "\n").count == 1)

        #expect(try xenctl("down", runDir: run).0 == 0)
        #expect(processes(mentioning: run).isEmpty)
        #expect(access("/run/netns/" + guestNS, F_OK) != 0, "\(guestNS) outlived its domain")
    }
}
