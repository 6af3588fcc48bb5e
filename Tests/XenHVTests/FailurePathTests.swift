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

    /// utime + stime of `pid`, in clock ticks (/proc/PID/stat fields 14, 15).
    static func cpuTicks(_ pid: pid_t) -> Int {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return 0 }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        // After the ")": state is field 3, so utime (14) and stime (15) are at 11 and 12.
        return fields.count > 12 ? (Int(fields[11]) ?? 0) + (Int(fields[12]) ?? 0) : 0
    }

    /// With no descriptor left, accept(2) fails and the connection stays
    /// queued, the listening socket readable: xenhv leaves it out of its poll
    /// for a moment instead of spinning on it, and takes the connection once
    /// descriptors are back.
    @Test func noDescriptorForAConnectionIsNoSpin() throws {
        let f = try HypervisorFixture()
        let xenhv = f.daemon.pid
        _ = try f.dom0.listDomains()
        let original = Self.limit(xenhv)
        let open = Self.descriptors(xenhv)
        let lowestFree = (0...).first { !open.contains($0) }!
        #expect(CommandResult.run("prlimit", ["--pid", "\(xenhv)", "--nofile=\(lowestFree):"]).ok)
        defer { Self.restore(xenhv, to: original) }
        let s = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        #expect(s >= 0)
        defer { close(s) }
        var addr = try UnixSocketAddress.make(f.socket)
        #expect(UnixSocketAddress.with(&addr) { connect(s, $0, $1) } == 0)  // queued in the backlog
        // A measuring window, not synchronisation: xenhv's CPU over one second.
        let before = Self.cpuTicks(xenhv)
        var none = pollfd(fd: -1, events: 0, revents: 0)
        _ = poll(&none, 0, 1000)
        let used = Double(Self.cpuTicks(xenhv) - before) / clockTicksPerSecond
        #expect(used < 0.2, "xenhv used \(used) s of CPU in 1 s on a connection it could not accept")
        Self.restore(xenhv, to: original)
        // The queued connection is taken and served now.
        try WireMessage(code: Int32(HVOp.hello.rawValue), payload: []).send(on: s)
        var buf = [UInt8]()
        let reply = try WireMessage.receive(on: s, buffer: &buf)
        #expect(reply != nil && reply!.code >= 0, "the waiting connection was not served")
        reply?.fds.forEach { Glibc.close($0) }
    }
}
