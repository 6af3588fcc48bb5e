import CXen
import Glibc
import Testing
import XenHV

/// Which status an op that is wrong in several ways gets. Xen's
/// gnttab_copy_one (4.6 and later) locks both domains first (source, then
/// destination: GNTST_bad_domain), then claims the source's grant and the
/// destination's (GNTST_bad_gntref, GNTST_general_error), and only then
/// gnttab_copy_buf checks the offsets (GNTST_bad_copy_arg).
@Suite struct GrantCopyOrderTests {
    @Test func domainsThenGrantsThenOffsets() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        #expect(g.send("grant 3 0 11 rw") == "ok")
        let buf = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buf.deallocate() }
        var ops = [
            // Unknown domain and past the page.
            GrantCopy(source: .grant(domid: 999, ref: 3, offset: 1), dest: .local(buf), length: 4096),
            // Bad ref and past the page.
            GrantCopy(source: .grant(domid: d.domid, ref: 9999, offset: 4000), dest: .local(buf), length: 200),
            // A good source past the page, and an unknown destination domain.
            GrantCopy(source: .grant(domid: d.domid, ref: 3, offset: 4000), dest: .grant(domid: 777, ref: 3, offset: 0), length: 200),
            // A bad source ref, and an unknown destination domain.
            GrantCopy(source: .grant(domid: d.domid, ref: 9999, offset: 0), dest: .grant(domid: 777, ref: 3, offset: 0), length: 8),
            // A never-granted ref past the page: the claim fails first.
            GrantCopy(source: .grant(domid: d.domid, ref: 11, offset: 4095), dest: .local(buf), length: 2),
            // Only past the page.
            GrantCopy(source: .grant(domid: d.domid, ref: 3, offset: 4095), dest: .local(buf), length: 2),
        ]
        f.dom0.copyGrants(&ops)
        #expect(ops.map(\.status) == [.badDomain, .badGntref, .badDomain, .badDomain, .generalError, .badCopyArg])

        // Grants in place answer as a copy would.
        let iov = UnsafeMutablePointer<iovec>.allocate(capacity: 2)
        defer { iov.deallocate() }
        func refusal(_ s: [GrantSpan], domid: DomID? = nil) -> GrantStatus? {
            let r = s.withUnsafeBufferPointer { f.dom0.withGrantsInPlace(domid: domid ?? d.domid, $0, iov: iov) { 0 } }
            if case .failure(let st) = r { return st }
            return nil
        }
        #expect(refusal([GrantSpan(ref: 3, offset: 4090, length: 8)], domid: 777) == .badDomain)
        #expect(refusal([GrantSpan(ref: 3, offset: 4090, length: 8), GrantSpan(ref: 9999, offset: 0, length: 8)]) == .badGntref)
        #expect(refusal([GrantSpan(ref: 11, offset: 4090, length: 8)]) == .generalError)
        #expect(refusal([GrantSpan(ref: 3, offset: 4090, length: 8)]) == .badCopyArg)
        // Nothing stays pinned.
        #expect(g.send("end 3") == "ok")
    }
}
