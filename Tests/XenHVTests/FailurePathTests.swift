import CXen
import Foundation
import Glibc
import Testing
@testable import XenHV
import XenTestKit

/// Requests that fail half-way leave no descriptor behind in xenhv. The
/// failures are made real by lowering xenhv's RLIMIT_NOFILE so that exactly
/// the first few descriptors a request makes can be had.
@Suite struct FailurePathTests {
    /// xenhv's open descriptor numbers.
    static func descriptors(_ pid: pid_t) -> Set<Int> {
        Set(((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []).compactMap { Int($0) })
    }

    /// xenhv's soft RLIMIT_NOFILE, as prlimit takes it ("soft:"). Only the
    /// soft limit moves: raising a hard one back needs CAP_SYS_RESOURCE.
    static func limit(_ pid: pid_t) -> String {
        let limits = (try? String(contentsOfFile: "/proc/\(pid)/limits", encoding: .utf8)) ?? ""
        guard let line = limits.split(separator: "\n").first(where: { $0.hasPrefix("Max open files") }) else { return "1024:" }
        return "\(line.split(separator: " ")[3]):"
    }

    /// Lets xenhv open exactly `count` more descriptors (the lowest free
    /// numbers are handed out first), until `restore`.
    static func allow(_ count: Int, in pid: pid_t) -> Bool {
        let open = descriptors(pid)
        var free: [Int] = []
        var n = 0
        while free.count < count {
            if !open.contains(n) { free.append(n) }
            n += 1
        }
        let limit = free.last! + 1
        return CommandResult.run("prlimit", ["--pid", "\(pid)", "--nofile=\(limit):"]).ok
    }

    static func restore(_ pid: pid_t, to limit: String) {
        _ = CommandResult.run("prlimit", ["--pid", "\(pid)", "--nofile=\(limit)"])
    }

    /// Audit finding 14: a hello that fails after xenhv opened the read-only
    /// port-generations descriptor for its reply closes it again.
    @Test func aFailedHelloLeavesNoDescriptor() throws {
        let f = try HypervisorFixture()
        let xenhv = f.daemon.pid
        _ = try f.dom0.listDomains()  // xenhv is idle between requests
        let before = Self.descriptors(xenhv)
        let original = Self.limit(xenhv)
        // The accepted connection and the read-only descriptor; not the maptrack.
        #expect(Self.allow(2, in: xenhv))
        defer { Self.restore(xenhv, to: original) }
        var s = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        #expect(s >= 0)
        defer { if s >= 0 { close(s) } }
        var addr = try UnixSocketAddress.make(f.socket)
        #expect(UnixSocketAddress.with(&addr) { connect(s, $0, $1) } == 0)
        try WireMessage(code: Int32(HVOp.hello.rawValue), payload: []).send(on: s)
        var buf = [UInt8]()
        let reply = try WireMessage.receive(on: s, buffer: &buf)
        #expect(reply != nil && reply!.code < 0, "the hello was meant to fail")
        reply?.fds.forEach { close($0) }
        close(s)
        s = -1
        Self.restore(xenhv, to: original)
        _ = try f.dom0.listDomains()  // after the hang-up, served first in its round
        #expect(Self.descriptors(xenhv) == before)
    }

    /// Audit finding 14: a createDomain that fails after the builder made
    /// the domain's ports (here: no descriptors left for the guest's
    /// socketpair) closes their wake-up sets with the rest of the domain.
    @Test func aFailedCreateLeavesNoDescriptor() throws {
        let f = try HypervisorFixture()
        let xenhv = f.daemon.pid
        _ = try f.dom0.listDomains()
        let before = Self.descriptors(xenhv)
        let original = Self.limit(xenhv)
        // Five memfds and the two ports' wake-up sets; not the socketpair.
        #expect(Self.allow(7, in: xenhv))
        defer { Self.restore(xenhv, to: original) }
        #expect(throws: (any Error).self) { try f.dom0.createDomain(pages: 16, name: "short") }
        Self.restore(xenhv, to: original)
        #expect(Self.descriptors(xenhv) == before)
        // And xenhv goes on: the same create works with descriptors to spare.
        let d = try f.dom0.createDomain(pages: 16, name: "short")
        close(d.guestDescriptor)
        try f.dom0.destroyDomain(d.domid)
    }
}
