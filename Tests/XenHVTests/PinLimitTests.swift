import CXen
import Glibc
import Testing
import XenHV

/// Xen refuses a pin with GNTST_general_error ("risk of counter overflow")
/// when the counter it would raise already has its top bit set:
/// `act->pin & GNTPIN_incr2oflow_mask(pin_incr)` in map_grant_ref and
/// acquire_grant_for_copy, 128 pins per 8-bit counter. Our host-read and
/// host-write counters stop at the same 128.
@Suite struct PinLimitTests {
    @Test func the129thPinOfAKindIsRefused() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        #expect(g.send("grant 5 0 10 rw") == "ok")
        var reads: [GrantMapping] = []
        var writes: [GrantMapping] = []
        defer {
            for m in reads + writes { f.dom0.unmapGrant(m) }
        }
        for _ in 0..<128 { reads.append(try f.dom0.mapGrant(domid: d.domid, ref: 5, writable: false).get()) }
        #expect(throws: GrantStatus.generalError) { try f.dom0.mapGrant(domid: d.domid, ref: 5, writable: false).get() }
        // The write counter is another counter.
        for _ in 0..<128 { writes.append(try f.dom0.mapGrant(domid: d.domid, ref: 5, writable: true).get()) }
        #expect(throws: GrantStatus.generalError) { try f.dom0.mapGrant(domid: d.domid, ref: 5, writable: true).get() }
        #expect(g.send("flags 5") == "\(GTF_permit_access | GTF_reading | GTF_writing)")

        // A copy pins too: reading the full read counter's grant, or writing
        // the full write counter's, is refused.
        var buf = [UInt8](repeating: 0, count: 16)
        buf.withUnsafeMutableBytes { b in
            var ops = [GrantCopy(source: .grant(domid: d.domid, ref: 5, offset: 0), dest: .local(b.baseAddress!), length: 8)]
            f.dom0.copyGrants(&ops)
            #expect(ops[0].status == .generalError)
            ops = [GrantCopy(source: .local(b.baseAddress!), dest: .grant(domid: d.domid, ref: 5, offset: 0), length: 8)]
            f.dom0.copyGrants(&ops)
            #expect(ops[0].status == .generalError)
            var span = GrantSpan(ref: 5, offset: 0, length: 8)
            var iov = iovec()
            let inPlace = withUnsafePointer(to: &span) { p in
                f.dom0.withGrantsInPlace(domid: d.domid, UnsafeBufferPointer(start: p, count: 1), iov: &iov) { 0 }
            }
            #expect(throws: GrantStatus.generalError) { try inPlace.get() }
            _ = b
        }

        // One fewer of each and both work again.
        #expect(f.dom0.unmapGrant(reads.removeLast()) == .okay)
        #expect(f.dom0.unmapGrant(writes.removeLast()) == .okay)
        reads.append(try f.dom0.mapGrant(domid: d.domid, ref: 5, writable: false).get())
        #expect(f.dom0.unmapGrant(reads.removeLast()) == .okay)
        buf.withUnsafeMutableBytes { b in
            var ops = [GrantCopy(source: .grant(domid: d.domid, ref: 5, offset: 0), dest: .local(b.baseAddress!), length: 8),
                       GrantCopy(source: .local(b.baseAddress!), dest: .grant(domid: d.domid, ref: 5, offset: 8), length: 8)]
            f.dom0.copyGrants(&ops)
            #expect(ops.map(\.status) == [.okay, .okay])
        }
        for m in reads + writes { #expect(f.dom0.unmapGrant(m) == .okay) }
        reads = []
        writes = []
        #expect(g.send("flags 5") == "\(GTF_permit_access)")
        #expect(g.send("end 5") == "ok")
    }
}
