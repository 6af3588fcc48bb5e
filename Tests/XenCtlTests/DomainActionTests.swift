import Foundation
import Glibc
import Testing
import XenTestKit
import XenCtl
import XenHV

/// on_poweroff / on_reboot / on_crash end to end: real daemons, real guests
/// (pvguest) killed -9 or asked to power off or reboot, the domain's monitor
/// applying xl's actions. Root: it starts the dom0 services.
@Suite(.serialized) struct DomainActionTests {
    let cli = XenctlCLITests()

    struct Row: Equatable {
        let name: String
        let domid: Int
        let state: String
    }

    func list(_ run: String) throws -> [Row] {
        try cli.xenctl("list", runDir: run).1.split(separator: "\n").dropFirst().compactMap { line in
            let w = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard w.count >= 5, let id = Int(w[1]) else { return nil }
            return Row(name: String(w[0]), domid: id, state: String(w[4]))
        }
    }


    func run(_ exe: String, _ args: [String], env: [String: String] = [:]) -> (Int32, String) {
        let r = CommandResult.run(exe, args, environment: env)
        return (r.status, r.out)
    }

    func storeHas(_ run: String, _ path: String) -> Bool {
        self.run("/usr/bin/xenstore-exists", [path], env: ["XENSTORED_PATH": run + "/xenstored/socket"]).0 == 0
    }

    /// qemu-io on a domain's disk (NBD over the socket pvguest serves in guests/<domid>/).
    func qemuIO(_ run: String, domid: Int, disk: String = "xvda", _ commands: String...) -> Bool {
        let uri = "nbd+unix:///\(disk)?socket=\(run)/guests/\(domid)/\(disk).sock"
        return self.run("/usr/bin/qemu-io", ["-f", "raw", uri] + commands.flatMap { ["-c", $0] }).0 == 0
    }

    func created(_ out: String) -> (domid: Int, pid: Int32)? {
        guard let id = out.split(separator: "(id ").last?.split(separator: ")").first.flatMap({ Int($0) }),
              let pid = out.split(separator: "guest process ").last?.split(separator: "\n").first.flatMap({ Int32($0) })
        else { return nil }
        return (id, pid)
    }

    /// A termination signal reaches a monitor while it restarts a domain
    /// whose guest cannot come up (its disk's backend is stopped): the
    /// monitor undoes the new domain and exits at once, as an interrupted
    /// `xenctl create` does, not at the end of the guest's 120 s boot time,
    /// nor killed half-way by `xenctl down` after its 10 s.
    @Test func aMonitorStoppedDuringARestartUndoesItAndExits() throws {
        let run = NSTemporaryDirectory() + "xenctl-monint-\(UUID().uuidString.prefix(8))"
        var stopped: Int32 = 0
        defer {
            if stopped > 0 { kill(stopped, SIGCONT) }
            _ = try? cli.xenctl("down", runDir: run)
            for pid in cli.processes(mentioning: run) { kill(pid, SIGKILL) }
            try? FileManager.default.removeItem(atPath: run)
        }
        try FileManager.default.createDirectory(atPath: run, withIntermediateDirectories: true)
        #expect(try cli.xenctl("up", runDir: run).0 == 0)
        let img = run + "/r.img"
        #expect(FileManager.default.createFile(atPath: img, contents: nil) && truncate(img, 16 << 20) == 0)
        let cfg = run + "/r.cfg"
        #expect(FileManager.default.createFile(atPath: cfg, contents: Data(
            "name = 'r'\nmemory = 16\ndisk = [ 'vdev=xvda, target=\(img)' ]\non_crash = 'restart'\n".utf8)))
        let (rc, out, err) = try cli.xenctl("create", cfg, runDir: run)
        #expect(rc == 0, "\(err)")
        let first = try #require(created(out), "no domid in \(out)")
        let monitor = try #require(Toolstack(runDir: run).monitor(of: "r"))
        let blkback = try #require(ServiceStatus.read(runDir: run)?.first { $0.name == "blkback" }?.pid)
        #expect(kill(blkback, SIGSTOP) == 0)
        stopped = blkback
        #expect(kill(first.pid, SIGKILL) == 0)
        // The restart is under way once the new domain is listed: its guest waits for its disk.
        var second = 0
        #expect(try eventually(seconds: 30) {
            second = try list(run).first { $0.name == "r" && $0.domid != first.domid }?.domid ?? 0
            return second != 0
        })
        #expect(kill(monitor.pid, SIGTERM) == 0)
        // Gone, or a zombie not reaped yet (it was left behind by create, so init is its parent).
        func ended() -> Bool {
            guard let stat = try? String(contentsOfFile: "/proc/\(monitor.pid)/stat", encoding: .utf8) else { return true }
            return stat.split(separator: ")").last?.hasPrefix(" Z") == true
        }
        #expect(eventually(seconds: 8) { ended() }, "the monitor did not stop while the guest booted")
        #expect(try !list(run).contains { $0.domid == second }, "the domain the restart made was not undone")
        let log = (try? String(contentsOfFile: run + "/logs/monitor-r.log", encoding: .utf8)) ?? ""
        #expect(log.contains("interrupted; undone"), "\(log)")
    }

    @Test func actionsOnCrashPoweroffAndReboot() throws {
        let run = NSTemporaryDirectory() + "xenctl-actions-\(UUID().uuidString.prefix(8))"
        defer {
            _ = try? cli.xenctl("down", runDir: run)
            for pid in cli.processes(mentioning: run) { kill(pid, SIGKILL) }
            try? FileManager.default.removeItem(atPath: run)
        }
        try FileManager.default.createDirectory(atPath: run, withIntermediateDirectories: true)
        #expect(try cli.xenctl("up", runDir: run).0 == 0)
        let toolstack = Toolstack(runDir: run)
        func cfg(_ name: String, _ body: String) -> String {
            let p = run + "/\(name).cfg"
            #expect(FileManager.default.createFile(atPath: p, contents: Data(body.utf8)))
            return p
        }
        func image(_ name: String) -> String {
            let p = run + "/\(name).img"
            #expect(FileManager.default.createFile(atPath: p, contents: nil))
            _ = truncate(p, 16 << 20)
            return p
        }

        // A bad action: one line naming file:line, nothing created, no monitor.
        let bad = cfg("bad", "name = 'bad'\nmemory = 16\n\non_crash = 'explode'\n")
        let (brc, bout, berr) = try cli.xenctl("create", bad, runDir: run)
        #expect(brc != 0 && bout.isEmpty)
        #expect(berr == "xenctl: \(bad):4: on_crash = 'explode': must be one of destroy, restart, rename-restart, preserve, coredump-destroy, coredump-restart\n", "\(berr)")
        #expect(try list(run).count == 1)
        #expect(cli.processes(mentioning: "--name bad").isEmpty)

        // max_event_channels reaches xenhv (libxl's xc_domain_set_max_evtchn): the guest's ports stop there.
        let limited = cfg("limited", "name = 'limited'\nmemory = 16\nmax_event_channels = 12\n")
        let (lrc, lout, lerr) = try cli.xenctl("create", limited, runDir: run)
        #expect(lrc == 0, "\(lerr)")
        let l = try #require(created(lout), "no domid in \(lout)")
        let hv = try Hypervisor.connect(socketPath: run + "/xenhv.sock")
        var last: EventPort = 0
        var refused: Error?
        for _ in 0..<4096 {
            do { last = try hv.allocUnbound(in: DomID(l.domid), remote: 0) } catch { refused = error; break }
        }
        #expect(last == 12 && refused as? XenErrno == .ENOSPC, "last port \(last), then \(String(describing: refused))")
        withExtendedLifetime(hv) {}
        #expect(try cli.xenctl("destroy", "limited", runDir: run).0 == 0)

        // cpus (libxl's hard affinity, set before the guest runs): every thread
        // of the guest process, its netfront and blkfront ones included, may
        // run only there; the toolstack's own thread gets its affinity back.
        let online = try #require(DomainConfig.onlineCPUs())
        let lastCPU = try #require(online.cpus.last)
        let before = CPUSet.current()
        let pinned = cfg("pinned", "name = 'pinned'\nmemory = 16\ncpus = \"\(lastCPU)\"\ndisk = [ 'vdev=xvda, target=\(image("pinned"))' ]\n")
        let (prc, pout, perr) = try cli.xenctl("create", pinned, runDir: run)
        #expect(prc == 0, "\(perr)")
        let p = try #require(created(pout), "no domid in \(pout)")
        let tasks = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(p.pid)/task")
        #expect(tasks.count > 1, "the guest runs threads")
        for t in tasks {
            let status = try String(contentsOfFile: "/proc/\(p.pid)/task/\(t)/status", encoding: .utf8)
            let allowed = status.split(separator: "\n").first { $0.hasPrefix("Cpus_allowed_list:") }
            #expect(allowed?.split(separator: "\t").last.map(String.init) == "\(lastCPU)", "thread \(t): \(allowed ?? "?")")
        }
        #expect(CPUSet.current() == before)
        #expect(try cli.xenctl("destroy", "pinned", runDir: run).0 == 0)

        // on_crash=restart: kill -9 the guest; the domain comes back under its
        // name with a new domid, and its disk (same image) works through its new NBD URI.
        let crashy = cfg("crashy", "name = 'crashy'\nmemory = 16\ndisk = [ 'vdev=xvda, target=\(image("crashy"))' ]\non_crash = 'restart'\n")
        let (crc, cout, cerr) = try cli.xenctl("create", crashy, runDir: run)
        #expect(crc == 0, "\(cerr)")
        guard let first = created(cout) else {
            Issue.record("no domid in \(cout)")
            return
        }
        #expect(toolstack.monitor(of: "crashy")?.domid == UInt16(first.domid))
        #expect(qemuIO(run, domid: first.domid, "write -P 0x5a 0 65536"))
        #expect(kill(first.pid, SIGKILL) == 0)
        var second = 0
        let back = try eventually(seconds: 30) {
            second = try list(run).first { $0.name == "crashy" && $0.domid != first.domid && $0.state == "r-----" }?.domid ?? 0
            return second != 0
        }
        func logs(_ name: String) -> String {
            ["monitor", "guest"].map { (try? String(contentsOfFile: run + "/logs/\($0)-\(name).log", encoding: .utf8)) ?? "" }
                .joined(separator: "\n")
        }
        #expect(back, "\((try? list(run)) ?? []) \(logs("crashy"))")
        #expect(try !list(run).contains { $0.domid == first.domid })
        #expect(!storeHas(run, "/local/domain/\(first.domid)") && !storeHas(run, "/local/domain/0/backend/vbd/\(first.domid)"))
        #expect(storeHas(run, "/local/domain/0/backend/vbd/\(second)/51712"))
        // The monitor follows the new domain once its guest is up (create returned).
        #expect(eventually(seconds: 30) { toolstack.monitor(of: "crashy")?.domid == UInt16(second) }, "\(logs("crashy"))")
        #expect(qemuIO(run, domid: second, "read -P 0x5a 0 65536", "write -P 0xa5 65536 4096"))
        let monitorLog = (try? String(contentsOfFile: run + "/logs/monitor-crashy.log", encoding: .utf8)) ?? ""
        #expect(monitorLog.contains("domain \(first.domid) shut down, reason crash: action restart"), "\(monitorLog)")

        // A disk attached now stays across the reboot (libxl reloads the domain's
        // current devices, not its config file's).
        let extra = image("crashy-extra")
        #expect(try cli.xenctl("block-attach", "crashy", "vdev=xvdb, target=\(extra)", runDir: run).0 == 0)
        #expect(qemuIO(run, domid: second, disk: "xvdb", "write -P 0x3c 0 8192"))

        // xenctl reboot with on_reboot=restart (the default): back with a new domid, same name and disks.
        let (rrc, rout, rerr) = try cli.xenctl("reboot", "crashy", runDir: run)
        #expect(rrc == 0, "\(rerr) \(logs("crashy"))")
        let third = try list(run).first { $0.name == "crashy" }?.domid ?? 0
        #expect(third != second && third != 0 && rout == "Domain crashy restarted as domain \(third)\n", "\(rout)")
        #expect(try !list(run).contains { $0.domid == second })
        #expect(qemuIO(run, domid: third, "read -P 0x5a 0 65536", "read -P 0xa5 65536 4096"))
        #expect(storeHas(run, "/local/domain/0/backend/vbd/\(third)/51728"))
        #expect(qemuIO(run, domid: third, disk: "xvdb", "read -P 0x3c 0 8192"))
        let guestLog = (try? String(contentsOfFile: run + "/logs/guest-crashy.log", encoding: .utf8)) ?? ""
        #expect(guestLog.contains("reason=reboot"), "\(guestLog)")

        // on_crash=destroy (the default): gone with its store entries; its monitor exits.
        let gone = cfg("gone", "name = 'gone'\nmemory = 16\ndisk = [ 'vdev=xvda, target=\(image("gone"))' ]\n")
        let (grc, gout, _) = try cli.xenctl("create", gone, runDir: run)
        guard grc == 0, let g = created(gout) else {
            Issue.record("create gone: \(gout)")
            return
        }
        #expect(storeHas(run, "/local/domain/0/backend/vbd/\(g.domid)/51712"))
        #expect(kill(g.pid, SIGKILL) == 0)
        #expect(try eventually(seconds: 30) { try !list(run).contains { $0.name == "gone" } && toolstack.monitor(of: "gone") == nil })
        #expect(!storeHas(run, "/local/domain/\(g.domid)") && !storeHas(run, "/local/domain/0/backend/vbd/\(g.domid)"))
        // The monitor's files went with it (libxl removes a domain's userdata with it).
        let leftovers = ((try? FileManager.default.contentsOfDirectory(atPath: run + "/monitors")) ?? []).filter { $0.hasPrefix("gone.") }
        #expect(leftovers.isEmpty, "\(leftovers)")

        // on_crash=preserve: listed as crashed (xl's "---sc-") until destroyed; the monitor is done.
        let kept = cfg("kept", "name = 'kept'\nmemory = 16\non_crash = 'preserve'\n")
        let (krc, kout, _) = try cli.xenctl("create", kept, runDir: run)
        guard krc == 0, let k = created(kout) else {
            Issue.record("create kept: \(kout)")
            return
        }
        #expect(kill(k.pid, SIGKILL) == 0)
        #expect(try eventually(seconds: 30) { try list(run).contains(Row(name: "kept", domid: k.domid, state: "---sc-")) })
        #expect(eventually(seconds: 30) { toolstack.monitor(of: "kept") == nil })
        #expect(try list(run).contains(Row(name: "kept", domid: k.domid, state: "---sc-")))
        #expect(storeHas(run, "/local/domain/\(k.domid)"))
        #expect(try cli.xenctl("destroy", "kept", runDir: run).0 == 0)
        #expect(try !list(run).contains { $0.name == "kept" })
        #expect(!storeHas(run, "/local/domain/\(k.domid)"))

        // xenctl shutdown with on_poweroff=destroy (the default): gone when shutdown returns, monitor too.
        let off = cfg("off", "name = 'off'\nmemory = 16\n")
        let (orc, oout, _) = try cli.xenctl("create", off, runDir: run)
        guard orc == 0, let o = created(oout) else {
            Issue.record("create off: \(oout)")
            return
        }
        let (src, sout, serr) = try cli.xenctl("shutdown", "off", runDir: run)
        #expect(src == 0 && sout.isEmpty, "\(serr)")
        #expect(try !list(run).contains { $0.domid == o.domid })
        #expect(toolstack.monitor(of: "off") == nil)
        #expect(!storeHas(run, "/local/domain/\(o.domid)"))

        // on_poweroff=preserve: shutdown returns with the domain shut down ("---s--").
        let halted = cfg("halted", "name = 'halted'\nmemory = 16\non_poweroff = 'preserve'\n")
        let (hrc, hout, _) = try cli.xenctl("create", halted, runDir: run)
        guard hrc == 0, let h = created(hout) else {
            Issue.record("create halted: \(hout)")
            return
        }
        #expect(try cli.xenctl("shutdown", "halted", runDir: run).0 == 0)
        #expect(try list(run).contains(Row(name: "halted", domid: h.domid, state: "---s--")))
        #expect(try cli.xenctl("destroy", "halted", runDir: run).0 == 0)

        // coredump-destroy: a Xen dump-core file of the guest's memory, then gone.
        let dumped = cfg("dumped", "name = 'dumped'\nmemory = 16\non_crash = 'coredump-destroy'\n")
        let (drc, dout, _) = try cli.xenctl("create", dumped, runDir: run)
        guard drc == 0, let d = created(dout) else {
            Issue.record("create dumped: \(dout)")
            return
        }
        #expect(kill(d.pid, SIGKILL) == 0)
        #expect(try eventually(seconds: 30) { try !list(run).contains { $0.name == "dumped" } && toolstack.monitor(of: "dumped") == nil })
        let core = run + "/dump/dumped-\(d.domid).core"
        let (erc, sections) = self.run("/usr/bin/readelf", ["-h", "-S", "-W", core])
        #expect(erc == 0 && sections.contains("CORE (Core file)"), "\(sections)")
        for s in [".note.Xen", ".xen_prstatus", ".xen_p2m", ".xen_pages"] { #expect(sections.contains(s), "\(sections)") }
        // .xen_pages: offset and size columns; the last frame is start_info, whose magic the builder wrote.
        let pagesLine = sections.split(separator: "\n").first { $0.contains(".xen_pages") }?.split(separator: " ") ?? []
        if let i = pagesLine.firstIndex(of: "PROGBITS"), pagesLine.count > i + 3,
           let off = UInt64(pagesLine[i + 2], radix: 16), let size = UInt64(pagesLine[i + 3], radix: 16),
           let fh = FileHandle(forReadingAtPath: core) {
            #expect(size == 16 << 20)
            try fh.seek(toOffset: off + size - 4096)
            let magic = fh.readData(ofLength: 14)
            #expect(String(decoding: magic, as: UTF8.self) == "xen-3.0-x86_64")
            try fh.close()
        } else {
            Issue.record("no .xen_pages section: \(sections)")
        }

        // rename-restart: the crashed domain is kept as <name>-<time>, a new one takes the name.
        let renamed = cfg("renamed", "name = 'renamed'\nmemory = 16\non_crash = 'rename-restart'\n")
        let (nrc, nout, _) = try cli.xenctl("create", renamed, runDir: run)
        guard nrc == 0, let n = created(nout) else {
            Issue.record("create renamed: \(nout)")
            return
        }
        #expect(kill(n.pid, SIGKILL) == 0)
        #expect(try eventually(seconds: 30) { try list(run).contains { $0.name == "renamed" && $0.domid != n.domid && $0.state == "r-----" } })
        let old = try list(run).first { $0.domid == n.domid }
        #expect(old?.state == "---sc-" && old?.name.hasPrefix("renamed-") == true && old?.name.hasSuffix("Z") == true, "\(String(describing: old))")
        #expect(try cli.xenctl("destroy", "\(n.domid)", runDir: run).0 == 0)

        // down stops the monitors: no monitor (and no other process of this run) is left.
        #expect(!cli.processes(mentioning: "xenctl monitor --run-dir \(run)").isEmpty)
        #expect(try cli.xenctl("down", runDir: run).0 == 0)
        #expect(cli.processes(mentioning: run).isEmpty)
    }
}
