import CXen
import Foundation
import Glibc
import Testing
import XenHV
import XenTestKit

/// xenhv signals a guest's process (pause, unpause, destroy) only through a
/// pidfd taken when the toolstack attached it and kept until the domain is
/// destroyed: a pid that was freed and handed to another process is never
/// signalled, and a guest process that hung up its connection but lives on
/// is still killed by destroy.
@Suite(.serialized) struct GuestProcessTests {
    /// A `sleep` child of the test; killed and reaped at deinit.
    final class Bystander {
        let pid: pid_t
        private var reaped = false
        init() throws {
            pid = try ProcessLauncher.spawn("/bin/sleep", arguments: ["1000"])
        }
        deinit {
            kill(pid, SIGKILL)
            var st: Int32 = 0
            if !reaped { waitpid(pid, &st, 0) }
        }
    }

    /// Whether `pid` got SIGKILL or SIGSTOP: pending, stopped or dead. xenhv
    /// signals before it replies, so this is exact once the call returned.
    static func signalled(_ pid: pid_t) -> Bool {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return true }
        var pending: UInt64 = 0
        for line in status.split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) }
            guard parts.count == 2 else { continue }
            switch parts[0] {
            case "State": if let s = parts[1].first, "TtZX".contains(s) { return true }
            case "SigPnd", "ShdPnd": pending |= UInt64(parts[1], radix: 16) ?? 0
            default: break
            }
        }
        let fatal = UInt64(1) << (SIGKILL - 1) | UInt64(1) << (SIGSTOP - 1)
        return pending & fatal != 0
    }

    /// Each thread of `pid`: its name and state, and its kernel stack.
    static func threadStacks(_ pid: pid_t) -> String {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []).map { t in
            let stat = (try? String(contentsOfFile: "/proc/\(pid)/task/\(t)/stat", encoding: .utf8)) ?? ""
            let stack = (try? String(contentsOfFile: "/proc/\(pid)/task/\(t)/stack", encoding: .utf8)) ?? ""
            return "\(stat.prefix(40)) \(stack.split(separator: "\n").prefix(4).joined(separator: " < "))"
        }.joined(separator: "\n")
    }

    /// A guest lives no longer than its hypervisor: pvguest ends as soon as
    /// xenhv goes away (here while it waits for xenstore, which never comes),
    /// so no guest of a crashed xenhv runs on under a uid the next domain
    /// with its domid is given.
    @Test func aGuestEndsWithItsHypervisor() throws {
        let f = try HypervisorFixture()
        let d = try f.dom0.createDomain(pages: 64, name: "orphan")
        let dir = f.dir + "/guest"
        let guest = try Child("pvguest", ["--nbd-dir", dir], environment: ["XENHV_GUEST_FD": "3"],
                              extra: [(d.guestDescriptor, 3)])
        close(d.guestDescriptor)
        // pvguest has greeted xenhv once it runs the thread that watches
        // its connection (HypervisorWatch, started right after the hello).
        func threads() -> [String] {
            ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(guest.pid)/task")) ?? []).map {
                ((try? String(contentsOfFile: "/proc/\(guest.pid)/task/\($0)/comm", encoding: .utf8)) ?? "")
                    .trimmingCharacters(in: .whitespacesAndNewlines)
            }
        }
        // If not: where each of its threads waits.
        #expect(eventually(seconds: 30) { threads().contains("xenhv-watch") }, "\(Self.threadStacks(guest.pid))")
        f.daemon.kill9()
        // Exited: a zombie until reaped (the last field of a zombie's stat is its exit code).
        func stat() -> [Substring] {
            ((try? String(contentsOfFile: "/proc/\(guest.pid)/stat", encoding: .utf8)) ?? "").split(separator: ")").last?
                .split(separator: " ") ?? []
        }
        #expect(eventually(seconds: 30) { stat().first == "Z" }, "the guest outlived xenhv")
        #expect(stat().last.flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }.map { ($0 >> 8) & 0xFF } == 3)
        guest.reap()
    }

    /// The guest's connection hung up (the domain crashed) while its process
    /// lives on: destroy kills it, as Xen's destroy ends a domain whatever it
    /// is doing; the pidfd makes sure it is that process.
    @Test func aGuestThatHungUpButLivesOnIsKilledByDestroy() throws {
        let f = try HypervisorFixture()
        let d = try f.dom0.createDomain(pages: 16, name: "gone")
        let lingerer = try Bystander()
        try f.dom0.attachProcess(lingerer.pid, to: d.domid)
        close(d.guestDescriptor)
        // Hang-ups are served before requests of the same round, and the close is done.
        #expect(try f.dom0.listDomains().first { $0.domid == d.domid }?.stateLetters == "---sc-")
        #expect(!Self.signalled(lingerer.pid))
        try f.dom0.destroyDomain(d.domid)
        #expect(Self.signalled(lingerer.pid), "destroy left the domain's process running")
    }

    /// The audit's case: the guest process exits and is reaped while its
    /// connection lives on (another holder), and its pid goes to a new
    /// process; destroy must not kill that one. Forcing the reuse needs
    /// /proc/sys/kernel/ns_last_pid (root) and no other process taking the
    /// pid first; when neither can be had after some tries the test checks
    /// what it can (destroy of an exited guest signals nothing).
    @Test func destroyNeverKillsAProcessThatReusedTheGuestsPid() throws {
        let f = try HypervisorFixture()
        let d = try f.dom0.createDomain(pages: 16, name: "reaped")
        defer { close(d.guestDescriptor) }  // the connection outlives the process
        let guest = try ProcessLauncher.spawn("/bin/true", arguments: [])
        try f.dom0.attachProcess(guest, to: d.domid)
        var st: Int32 = 0
        waitpid(guest, &st, 0)
        var reused: Bystander?
        for _ in 0..<20 where reused == nil {
            let fd = open("/proc/sys/kernel/ns_last_pid", O_WRONLY | O_CLOEXEC)
            guard fd >= 0 else { break }
            let wrote = "\(guest - 1)".withCString { write(fd, $0, strlen($0)) } > 0
            close(fd)
            guard wrote else { break }
            let b = try Bystander()
            if b.pid == guest { reused = b }
        }
        try f.dom0.destroyDomain(d.domid)
        if let b = reused {
            #expect(!Self.signalled(b.pid), "destroy killed the process that reused the guest's pid")
        }
    }
}
