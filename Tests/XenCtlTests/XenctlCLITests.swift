import Foundation
import Glibc
import Testing
import XenCtl
import XenHV
import XenTestKit

/// xenctl end to end against the real daemons (root: it starts xenhv and xenstored).
@Suite(.serialized) struct XenctlCLITests {
    static var bin: String {
        if let d = ProcessInfo.processInfo.environment["XEN_BUILD_DIR"] { return d + "/xenctl" }
        return URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent(".build/debug/xenctl").path
    }

    func xenctl(_ args: String..., runDir: String) throws -> (Int32, String, String) {
        // A private dom0 whose domids (and so tap names) no parallel test shares.
        let env = ["XENHV_FIRST_DOMID": ProcessInfo.processInfo.environment["XENHV_FIRST_DOMID"] ?? "\(Dom0Harness.distinctFirstDomID())"]
        let r = CommandResult.run(Self.bin, args + ["--run-dir", runDir], environment: env, timeout: 120)
        return (r.status, r.out, r.err)
    }

    /// A test's run directory undone: `down`, whatever still mentions it
    /// killed, the directory removed.
    func tearDown(_ run: String) {
        _ = try? xenctl("down", runDir: run)
        for pid in processes(mentioning: run) { kill(pid, SIGKILL) }
        try? FileManager.default.removeItem(atPath: run)
    }

    /// Processes whose command line mentions `text`.
    func processes(mentioning text: String) -> [Int32] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap { Int32($0) }.filter { pid in
            guard let d = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
            return String(decoding: d.map { $0 == 0 ? 32 : $0 }, as: UTF8.self).contains(text)
        }
    }

    /// Waits (bounded) until `service` runs with a pid other than `old`.
    func waitRestarted(_ service: String, from old: Int32, runDir: String) -> ServiceStatus? {
        for _ in 0..<400 {
            if let s = ServiceStatus.read(runDir: runDir)?.first(where: { $0.name == service }),
               s.state == "running", s.pid != old, s.pid > 0 { return s }
            var p = pollfd(fd: -1, events: 0, revents: 0)
            _ = poll(&p, 0, 50)
        }
        return nil
    }

    /// Two `xenctl up` at once on one run directory: one supervisor serves
    /// both, and `down` leaves nothing. Before, each could start its own
    /// (neither saw the other's pid file yet); `down` stopped the one the
    /// pid file named, and the other ran on with its services, unseen.
    @Test func twoUpsAtOnceMakeOneSupervisor() throws {
        let run = NSTemporaryDirectory() + "xenctl-twoup-\(UUID().uuidString.prefix(8))"
        defer { tearDown(run) }
        let env = ["XENHV_FIRST_DOMID": "\(Dom0Harness.distinctFirstDomID())"]
        let ups = (0..<2).map { _ -> Process in
            let p = Process()
            p.executableURL = URL(fileURLWithPath: Self.bin)
            p.arguments = ["up", "--run-dir", run]
            p.environment = ProcessInfo.processInfo.environment.merging(env) { $1 }
            p.standardOutput = FileHandle.nullDevice
            p.standardError = FileHandle.nullDevice
            return p
        }
        for p in ups { try p.run() }
        for p in ups { p.waitUntilExit() }
        #expect(ups.allSatisfy { $0.terminationStatus == 0 })
        let supervisors = processes(mentioning: run).filter { pid in
            let cmd = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline").map { String(decoding: $0, as: UTF8.self) } ?? ""
            return cmd.contains("supervise")
        }
        #expect(supervisors.count == 1, "\(supervisors.count) supervisors")
        #expect(try xenctl("down", runDir: run).0 == 0)
        #expect(eventually { processes(mentioning: run).isEmpty }, "down left \(processes(mentioning: run))")
    }

    /// An `up` whose services do not come up within its timeout (netback
    /// here exits at once, every time) stops the supervisor it started, and
    /// with it the services that did come up: one error line naming the
    /// laggard, nothing left running. Before, they all ran on, restarting
    /// netback for ever, and the next `up` found them.
    @Test func anUpThatTimesOutLeavesNothing() throws {
        let dir = NSTemporaryDirectory() + "xenctl-failup-\(UUID().uuidString.prefix(8))"
        let bindir = dir + "/bin", run = dir + "/run"
        defer {
            for pid in processes(mentioning: dir) { kill(pid, SIGKILL) }
            try? FileManager.default.removeItem(atPath: dir)
        }
        try FileManager.default.createDirectory(atPath: bindir, withIntermediateDirectories: true)
        // A copy, so the supervisor it starts looks for the services beside it.
        try FileManager.default.copyItem(atPath: Self.bin, toPath: bindir + "/xenctl")
        let build = URL(fileURLWithPath: Self.bin).deletingLastPathComponent().path
        for s in ["xenhv", "xenstored", "blkback"] {
            try FileManager.default.createSymbolicLink(atPath: bindir + "/" + s, withDestinationPath: build + "/" + s)
        }
        #expect(FileManager.default.createFile(atPath: bindir + "/netback", contents: Data("#!/bin/sh\nexit 1\n".utf8),
                                               attributes: [.posixPermissions: 0o755]))
        let env = ["XENHV_FIRST_DOMID": "\(Dom0Harness.distinctFirstDomID())"]
        let up = CommandResult.run(bindir + "/xenctl", ["up", "--timeout", "3", "--run-dir", run], environment: env, timeout: 120)
        #expect(up.status != 0 && up.out.isEmpty, "\(up)")
        #expect(up.err.hasPrefix("xenctl: dom0 services did not come up within 3 s (netback ") && up.err.contains("; stopped them again")
                && up.err.split(separator: "\n").count == 1, "\(up.err)")
        #expect(processes(mentioning: run).isEmpty, "a failed up left \(processes(mentioning: run))")
    }

    /// An `up` while a `down` is under way (its supervisor stopping the
    /// services, here held up by a stopped netback) waits for it to finish
    /// and starts the services again. Before, `up` read the stopping
    /// supervisor's last status ("running" four times), returned at once,
    /// and everything then stopped.
    @Test func anUpDuringADownStartsTheServicesAgain() throws {
        let run = NSTemporaryDirectory() + "xenctl-updown-\(UUID().uuidString.prefix(8))"
        defer { tearDown(run) }
        #expect(try xenctl("up", runDir: run).0 == 0)
        let first = try #require(Toolstack(runDir: run).supervisorPID())
        let netback = try #require(ServiceStatus.read(runDir: run)?.first { $0.name == "netback" }?.pid)
        #expect(kill(netback, SIGSTOP) == 0)  // the down waits for it (then kills it)
        let down = Process()
        down.executableURL = URL(fileURLWithPath: Self.bin)
        down.arguments = ["down", "--run-dir", run]
        down.standardOutput = FileHandle.nullDevice
        down.standardError = FileHandle.nullDevice
        try down.run()
        #expect(eventually { ServiceStatus.read(runDir: run)?.contains { $0.state == "stopping" } == true },
                "the supervisor never published that it is stopping")
        let (rc, _, err) = try xenctl("up", runDir: run)
        down.waitUntilExit()
        #expect(rc == 0, "\(err)")
        let now = ServiceStatus.read(runDir: run) ?? []
        #expect(now.count == 4 && now.allSatisfy { $0.state == "running" && kill($0.pid, 0) == 0 }, "\(now)")
        #expect(Toolstack(runDir: run).supervisorPID().map { $0 != first } == true, "the stopping supervisor was taken for running")
    }

    @Test func upRestartsCrashedServicesAndDownLeavesNothing() throws {
        let run = NSTemporaryDirectory() + "xenctl-test-\(UUID().uuidString.prefix(8))"
        defer { tearDown(run) }
        let (rc, out, err) = try xenctl("up", runDir: run)
        #expect(rc == 0, "\(err)")
        for name in ["xenhv", "xenstored", "blkback", "netback"] {
            #expect(out.contains(name), "\(out)")
        }
        #expect(out.components(separatedBy: "running").count == 5, "\(out)")
        // Idempotent.
        #expect(try xenctl("up", runDir: run).0 == 0)

        let (_, list, _) = try xenctl("list", runDir: run)
        #expect(list.contains("Domain-0"), "\(list)")
        #expect(try xenctl("destroy", "nosuch", runDir: run) .2 == "xenctl: no domain 'nosuch'\n")

        // Each service killed -9 comes back; a backend's crash leaves the other
        // backend alone; xenhv's dependents restart with it.
        let netbackBefore = ServiceStatus.read(runDir: run)!.first { $0.name == "netback" }!.pid
        for name in ["blkback", "netback", "xenstored", "xenhv"] {
            if name == "netback" {
                #expect(ServiceStatus.read(runDir: run)!.first { $0.name == "netback" }!.pid == netbackBefore)
            }
            let before = ServiceStatus.read(runDir: run)!
            let old = before.first { $0.name == name }!
            #expect(kill(old.pid, SIGKILL) == 0)
            let now = waitRestarted(name, from: old.pid, runDir: run)
            #expect(now != nil, "\(name) was not restarted")
            #expect((now?.restarts ?? 0) >= 1)
        }
        for name in ["xenstored", "blkback", "netback"] { #expect(waitRestarted(name, from: 0, runDir: run) != nil) }
        #expect(try xenctl("list", runDir: run).0 == 0)

        // A dependent slow to stop when its dependency restarts (here: netback
        // stopped, its SIGTERM pending) is waited for and started again once
        // it is gone, not passed over for good.
        let slow = ServiceStatus.read(runDir: run)!.first { $0.name == "netback" }!.pid
        #expect(kill(slow, SIGSTOP) == 0)
        let hvBefore = ServiceStatus.read(runDir: run)!.first { $0.name == "xenhv" }!.pid
        #expect(kill(hvBefore, SIGKILL) == 0)
        #expect(waitRestarted("xenhv", from: hvBefore, runDir: run) != nil)
        #expect(waitRestarted("blkback", from: 0, runDir: run) != nil)
        #expect(kill(slow, SIGCONT) == 0)
        #expect(waitRestarted("netback", from: slow, runDir: run) != nil, "netback was not started again")

        let (drc, _, derr) = try xenctl("down", runDir: run)
        #expect(drc == 0, "\(derr)")
        #expect(processes(mentioning: run).isEmpty)
        #expect(!FileManager.default.fileExists(atPath: run + "/xenhv.sock"))
        #expect(!FileManager.default.fileExists(atPath: run + "/xenstored/socket"))
        let (src, _, serr) = try xenctl("status", runDir: run)
        #expect(src != 0 && serr == "xenctl: dom0 services are not running (xenctl up starts them)\n")
        let (lrc, _, lerr) = try xenctl("list", runDir: run)
        #expect(lrc != 0 && lerr.hasPrefix("xenctl: xenhv is not running at") && lerr.split(separator: "\n").count == 1)
    }

    /// create/destroy/list/block-list/top/metrics with a real guest and real I/O,
    /// and every bad input: one line naming the file and line or the object, a
    /// non-zero exit, nothing half-created. Root: it makes a bridge and a tap.
    @Test func createServesADiskAndBadInputLeavesNothing() throws {
        let run = NSTemporaryDirectory() + "xenctl-create-\(UUID().uuidString.prefix(8))"
        let bridge = "xbt\(getpid() % 100000)"
        let netlink = URL(fileURLWithPath: Self.bin).deletingLastPathComponent().appendingPathComponent("xen-netlink").path
        func sh(_ exe: String, _ args: [String]) -> Int32 { CommandResult.run(exe, args).status }
        defer {
            _ = try? xenctl("down", runDir: run)
            for pid in processes(mentioning: run) { kill(pid, SIGKILL) }
            _ = sh(netlink, ["bridge-del", bridge])
            try? FileManager.default.removeItem(atPath: run)
        }
        try FileManager.default.createDirectory(atPath: run, withIntermediateDirectories: true)
        #expect(try xenctl("up", runDir: run).0 == 0)
        #expect(sh(netlink, ["bridge-add", bridge]) == 0)
        let img = run + "/disk.img"
        #expect(FileManager.default.createFile(atPath: img, contents: nil) && truncate(img, 64 << 20) == 0)
        func cfg(_ name: String, _ body: String) -> String {
            let p = run + "/\(name).cfg"
            #expect(FileManager.default.createFile(atPath: p, contents: Data(body.utf8)))
            return p
        }

        // Bad input: each one line naming file:line or the object, non-zero exit.
        let bad: [(String, String)] = [
            (cfg("syntax", "name = 'a'\nmemory = = 3\n"), "syntax.cfg:2: "),
            (cfg("missing", "name = 'b'\ndisk = [ 'vdev=xvda, target=\(run)/nope.img' ]\n"), "missing.cfg:2: disk xvda: target \(run)/nope.img does not exist"),
            (cfg("badbridge", "name = 'c'\nvif = [ 'bridge=bad/name' ]\n"), "badbridge.cfg:2: vif 'bridge=bad/name': 'bad/name' is not a valid bridge name"),
            (cfg("nobridge", "name = 'd'\n\nvif = [ 'bridge=nosuchbr0' ]\n"), "nobridge.cfg:3: bridge 'nosuchbr0' does not exist"),
            (cfg("dupvdev", "name = 'e'\ndisk = [ 'vdev=xvda, target=\(img)', 'vdev=xvda, target=\(img)' ]\n"), "dupvdev.cfg:2: duplicate vdev 'xvda'"),
            // Rate arithmetic that used to trap (a core dump, no error line).
            (cfg("rate", "name = 'f'\n\nvif = [ 'bridge=\(bridge), rate=400000GB/s' ]\n"), "rate.cfg:3: vif 'bridge=\(bridge), rate=400000GB/s': rate overflow"),
            (cfg("interval", "name = 'g'\nvif = [ 'bridge=\(bridge), rate=1Mb/s@20000000000000s' ]\n"), "interval.cfg:2: vif 'bridge=\(bridge), rate=1Mb/s@20000000000000s': replenishment interval overflow"),
        ]
        for (path, message) in bad {
            let (rc, out, err) = try xenctl("create", path, runDir: run)
            #expect(rc != 0 && out.isEmpty, "\(path)")
            #expect(err.hasPrefix("xenctl: " + run + "/") && err.contains(message) && err.split(separator: "\n").count == 1, "\(err)")
        }
        // A run directory closed to others: guests, unprivileged, could not serve their disks from it.
        #expect(chmod(run, 0o700) == 0)
        let (crc, cout, cerr) = try xenctl("create", cfg("closed", "name = 'h'\nmemory = 32\n"), runDir: run)
        #expect(crc != 0 && cout.isEmpty, "\(cout)")
        #expect(cerr == "xenctl: \(run) is mode 700: guests run unprivileged and serve their disks from \(run)/guests, so it must be searchable by others (chmod o+x \(run))\n", "\(cerr)")
        #expect(chmod(run, 0o755) == 0)
        #expect(try xenctl("destroy", "ghost", runDir: run).2 == "xenctl: no domain 'ghost'\n")
        #expect(try xenctl("block-list", "ghost", runDir: run).0 != 0)
        // Nothing half-made by the failures.
        #expect(try xenctl("list", runDir: run).1.split(separator: "\n").count == 2)

        // A good guest: disk and vif.
        let good = cfg("good", "name = 'good'\nmemory = 32\ndisk = [ 'format=raw, vdev=xvda, access=rw, target=\(img)' ]\nvif = [ 'mac=00:16:3e:00:00:42, bridge=\(bridge)' ]\n")
        let (rc, out, err) = try xenctl("create", good, runDir: run)
        #expect(rc == 0, "\(err)")
        guard let uri = out.split(separator: "\n").first(where: { $0.contains("disk xvda:") })?.split(separator: " ").last else {
            Issue.record("no disk line in \(out)")
            return
        }
        #expect(try xenctl("create", good, runDir: run).2 == "xenctl: domain 'good' already exists\n")
        let domid = out.split(separator: "(id ").last?.split(separator: ")").first.map(String.init) ?? "?"
        let tap = "vif\(domid).0"
        let q = CommandResult.run("/usr/bin/qemu-io", ["-f", "raw", String(uri), "-c", "write -P 0x42 0 65536", "-c", "read -P 0x42 0 65536"])
        #expect(q.ok, "\(q)")
        let (_, blocks, _) = try xenctl("block-list", "good", runDir: run)
        #expect(blocks.contains("51712") && blocks.contains("/local/domain/0/backend/vbd/"), "\(blocks)")
        #expect(FileManager.default.fileExists(atPath: "/sys/class/net/\(bridge)/brif/\(tap)"))

        // The backends publish counters each second; wait (bounded) for the I/O to show.
        var metrics = ""
        for _ in 0..<100 {
            metrics = try xenctl("metrics", runDir: run).1
            if metrics.contains("swiftxen_vbd_wr_sect_total{domain=\"good\",domid=\"\(domid)\",devid=\"51712\"} 128"),
               metrics.contains("swiftxen_vif_tx_packets_total{domain=\"good\"") { break }
            var p = pollfd(fd: -1, events: 0, revents: 0)
            _ = poll(&p, 0, 50)
        }
        #expect(metrics.contains("swiftxen_vbd_wr_sect_total{domain=\"good\",domid=\"\(domid)\",devid=\"51712\"} 128"), "\(metrics)")
        #expect(metrics.contains("swiftxen_vif_tx_packets_total{domain=\"good\""), "\(metrics)")
        #expect(metrics.components(separatedBy: "swiftxen_service_up{").count == 5)
        let top = try xenctl("top", "--once", runDir: run).1
        #expect(top.contains("good") && top.contains("vbd 51712") && top.contains("65536"), "\(top)")

        // network-list shows the vif; detaching it takes the tap away; the disk detaches too.
        let (_, nics, _) = try xenctl("network-list", "good", runDir: run)
        #expect(nics.contains("00:16:3e:00:00:42") && nics.contains("/local/domain/0/backend/vif/\(domid)/0"), "\(nics)")
        // The ports and ring refs of a two-queue netfront are under queue-0/: shown, not -1.
        #expect(!nics.contains(" -1"), "\(nics)")
        #expect(try xenctl("network-detach", "good", "0", runDir: run).0 == 0)
        // netback removes the tap once the toolstack removed the device (bounded wait).
        var tapGone = false
        for _ in 0..<200 where !tapGone {
            tapGone = !FileManager.default.fileExists(atPath: "/sys/class/net/\(tap)")
            if !tapGone { var p = pollfd(fd: -1, events: 0, revents: 0); _ = poll(&p, 0, 25) }
        }
        #expect(tapGone)
        #expect(try xenctl("network-list", "good", runDir: run).1.split(separator: "\n").count == 1)
        #expect(try xenctl("block-detach", "good", "xvda", runDir: run).0 == 0)
        #expect(try xenctl("block-list", "good", runDir: run).1.split(separator: "\n").count == 1)
        #expect(try xenctl("block-detach", "good", "xvdb", runDir: run).2 == "xenctl: domain 'good' has no vbd xvdb\n")

        // Shutdown: the guest powers off cleanly (its process exits), the domain goes.
        let guestPID = Int32(out.split(separator: "guest process ").last?.split(separator: "\n").first ?? "") ?? 0
        let (src, _, serr) = try xenctl("shutdown", "good", runDir: run)
        #expect(src == 0, "\(serr)")
        #expect(try xenctl("list", runDir: run).1.split(separator: "\n").count == 2)
        // Exited: gone, or a zombie until init reaps the orphan.
        let stat = (try? String(contentsOfFile: "/proc/\(guestPID)/stat", encoding: .utf8)) ?? ""
        #expect(guestPID > 0 && (stat.isEmpty || stat.split(separator: ")").last?.split(separator: " ").first == "Z"), "\(stat)")
        let guestLog = (try? String(contentsOfFile: run + "/logs/guest-good.log", encoding: .utf8)) ?? ""
        #expect(guestLog.contains("shut down at the toolstack's request"), "\(guestLog)")

        // Destroy takes a guest and its store entries away.
        let other = cfg("other", "name = 'other'\nmemory = 16\n")
        #expect(try xenctl("create", other, runDir: run).0 == 0)
        #expect(try xenctl("destroy", "other", runDir: run).0 == 0)
        #expect(try xenctl("list", runDir: run).1.split(separator: "\n").count == 2)

        // A relative target is the file in xenctl's current directory, not one
        // in blkback's: xenctl create runs in <run>/here, a decoy of the same
        // name waits where the daemons were started.
        let here = run + "/here"
        try FileManager.default.createDirectory(atPath: here, withIntermediateDirectories: true)
        #expect(FileManager.default.createFile(atPath: here + "/rel.img", contents: nil) && truncate(here + "/rel.img", 1 << 20) == 0)
        let blkback = ServiceStatus.read(runDir: run)?.first { $0.name == "blkback" }?.pid ?? 0
        let blkbackDir = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(blkback)/cwd")) ?? FileManager.default.currentDirectoryPath
        #expect(blkbackDir != here)
        let decoy = (blkbackDir == "/" ? "" : blkbackDir) + "/rel.img"
        let madeDecoy = !FileManager.default.fileExists(atPath: decoy)
            && FileManager.default.createFile(atPath: decoy, contents: Data(repeating: 0x55, count: 1 << 20))
        defer { if madeDecoy { try? FileManager.default.removeItem(atPath: decoy) } }
        let relCfg = cfg("rel", "name = 'rel'\nmemory = 16\ndisk = [ 'file:rel.img,xvda,w' ]\n")
        let env = "XENHV_FIRST_DOMID=\(Dom0Harness.distinctFirstDomID())"
        let rel = CommandResult.run("/bin/sh", ["-c", "cd '\(here)' && exec env \(env) '\(Self.bin)' create '\(relCfg)' --run-dir '\(run)'"], timeout: 120)
        #expect(rel.ok, "\(rel)")
        if rel.ok, let relURI = rel.out.split(separator: "\n").first(where: { $0.contains("disk xvda:") })?.split(separator: " ").last {
            let w = CommandResult.run("/usr/bin/qemu-io", ["-f", "raw", String(relURI), "-c", "write -P 0x37 0 4096"])
            #expect(w.ok, "\(w)")
            let written = FileManager.default.contents(atPath: here + "/rel.img")?.prefix(4096)
            #expect(written == Data(repeating: 0x37, count: 4096), "the guest's disk is not <run>/here/rel.img")
        }
        #expect(try xenctl("destroy", "rel", runDir: run).0 == 0)
        let (drc, _, _) = try xenctl("down", runDir: run)
        #expect(drc == 0)
        #expect(!FileManager.default.fileExists(atPath: "/sys/class/net/\(tap)"))
        #expect(processes(mentioning: run).isEmpty)
    }

    /// A supervisor that died without removing its pid file may have left its
    /// pid to another process: that one is not taken for it, nor signalled.
    @Test func aStalePidFileNamesNoSupervisor() throws {
        let run = NSTemporaryDirectory() + "xenctl-stale-\(getpid())"
        try FileManager.default.createDirectory(atPath: run, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: run) }
        let other = try ProcessLauncher.spawn("/bin/sleep", arguments: ["1000"], descriptors: [])
        defer { kill(other, SIGKILL); var st: Int32 = 0; waitpid(other, &st, 0) }
        #expect(FileManager.default.createFile(atPath: run + "/supervisor.pid", contents: Data("\(other)\n".utf8)))
        #expect(Toolstack(runDir: run).supervisorPID() == nil)
        let (rc, out, _) = try xenctl("down", runDir: run)
        #expect(rc == 0 && out == "xenctl: dom0 services are not running\n", "\(out)")
        #expect(kill(other, 0) == 0, "xenctl down signalled a process that is not its supervisor")
        var st: Int32 = 0
        #expect(waitpid(other, &st, WNOHANG) == 0)
    }

    /// Waits and intervals that are no number of seconds, and port 0: one
    /// line before anything is done (a NaN timeout used to trap after the
    /// device was in the store, a negative interval to block for ever).
    @Test func badSecondsAndPortsAreOneLine() throws {
        let run = NSTemporaryDirectory() + "xenctl-args-\(getpid())"
        let cases: [[String]] = [
            ["block-attach", "d", "vdev=xvdb, target=/nope.img", "--timeout", "nan"],
            ["network-attach", "d", "bridge=xenbr0", "--timeout=-1"],
            ["shutdown", "d", "--timeout=-inf"],
            ["reboot", "d", "--timeout", "1e30"],
            ["top", "--interval=-1"],
            ["top", "--interval", "1e-300"],
            ["metrics", "--listen", "0"],
        ]
        for args in cases {
            let r = CommandResult.run(Self.bin, args + ["--run-dir", run], timeout: 20)
            let option = args.last { $0.hasPrefix("--") }!.split(separator: "=")[0]
            #expect(r.status != 0 && r.out.isEmpty, "\(args)")
            #expect(r.err.hasPrefix("xenctl: \(option) ") && r.err.split(separator: "\n").count == 1, "\(args): \(r.err)")
        }
        #expect(!FileManager.default.fileExists(atPath: run), "nothing was made")
    }

    /// ArgumentParser's own refusals are one `xenctl:` line too (it prints
    /// an error, the usage and a hint on three), and an argument quoted in
    /// an error stays on its line; help is still the whole help.
    @Test func argumentErrorsAreOneLine() throws {
        let run = NSTemporaryDirectory() + "xenctl-argerr-\(getpid())"
        let cases: [([String], String)] = [
            (["destroy"], "xenctl: Missing expected argument '<domain>'\n"),
            (["list", "--timeout", "abc"], "xenctl: Unknown option '--timeout'\n"),
            (["block-attach", "d", "vdev=xvdb", "--timeout", "abc"], "xenctl: The value 'abc' is invalid for '--timeout <timeout>'\n"),
            (["nosuch"], "xenctl: Unknown option '--run-dir'\n"),  // the root has no such option
            (["destroy", "a\nb"], "xenctl: xenhv is not running at \(run)/xenhv.sock (xenctl up starts it)\n"),
        ]
        for (args, message) in cases {
            let r = CommandResult.run(Self.bin, args + ["--run-dir", run], timeout: 20)
            #expect(r.status == 1 && r.out.isEmpty && r.err == message, "\(args): \(r.err)")
        }
        let help = CommandResult.run(Self.bin, ["block-attach", "--help"], timeout: 20)
        #expect(help.status == 0 && help.out.contains("USAGE: xenctl block-attach"), "\(help.out)")
        #expect(!FileManager.default.fileExists(atPath: run), "nothing was made")
    }

    /// The units are Type=notify: a daemon sends systemd READY=1 (sd_notify)
    /// when it serves, so a dependent starts after its dependency is ready,
    /// as the supervisor starts it after the ready line.
    @Test func daemonsTellSystemdTheyAreReady() throws {
        var template = Array("/tmp/notify-XXXXXX".utf8CString)
        let dir = String(cString: mkdtemp(&template)!)
        let listener = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var pid: pid_t = -1
        defer {
            if pid > 0 { kill(pid, SIGKILL); var st: Int32 = 0; waitpid(pid, &st, 0) }
            close(listener)
            try? FileManager.default.removeItem(atPath: dir)
        }
        var addr = try UnixSocketAddress.make(dir + "/notify")
        let bound = UnixSocketAddress.with(&addr) { bind(listener, $0, $1) }
        try #require(bound == 0)
        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        defer { close(null) }
        pid = try ProcessLauncher.spawn(BuildProducts.path("xenhv"), arguments: ["--socket", dir + "/xenhv.sock", "--log-level", "error"],
                                        environment: ["NOTIFY_SOCKET": dir + "/notify"], descriptors: [(null, 0), (null, 1), (null, 2)])
        var p = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
        try #require(poll(&p, 1, 30_000) == 1, "xenhv sent nothing to NOTIFY_SOCKET")
        var buf = [UInt8](repeating: 0, count: 256)
        let n = recv(listener, &buf, buf.count, 0)
        #expect(n > 0 && String(decoding: buf[0..<max(0, n)], as: UTF8.self) == "READY=1")
        // By then it serves.
        #expect(access(dir + "/xenhv.sock", F_OK) == 0)
    }

    @Test func unitsCarryTheSupervisorsCommandLines() throws {
        let units = Toolstack.systemdUnits(bindir: "/usr/local/bin")
        let specs = Toolstack(runDir: "/run/swiftxen").services(bindir: "/usr/local/bin")
        #expect(units.count == specs.count)
        for (u, s) in zip(units, specs) {
            #expect(u.1.contains("ExecStart=\(s.commandLine)\n"))
            // The committed units are what `xenctl units` writes.
            let committed = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
                .deletingLastPathComponent().appendingPathComponent("backends/systemd/\(u.0)")
            #expect((try? String(contentsOf: committed, encoding: .utf8)) == u.1, "backends/systemd/\(u.0) is stale: run xenctl units")
        }
        // Each dependency upholds its dependents: its automatic restart does
        // not start what BindsTo= stopped (they were stopped, not failed).
        let text = Dictionary(uniqueKeysWithValues: units)
        #expect(text["swiftxen-xenhv.service"]?.contains("\nUpholds=swiftxen-xenstored.service swiftxen-blkback.service swiftxen-netback.service\n") == true)
        #expect(text["swiftxen-xenstored.service"]?.contains("\nUpholds=swiftxen-blkback.service swiftxen-netback.service\n") == true)
        #expect(text["swiftxen-blkback.service"]?.contains("Upholds=") == false)
    }

    /// Debian's systemd reads the units without a complaint: every key is
    /// one it knows, every dependency and executable is there
    /// (systemd-analyze verify, which needs no running systemd).
    @Test func systemdVerifiesTheUnits() throws {
        let dir = NSTemporaryDirectory() + "xenctl-units-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let build = URL(fileURLWithPath: Self.bin).deletingLastPathComponent().path
        var paths: [String] = []
        for (name, text) in Toolstack.systemdUnits(bindir: build) {
            #expect(FileManager.default.createFile(atPath: dir + "/" + name, contents: Data(text.utf8)))
            paths.append(dir + "/" + name)
        }
        let r = CommandResult.run("/usr/bin/systemd-analyze", ["verify", "--man=no"] + paths)
        #expect(r.status == 0 && r.out.isEmpty && r.err.isEmpty, "\(r)")
    }

    /// scripts/install puts the programs and vif-bridge in a bindir with
    /// units naming it, and the installed xenctl runs the services from
    /// there; a bad argument is one line and writes nothing.
    @Test func installedProgramsRunAsTheServices() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().path
        let build = URL(fileURLWithPath: Self.bin).deletingLastPathComponent().path
        let dir = NSTemporaryDirectory() + "xenctl-install-\(UUID().uuidString.prefix(8))"
        let bindir = dir + "/bin", unitdir = dir + "/units", run = dir + "/run"
        defer {
            _ = CommandResult.run(bindir + "/xenctl", ["down", "--run-dir", run])
            for pid in processes(mentioning: run) { kill(pid, SIGKILL) }
            try? FileManager.default.removeItem(atPath: dir)
        }
        let bad = CommandResult.run(root + "/scripts/install", ["--from", build, "--bindir", "relative/bin", "--unitdir", unitdir])
        #expect(bad.status == 1 && bad.err == "scripts/install: --bindir must be an absolute path (the units name it): 'relative/bin'\n", "\(bad.err)")
        #expect(!FileManager.default.fileExists(atPath: unitdir))
        let help = CommandResult.run(root + "/scripts/install", ["--help"])
        #expect(help.status == 0 && help.out.hasPrefix("Installs") && !help.out.contains("set -"), "\(help.out)")

        let r = CommandResult.run(root + "/scripts/install", ["--from", build, "--bindir", bindir, "--unitdir", unitdir])
        #expect(r.status == 0, "\(r.err)")
        for p in ["xenhv", "xenstored", "blkback", "netback", "xenctl", "pvguest", "xen-netlink", "vif-bridge"] {
            #expect(access(bindir + "/" + p, X_OK) == 0, "\(p) not installed")
        }
        let units = (try? FileManager.default.contentsOfDirectory(atPath: unitdir)) ?? []
        #expect(units.count == 4, "\(units)")
        for u in units {
            let text = (try? String(contentsOfFile: unitdir + "/" + u, encoding: .utf8)) ?? ""
            let exec = text.split(separator: "\n").first { $0.hasPrefix("ExecStart=") } ?? ""
            #expect(exec.hasPrefix("ExecStart=" + bindir + "/"), "\(u): \(exec)")
        }

        let env = ["XENHV_FIRST_DOMID": "\(Dom0Harness.distinctFirstDomID())"]
        let up = CommandResult.run(bindir + "/xenctl", ["up", "--run-dir", run], environment: env, timeout: 120)
        #expect(up.status == 0, "\(up.err)")
        let services = ServiceStatus.read(runDir: run) ?? []
        #expect(services.count == 4 && services.allSatisfy { $0.state == "running" }, "\(services)")
        for s in services {
            let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(s.pid)/exe")) ?? ""
            #expect(exe == bindir + "/" + s.name, "\(s.name) runs \(exe)")
        }
        #expect(CommandResult.run(bindir + "/xenctl", ["down", "--run-dir", run]).status == 0)
        #expect(processes(mentioning: run).isEmpty)
    }
}
