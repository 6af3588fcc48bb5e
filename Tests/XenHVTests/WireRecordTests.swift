import CXen
import Foundation
import Glibc
import Testing
@testable import XenHV

/// The xenhv protocol runs over SOCK_SEQPACKET, where recvmsg returns 0 both
/// for an empty record and at the end of the stream, and where an empty
/// record can carry descriptors (SCM_RIGHTS) that the kernel installs in the
/// receiver whatever the length.
@Suite struct WireRecordTests {
    /// A connected SOCK_SEQPACKET pair, both ends closed at deinit.
    final class Pair {
        var ends: [CInt] = [-1, -1]
        init() throws {
            guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &ends) == 0 else {
                throw HypervisorError.system(call: "socketpair", errno: errno)
            }
        }
        func closeEnd(_ i: Int) {
            if ends[i] >= 0 { close(ends[i]) }
            ends[i] = -1
        }
        deinit { closeEnd(0); closeEnd(1) }
    }

    /// A pipe, both ends closed at deinit unless closed before.
    final class Pipe {
        var ends: [CInt] = [-1, -1]
        init() throws {
            guard pipe(&ends) == 0 else { throw HypervisorError.system(call: "pipe", errno: errno) }
            for fd in ends { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        }
        func closeEnd(_ i: Int) {
            if ends[i] >= 0 { close(ends[i]) }
            ends[i] = -1
        }
        /// Whether the read end reports the end (every write end closed) within `ms`.
        func readEndHungUp(within ms: Int32) -> Bool {
            var p = pollfd(fd: ends[0], events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, ms) == 1 else { return false }
            var b: UInt8 = 0
            return read(ends[0], &b, 1) == 0
        }
        deinit { closeEnd(0); closeEnd(1) }
    }

    /// Sends a record of `bytes` carrying `fds`.
    static func sendRecord(_ sock: CInt, _ bytes: [UInt8], fds: [CInt]) -> Int {
        bytes.withUnsafeBytes { b in
            fds.withUnsafeBufferPointer { f in
                cxen_send_with_fds(sock, b.baseAddress, b.count, f.baseAddress, CInt(f.count))
            }
        }
    }

    @Test func anEmptyRecordIsAViolationAndTheStreamGoesOn() throws {
        let s = try Pair()
        var buf = [UInt8]()
        #expect(Self.sendRecord(s.ends[1], [], fds: []) == 0)
        #expect(throws: HypervisorError.self) { try WireMessage.receive(on: s.ends[0], buffer: &buf) }
        try WireMessage(code: 7, payload: [1, 2, 3]).send(on: s.ends[1])
        let m = try WireMessage.receive(on: s.ends[0], buffer: &buf)
        #expect(m?.code == 7 && m?.payload == [1, 2, 3])
        // The end is the end: after the peer's shutdown, and after its close.
        shutdown(s.ends[1], Int32(SHUT_WR))
        #expect(try WireMessage.receive(on: s.ends[0], buffer: &buf) == nil)
        s.closeEnd(1)
        #expect(try WireMessage.receive(on: s.ends[0], buffer: &buf) == nil)
    }

    @Test func theDescriptorsOfAnEmptyRecordAreClosed() throws {
        let s = try Pair()
        let p = try Pipe()
        var buf = [UInt8]()
        #expect(Self.sendRecord(s.ends[1], [], fds: [p.ends[1]]) == 0)
        p.closeEnd(1)
        #expect(throws: HypervisorError.self) { try WireMessage.receive(on: s.ends[0], buffer: &buf) }
        // Our receive closed the only other copy of the write end.
        #expect(p.readEndHungUp(within: 2_000))
        // A short record's descriptors too.
        let q = try Pipe()
        #expect(Self.sendRecord(s.ends[1], [1, 2, 3], fds: [q.ends[1]]) == 3)
        q.closeEnd(1)
        #expect(throws: HypervisorError.self) { try WireMessage.receive(on: s.ends[0], buffer: &buf) }
        #expect(q.readEndHungUp(within: 2_000))
    }

    /// Whether this kernel lets a socket refuse descriptors (SO_PASSRIGHTS,
    /// Linux 6.16), as xenhv makes guests' connections do.
    static var kernelRefusesDescriptors: Bool {
        var sv: [CInt] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &sv) == 0 else { return false }
        defer { sv.forEach { close($0) } }
        return cxen_refuse_descriptors(sv[0]) == 0
    }

    /// A guest that sends xenhv an empty record with a descriptor (its
    /// memory's memfd, say) leaves nothing in xenhv: the kernel refuses the
    /// descriptor, or xenhv closes it (off its own thread) and drops the guest.
    /// A domain whose connection the test holds, greeted as a guest would.
    static func greetedGuest(_ f: HypervisorFixture) throws -> Hypervisor.CreatedDomain {
        let d = try f.dom0.createDomain(pages: 16, name: "sender")
        try WireMessage(code: Int32(HVOp.hello.rawValue), payload: []).send(on: d.guestDescriptor)
        var buf = [UInt8]()
        let hello = try WireMessage.receive(on: d.guestDescriptor, buffer: &buf)
        #expect(hello?.code == 0)
        hello?.fds.forEach { close($0) }
        return d
    }

    @Test func xenhvKeepsNoDescriptorAGuestSentInAnEmptyRecord() throws {
        let f = try HypervisorFixture()
        let d = try Self.greetedGuest(f)
        defer { close(d.guestDescriptor) }
        let sock = d.guestDescriptor
        let p = try Pipe()
        let sent = Self.sendRecord(sock, [], fds: [p.ends[1]])
        if Self.kernelRefusesDescriptors {
            #expect(sent == -1 && errno == EPERM)
            p.closeEnd(1)
            #expect(p.readEndHungUp(within: 10_000))
            #expect(try f.dom0.listDomains().first { $0.domid == d.domid }?.stateLetters == "r-----")
        } else {
            #expect(sent == 0)
            p.closeEnd(1)
            #expect(p.readEndHungUp(within: 10_000), "xenhv still holds the descriptor")
            // A record shorter than the header drops the client, an empty one as
            // a 4-byte one: a protocol violation, and for a guest its domain's crash.
            #expect(try f.dom0.listDomains().first { $0.domid == d.domid }?.stateLetters == "---sc-")
        }
    }

    /// A descriptor with a request (it could be a file whose last close waits
    /// as long as the guest likes: a socket lingering on unsent data, a FUSE
    /// file; a pipe stands in for it): the kernel refuses it, or xenhv closes
    /// it off its own thread and drops the guest; xenhv answers others.
    @Test func aGuestCannotHandXenhvADescriptor() throws {
        let f = try HypervisorFixture()
        let d = try Self.greetedGuest(f)
        defer { close(d.guestDescriptor) }
        let sock = d.guestDescriptor
        var buf = [UInt8]()
        let p = try Pipe()
        let request = [UInt8](withUnsafeBytes(of: Int32(HVOp.querySize.rawValue).littleEndian) { Array($0) })
            + [UInt8](withUnsafeBytes(of: UInt32(2).littleEndian) { Array($0) }) + [0xF0, 0x7F]
        let sent = Self.sendRecord(sock, request, fds: [p.ends[1]])
        p.closeEnd(1)
        if Self.kernelRefusesDescriptors {
            #expect(sent == -1 && errno == EPERM)
            // The guest carries on: the same request without the descriptor is answered.
            #expect(Self.sendRecord(sock, request, fds: []) == request.count)
            #expect(try WireMessage.receive(on: sock, buffer: &buf)?.code == 0)
        } else {
            #expect(sent == request.count)
            #expect(p.readEndHungUp(within: 10_000), "xenhv still holds the descriptor")
            #expect(try f.dom0.listDomains().first { $0.domid == d.domid }?.stateLetters == "---sc-")
        }
        // xenhv serves everyone else.
        #expect(try f.dom0.listDomains().contains { $0.domid == 0 })
    }
}
