import Foundation
import Glibc
import Testing
import XenCtl

/// xenctl end to end against the real daemons (root: it starts xenhv and xenstored).
@Suite(.serialized) struct XenctlCLITests {
    static var bin: String {
        if let d = ProcessInfo.processInfo.environment["XEN_BUILD_DIR"] { return d + "/xenctl" }
        return URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent(".build/debug/xenctl").path
    }

    func xenctl(_ args: String..., runDir: String) throws -> (Int32, String, String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Self.bin)
        p.arguments = args + ["--run-dir", runDir]
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let o = out.fileHandleForReading.readDataToEndOfFile(), e = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self))
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

    @Test func upRestartsCrashedServicesAndDownLeavesNothing() throws {
        let run = NSTemporaryDirectory() + "xenctl-test-\(UUID().uuidString.prefix(8))"
        defer {
            _ = try? xenctl("down", runDir: run)
            for pid in processes(mentioning: run) { kill(pid, SIGKILL) }
            try? FileManager.default.removeItem(atPath: run)
        }
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
    }
}
