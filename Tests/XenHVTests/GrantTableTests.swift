import CXen
import Foundation
import Glibc
import Testing
import XenHV

/// Grant tables v1 between two real processes: a guest peer that grants, and
/// this test process (or a dom0 peer) that maps and copies.
@Suite struct GrantTableTests {
    @Test func writableMapSharesBytesBothWays() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        #expect(g.send("grant 5 0 10 rw") == "ok")
        let m = try f.dom0.mapGrant(domid: d.domid, ref: 5, writable: true).get()
        try m.region.store(UInt64(0x1122_3344_5566_7788), at: 128)
        #expect(g.send("read 10 128 8") == "8877665544332211")
        #expect(g.send("write 10 0 cafe") == "ok")
        #expect(try m.region.load(UInt16.self, at: 0) == 0xFECA)
        #expect(g.send("flags 5") == "\(GTF_permit_access | GTF_reading | GTF_writing)")
        #expect(f.dom0.unmapGrant(m) == .okay)
        #expect(g.send("flags 5") == "\(GTF_permit_access)")
    }

    @Test func readOnlyGrantRefusesWritableMap() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        #expect(g.send("write 9 0 abcd") == "ok")
        #expect(g.send("grant 3 0 9 ro") == "ok")
        #expect(throws: GrantStatus.generalError) { try f.dom0.mapGrant(domid: d.domid, ref: 3, writable: true).get() }
        // Nothing was pinned by the refused map.
        #expect(g.send("flags 3") == "\(GTF_permit_access | GTF_readonly)")
        let m = try f.dom0.mapGrant(domid: d.domid, ref: 3, writable: false).get()
        #expect(try m.region.load(UInt16.self, at: 0) == 0xCDAB)
        #expect(throws: GuestRegion.OutOfBounds.self) { try m.region.store(UInt8(1), at: 0) }
        #expect(g.send("flags 3") == "\(GTF_permit_access | GTF_readonly | GTF_reading)")
        #expect(f.dom0.unmapGrant(m) == .okay)
    }

    @Test func revokingAnEntryInUseFailsUntilUnmapped() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        #expect(g.send("grant 8 0 20 rw") == "ok")
        let a = try f.dom0.mapGrant(domid: d.domid, ref: 8, writable: true).get()
        let b = try f.dom0.mapGrant(domid: d.domid, ref: 8, writable: false).get()
        #expect(g.send("end 8") == "busy")
        #expect(f.dom0.unmapGrant(a) == .okay)
        // Still read-pinned by the second mapping: writing cleared, reading kept.
        #expect(g.send("flags 8") == "\(GTF_permit_access | GTF_reading)")
        #expect(g.send("end 8") == "busy")
        #expect(f.dom0.unmapGrant(b) == .okay)
        #expect(g.send("end 8") == "ok")
        #expect(g.send("flags 8") == "0")
        // A revoked entry can no longer be mapped, and a stale handle is refused.
        #expect(throws: GrantStatus.generalError) { try f.dom0.mapGrant(domid: d.domid, ref: 8, writable: false).get() }
        #expect(f.dom0.unmapGrant(a) == .badHandle)
    }

    @Test func badMapsGetXensStatusCodes() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        // Granted to another domain.
        #expect(g.send("grant 6 7 10 rw") == "ok")
        #expect(throws: GrantStatus.generalError) { try f.dom0.mapGrant(domid: d.domid, ref: 6, writable: false).get() }
        // Beyond the table (4 initial frames of 512 entries).
        #expect(throws: GrantStatus.badGntref) { try f.dom0.mapGrant(domid: d.domid, ref: 2048, writable: false).get() }
        #expect(throws: GrantStatus.badGntref) { try f.dom0.mapGrant(domid: d.domid, ref: .max, writable: false).get() }
        // Never granted (invalid entry).
        #expect(throws: GrantStatus.generalError) { try f.dom0.mapGrant(domid: d.domid, ref: 11, writable: false).get() }
        // A frame outside the guest's memory.
        #expect(g.send("grant 12 0 100000 rw") == "ok")
        #expect(throws: GrantStatus.generalError) { try f.dom0.mapGrant(domid: d.domid, ref: 12, writable: true).get() }
        #expect(g.send("flags 12") == "\(GTF_permit_access)")
        // Sub-page grants cannot be mapped.
        #expect(g.send("raw 13 \(GTF_permit_access | GTF_sub_page) 0 10") == "ok")
        #expect(throws: GrantStatus.generalError) { try f.dom0.mapGrant(domid: d.domid, ref: 13, writable: false).get() }
        // A domain that does not exist.
        #expect(throws: GrantStatus.badDomain) { try f.dom0.mapGrant(domid: 999, ref: 1, writable: false).get() }
        #expect(f.dom0.unmap(handle: 12345) == .badHandle)
        // Growing the table makes a higher ref valid; past the maximum is refused.
        #expect(g.send("setup 8") == "ok")
        #expect(try f.dom0.queryGrantTableSize(of: d.domid) == (8, 64))
        #expect(g.send("grant 2048 0 10 rw") == "ok")
        let m = try f.dom0.mapGrant(domid: d.domid, ref: 2048, writable: true).get()
        #expect(f.dom0.unmapGrant(m) == .okay)
        #expect(g.send("setup 65").hasPrefix("error"))
    }

    @Test func grantCopyChecksOffsetsAndPermissions() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        #expect(g.send("grant 3 0 11 rw") == "ok")
        #expect(g.send("grant 4 0 12 ro") == "ok")
        #expect(g.send("write 12 4090 0102030405060708") == "ok")
        let buf = UnsafeMutableRawPointer.allocate(byteCount: 8192, alignment: 4096)
        defer { buf.deallocate() }
        for i in 0..<64 { buf.storeBytes(of: UInt8(i), toByteOffset: i, as: UInt8.self) }
        var ops = [
            GrantCopy(source: .local(buf), dest: .grant(domid: d.domid, ref: 3, offset: 100), length: 64),
            GrantCopy(source: .grant(domid: d.domid, ref: 4, offset: 4090), dest: .local(buf + 4096), length: 6),
            // Crossing the end of the page, on either end.
            GrantCopy(source: .local(buf), dest: .grant(domid: d.domid, ref: 3, offset: 4000), length: 200),
            GrantCopy(source: .grant(domid: d.domid, ref: 4, offset: 4095), dest: .local(buf), length: 2),
            // Writing into a read-only grant.
            GrantCopy(source: .local(buf), dest: .grant(domid: d.domid, ref: 4, offset: 0), length: 8),
            GrantCopy(source: .local(buf), dest: .grant(domid: d.domid, ref: 9999, offset: 0), length: 8),
            GrantCopy(source: .local(buf), dest: .grant(domid: 777, ref: 3, offset: 0), length: 8),
            // Grant to grant within the same domain.
            GrantCopy(source: .grant(domid: d.domid, ref: 4, offset: 4090), dest: .grant(domid: d.domid, ref: 3, offset: 0), length: 6),
        ]
        f.dom0.copyGrants(&ops)
        #expect(ops.map(\.status) == [.okay, .okay, .badCopyArg, .badCopyArg, .generalError, .badGntref, .badDomain, .okay])
        #expect(g.send("read 11 100 64") == hex((0..<64).map { UInt8($0) }))
        #expect([UInt8](UnsafeRawBufferPointer(start: buf + 4096, count: 6)) == [1, 2, 3, 4, 5, 6])
        #expect(g.send("read 11 0 6") == "010203040506")
        // Copies leave no busy bits behind: both entries can be revoked.
        #expect(g.send("end 3") == "ok")
        #expect(g.send("end 4") == "ok")
    }

    /// Grants read in place for one call: the body sees the granted bytes,
    /// the granter cannot revoke them meanwhile (GTF_reading, as during a
    /// copy), and afterwards nothing stays pinned. A refused span refuses the
    /// whole set before the body runs, with the status a copy would get.
    @Test func grantsReadInPlaceArePinnedOnlyForTheCall() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        #expect(g.send("grant 3 0 11 ro") == "ok")
        #expect(g.send("grant 4 0 12 rw") == "ok")
        #expect(g.send("write 11 10 a1a2a3a4") == "ok")
        #expect(g.send("write 12 4000 b1b2b3") == "ok")
        // Out of ref order, and ref 3 twice: each grant pinned once, each span its own bytes.
        let spans = [GrantSpan(ref: 4, offset: 4000, length: 3), GrantSpan(ref: 3, offset: 10, length: 4),
                     GrantSpan(ref: 3, offset: 12, length: 2)]
        let iov = UnsafeMutablePointer<iovec>.allocate(capacity: spans.count)
        defer { iov.deallocate() }
        var seen: [[UInt8]] = [], flagsInside: [String] = [], revokeInside = ""
        let r = spans.withUnsafeBufferPointer { sp in
            f.dom0.withGrantsInPlace(domid: d.domid, sp, iov: iov) {
                seen = (0..<sp.count).map { [UInt8](UnsafeRawBufferPointer(start: iov[$0].iov_base, count: iov[$0].iov_len)) }
                flagsInside = [g.send("flags 3"), g.send("flags 4")]
                revokeInside = g.send("end 4")
                return 7
            }
        }
        #expect(try r.get() == 7)
        #expect(seen == [[0xB1, 0xB2, 0xB3], [0xA1, 0xA2, 0xA3, 0xA4], [0xA3, 0xA4]])
        #expect(flagsInside == ["\(GTF_permit_access | GTF_readonly | GTF_reading)", "\(GTF_permit_access | GTF_reading)"])
        #expect(revokeInside == "busy")
        #expect(g.send("flags 3") == "\(GTF_permit_access | GTF_readonly)")
        #expect(g.send("flags 4") == "\(GTF_permit_access)")

        // Refusals: the body never runs, and grants pinned before the refusal are released.
        func refusal(_ s: [GrantSpan], domid: DomID? = nil) -> GrantStatus? {
            var ran = false
            let r = s.withUnsafeBufferPointer { f.dom0.withGrantsInPlace(domid: domid ?? d.domid, $0, iov: iov) { ran = true; return 0 } }
            #expect(!ran)
            if case .failure(let st) = r { return st }
            return nil
        }
        #expect(g.send("grant 5 7 13 rw") == "ok")  // granted to another domain
        #expect(refusal([GrantSpan(ref: 3, offset: 0, length: 8), GrantSpan(ref: 5, offset: 0, length: 8)]) == .generalError)
        #expect(refusal([GrantSpan(ref: 3, offset: 4090, length: 8)]) == .badCopyArg)
        #expect(refusal([GrantSpan(ref: 3, offset: 0, length: 8), GrantSpan(ref: 9999, offset: 0, length: 8)]) == .badGntref)
        #expect(refusal([GrantSpan(ref: 3, offset: 0, length: 8)], domid: 777) == .badDomain)
        #expect(refusal([GrantSpan(ref: 11, offset: 0, length: 8)]) == .generalError)  // never granted
        #expect(g.send("end 3") == "ok")
        #expect(g.send("end 4") == "ok")
    }

    @Test func killingTheMapperReleasesItsMaps() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        let mapper = try f.dom0Peer()
        #expect(g.send("grant 20 0 30 rw") == "ok")
        #expect(g.send("grant 21 0 31 ro") == "ok")
        #expect(mapper.send("map \(d.domid) 20 rw").hasPrefix("ok"))
        #expect(mapper.send("map \(d.domid) 21 ro").hasPrefix("ok"))
        #expect(mapper.send("mwrite 0 0 beef") == "ok")
        #expect(g.send("read 30 0 2") == "beef")
        // A mapping of ours on the same entry must survive the other mapper's death.
        let ours = try f.dom0.mapGrant(domid: d.domid, ref: 21, writable: false).get()
        #expect(g.send("end 20") == "busy")
        mapper.kill9()
        // xenhv handles hung-up connections before requests of the same poll round,
        // so one round trip after the mapper is reaped orders us after its clean-up.
        _ = try f.dom0.listDomains()
        #expect(g.send("flags 20") == "\(GTF_permit_access)")
        #expect(g.send("end 20") == "ok")
        #expect(g.send("flags 21") == "\(GTF_permit_access | GTF_readonly | GTF_reading)")
        #expect(g.send("end 21") == "busy")
        #expect(f.dom0.unmapGrant(ours) == .okay)
        #expect(g.send("end 21") == "ok")
    }

    @Test func guestsHaveNoDom0Powers() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        let (_, other) = try f.guest(name: "other")
        #expect(g.send("create").contains("EPERM"))
        #expect(other.send("grant 1 0 5 rw") == "ok")
        #expect(g.send("map-foreign \(d.domid + 1) 1") == "err \(GNTST_permission_denied)")
    }
}

@Suite struct ForeignMappingTests {
    @Test func dom0MapsTheXenstorePageAGuestCannot() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        let m = try f.dom0.mapForeignFrames(domid: d.domid, frame: d.storeMFN)
        try m.region.store(UInt32(0xABCD_1234), at: 1024)
        #expect(g.send("read \(d.storeMFN) 1024 4") == "3412cdab")
        #expect(throws: XenErrno.EINVAL) { try f.dom0.mapForeignFrames(domid: d.domid, frame: 64) }
        #expect(throws: XenErrno.EINVAL) { try f.dom0.mapForeignFrames(domid: d.domid, frame: 63, count: 2) }
        #expect(throws: XenErrno.ESRCH) { try f.dom0.mapForeignFrames(domid: 999, frame: 0) }
    }
}

@Suite struct HostileClientTests {
    /// A guest that sends requests and never reads the replies must be dropped,
    /// never stall xenhv for everyone else.
    @Test func aGuestThatNeverReadsIsDroppedAndOthersAreServed() throws {
        let f = try HypervisorFixture()
        let d = try f.dom0.createDomain(pages: 16, name: "flooder")
        defer { close(d.guestDescriptor) }
        let sock = d.guestDescriptor
        try WireMessage(code: Int32(HVOp.hello.rawValue), payload: []).send(on: sock)
        var w = WireWriter()
        w.u16(HVLimits.domidSelf)
        let request = WireMessage(code: Int32(HVOp.querySize.rawValue), payload: w.bytes)
        var dropped = false
        for _ in 0..<1_000_000 {
            do {
                try request.send(on: sock, blocking: false)
            } catch HypervisorError.connectionLost {
                dropped = true
                break
            } catch {
                // Our side is full: wait (bounded) until it drains or the peer hangs up.
                var p = pollfd(fd: sock, events: Int16(POLLOUT), revents: 0)
                guard poll(&p, 1, 10_000) > 0 else { break }
                if p.revents & Int16(POLLHUP | POLLERR) != 0 { dropped = true; break }
            }
        }
        #expect(dropped)
        #expect(try f.dom0.listDomains().first { $0.domid == d.domid }?.stateLetters == "---sc-")
        #expect(try f.dom0.listDomains().first { $0.domid == d.domid }?.shutdownReason == .crash)
        let (g, peer) = try f.guest(name: "polite")
        #expect(peer.send("info").hasPrefix("domid \(g.domid)"))
    }
}

@Suite struct ForeignDomainLifetimeTests {
    /// Our descriptors of the shared objects of domain `d` of xenhv `pid`
    /// (memfds are named xen-<xenhv pid>-d<domid>-<object>).
    static func descriptors(of d: DomID, xenhv pid: pid_t) -> Int {
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        return fds.filter { fd in
            (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fd)"))?
                .contains("xen-\(pid)-d\(d)-") ?? false
        }.count
    }

    /// A backend that maps guests' grants and outlives the guests keeps no
    /// descriptor of any destroyed domain.
    @Test func destroyedGuestsLeaveNoDescriptorsInTheMapper() throws {
        let f = try HypervisorFixture()
        // Warm up one guest so lazily created objects of ours exist already.
        let (w, wg) = try f.guest(name: "warm")
        #expect(wg.send("grant 1 0 10 rw") == "ok")
        f.dom0.unmapGrant(try f.dom0.mapGrant(domid: w.domid, ref: 1, writable: true).get())
        var domids: [DomID] = []
        for i in 0..<5 {
            let (d, g) = try f.guest(name: "short-\(i)")
            #expect(g.send("grant 1 0 10 rw") == "ok")
            domids.append(d.domid)
            let m = try f.dom0.mapGrant(domid: d.domid, ref: 1, writable: true).get()
            #expect(Self.descriptors(of: d.domid, xenhv: f.daemon.pid) > 0)
            try f.dom0.destroyDomain(d.domid)
            g.reap()
            // Still mapped: the pages stay valid after the domain died.
            try m.region.store(UInt8(7), at: 0)
            #expect(f.dom0.unmapGrant(m) == .okay)
        }
        // Each destroyed domain was dropped at its last unmap; mapping on goes on as before.
        f.dom0.unmapGrant(try f.dom0.mapGrant(domid: w.domid, ref: 1, writable: true).get())
        for d in domids { #expect(Self.descriptors(of: d, xenhv: f.daemon.pid) == 0) }
        #expect(Self.descriptors(of: w.domid, xenhv: f.daemon.pid) > 0)
    }

    /// The same for a privileged foreign mapping (xenstored's mapping of a
    /// guest's xenstore page): dropping the last one of a destroyed domain
    /// closes our descriptors of it at once, with no later lookup needed.
    @Test func aDestroyedGuestsForeignMappingIsItsLastHold() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest(name: "ring")
        var m: ForeignMapping? = try f.dom0.mapForeignFrames(domid: d.domid, frame: 0)
        #expect(Self.descriptors(of: d.domid, xenhv: f.daemon.pid) > 0)
        try f.dom0.destroyDomain(d.domid)
        g.reap()
        // Still mapped: the page stays valid after the domain died.
        try m?.region.store(UInt8(7), at: 0)
        #expect(Self.descriptors(of: d.domid, xenhv: f.daemon.pid) > 0)
        m = nil
        #expect(Self.descriptors(of: d.domid, xenhv: f.daemon.pid) == 0)
    }
}

@Suite struct MaptrackLimitTests {
    /// A mapper holds at most max_maptrack_frames * 256 handles: the next map
    /// is GNTST_no_space (checked before the ref), and a freed handle is reused.
    @Test func mapsBeyondTheMaptrackGetNoSpace() throws {
        let f = try HypervisorFixture(xenhvArguments: ["--max-maptrack-frames", "1"])
        let (d, g) = try f.guest(pages: 512)
        for r in 0..<257 { #expect(g.send("grant \(r + 8) 0 \(r + 16) ro") == "ok") }
        var maps: [GrantMapping] = []
        for r in 0..<256 { maps.append(try f.dom0.mapGrant(domid: d.domid, ref: GrantRef(r + 8), writable: false).get()) }
        #expect(throws: GrantStatus.noSpace) { try f.dom0.mapGrant(domid: d.domid, ref: 264, writable: false).get() }
        // The limit is checked before the ref, as on Xen.
        #expect(throws: GrantStatus.noSpace) { try f.dom0.mapGrant(domid: d.domid, ref: .max, writable: false).get() }
        #expect(f.dom0.unmapGrant(maps.removeLast()) == .okay)
        maps.append(try f.dom0.mapGrant(domid: d.domid, ref: 264, writable: false).get())
        for m in maps { #expect(f.dom0.unmapGrant(m) == .okay) }
    }
}
