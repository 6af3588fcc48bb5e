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
    /// Audit finding 14: a hello that fails after xenhv opened the read-only
    /// port-generations descriptor for its reply closes it again.
    @Test func aFailedHelloLeavesNoDescriptor() throws {
        let f = try HypervisorFixture()
        let xenhv = f.daemon.pid
        _ = try f.dom0.listDomains()  // xenhv is idle between requests
        let before = OtherProcess.descriptors(xenhv)
        let original = OtherProcess.openFileLimit(xenhv)
        // The accepted connection and the read-only descriptor; not the maptrack.
        #expect(OtherProcess.allowDescriptors(2, in: xenhv))
        defer { OtherProcess.setOpenFileLimit(xenhv, to: original) }
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
        OtherProcess.setOpenFileLimit(xenhv, to: original)
        _ = try f.dom0.listDomains()  // after the hang-up, served first in its round
        #expect(OtherProcess.descriptors(xenhv) == before)
    }

    /// Audit finding 14: a createDomain that fails after the builder made
    /// the domain's ports (here: no descriptors left for the guest's
    /// socketpair) closes their wake-up sets with the rest of the domain.
    @Test func aFailedCreateLeavesNoDescriptor() throws {
        let f = try HypervisorFixture()
        let xenhv = f.daemon.pid
        _ = try f.dom0.listDomains()
        let before = OtherProcess.descriptors(xenhv)
        let original = OtherProcess.openFileLimit(xenhv)
        // Five memfds and the two ports' wake-up sets; not the socketpair.
        #expect(OtherProcess.allowDescriptors(7, in: xenhv))
        defer { OtherProcess.setOpenFileLimit(xenhv, to: original) }
        #expect(throws: (any Error).self) { try f.dom0.createDomain(pages: 16, name: "short") }
        OtherProcess.setOpenFileLimit(xenhv, to: original)
        #expect(OtherProcess.descriptors(xenhv) == before)
        // And xenhv goes on: the same create works with descriptors to spare.
        let d = try f.dom0.createDomain(pages: 16, name: "short")
        close(d.guestDescriptor)
        try f.dom0.destroyDomain(d.domid)
    }

    /// With no descriptor left, accept(2) fails and the connection stays
    /// queued, the listening socket readable: xenhv leaves it out of its poll
    /// for a moment instead of spinning on it, and takes the connection once
    /// descriptors are back.
    @Test func noDescriptorForAConnectionIsNoSpin() throws {
        let f = try HypervisorFixture()
        let xenhv = f.daemon.pid
        _ = try f.dom0.listDomains()
        let original = OtherProcess.openFileLimit(xenhv)
        #expect(OtherProcess.allowDescriptors(0, in: xenhv))
        defer { OtherProcess.setOpenFileLimit(xenhv, to: original) }
        let s = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        #expect(s >= 0)
        defer { close(s) }
        var addr = try UnixSocketAddress.make(f.socket)
        #expect(UnixSocketAddress.with(&addr) { connect(s, $0, $1) } == 0)  // queued in the backlog
        // A measuring window, not synchronisation: xenhv's CPU over one second.
        let before = OtherProcess.cpuSeconds(xenhv)
        var none = pollfd(fd: -1, events: 0, revents: 0)
        _ = poll(&none, 0, 1000)
        let used = OtherProcess.cpuSeconds(xenhv) - before
        #expect(used < 0.2, "xenhv used \(used) s of CPU in 1 s on a connection it could not accept")
        OtherProcess.setOpenFileLimit(xenhv, to: original)
        // The queued connection is taken and served now.
        try WireMessage(code: Int32(HVOp.hello.rawValue), payload: []).send(on: s)
        var buf = [UInt8]()
        let reply = try WireMessage.receive(on: s, buffer: &buf)
        #expect(reply != nil && reply!.code >= 0, "the waiting connection was not served")
        reply?.fds.forEach { Glibc.close($0) }
    }

    /// A client repeating a request that does not parse gets EINVAL each
    /// time, and xenhv logs it a line a second at most (with the count left
    /// out), as Xen rate-limits guest-caused messages: a guest cannot fill
    /// dom0's log directory.
    @Test func aRepeatedMalformedRequestIsLoggedALineASecond() throws {
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("xenhv-log-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        let logFD = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        #expect(logFD >= 0)
        defer { unlink(log) }
        let f = try HypervisorFixture(xenhvArguments: ["--log-level", "warning"], stderr: logFD)
        close(logFD)
        let s = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        #expect(s >= 0)
        defer { close(s) }
        var addr = try UnixSocketAddress.make(f.socket)
        #expect(UnixSocketAddress.with(&addr) { connect(s, $0, $1) } == 0)
        var buf = [UInt8]()
        try WireMessage(code: Int32(HVOp.hello.rawValue), payload: []).send(on: s)
        let hello = try WireMessage.receive(on: s, buffer: &buf)
        #expect(hello != nil && hello!.code >= 0)
        hello?.fds.forEach { Glibc.close($0) }
        let sent = 500
        for _ in 0..<sent {
            // EVTCHNOP_alloc_unbound without its remote domid.
            try WireMessage(code: Int32(HVOp.allocUnbound.rawValue), payload: []).send(on: s)
            let reply = try WireMessage.receive(on: s, buffer: &buf)
            #expect(reply?.code == -XenErrno.EINVAL.rawValue)
        }
        _ = try f.dom0.listDomains()  // xenhv has logged everything before this answer
        let lines = ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")
            .split(separator: "\n").filter { $0.contains("malformed request") }
        #expect(lines.count >= 1 && lines.count <= 3, "\(lines.count) log lines for \(sent) malformed requests")
    }
}
