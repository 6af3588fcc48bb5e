import CXen
import Dispatch
import Foundation
import Glibc
import Synchronization
import Testing
import XenBus
import XenHV
import XenStore
import XenTestKit

/// A guest domain talking to xenstored over its real xenstore ring: the page
/// and event channel the hypervisor core's builder made (start_info store_mfn /
/// store_evtchn), introduced by the toolstack with XS_INTRODUCE.
@Suite struct HypervisorGuestTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path
    static func dom0() throws -> Dom0Harness {
        try Dom0Harness(buildDirectory: Dom0Harness.buildDirectory(packageRoot: root))
    }

    /// Watch events collected by a callback, awaited with a deadline.
    final class Events: @unchecked Sendable {
        let box = Mutex<[XenBusWatchEvent]>([])
        let sem = DispatchSemaphore(value: 0)
        var callback: @Sendable (XenBusWatchEvent) -> Void {
            { [self] e in box.withLock { $0.append(e) }; sem.signal() }
        }
        func next(_ seconds: Double = 10) -> XenBusWatchEvent? {
            guard sem.wait(timeout: .now() + seconds) == .success else { return nil }
            return box.withLock { $0.removeFirst() }
        }
    }

    @Test func guestUsesItsRingWithinItsPermissions() throws {
        let s = try Self.dom0()
        let g1 = try s.createGuest(name: "one"), g2 = try s.createGuest(name: "two")
        defer { g1.xenstore.close(); g2.xenstore.close() }
        #expect(try s.xenstore.isDomainIntroduced(XenStore.DomID(g1.domid)))
        #expect(try g1.xenstore.getDomainPath(XenStore.DomID(g1.domid)) == g1.home)
        // The toolstack's nodes in its home are the guest's own.
        #expect(try g1.xenstore.read("name") == "one")

        // Its own subtree: absolute and relative paths.
        try g1.xenstore.write(g1.home + "/data/x", "hello")
        #expect(try g1.xenstore.read("data/x") == "hello")
        try g1.xenstore.write("data/y", "rel")
        #expect(try s.xenstore.read(g1.home + "/data/y") == "rel")
        #expect(try s.xenstore.getPermissions(g1.home + "/data/y").first?.domid == XenStore.DomID(g1.domid))

        // Another guest's subtree, and dom0's: EACCES; special watches are privileged.
        try g2.xenstore.write("secret", "s")
        #expect(throws: XenBusError.xs(.EACCES)) { try g1.xenstore.read(g2.home + "/secret") }
        #expect(throws: XenBusError.xs(.EACCES)) { try g1.xenstore.write(g2.home + "/evil", "x") }
        #expect(throws: XenBusError.xs(.EACCES)) { try g1.xenstore.write("/local/domain/0/evil", "x") }
        // Special watches are allowed (do_watch) but only readers hear events after
        // the registration (watch_permitted; the node is n0).
        #expect(throws: Never.self) { try g1.xenstore.watch("@releaseDomain") }

        // Its watches fire: once at registration, then on a change below.
        let ev = Events()
        _ = try g1.xenstore.watch(g1.home + "/data", token: "tok", callback: ev.callback)
        #expect(ev.next()?.path == g1.home + "/data")
        try s.xenstore.write(g1.home + "/data/z", "from dom0")
        let e = ev.next()
        #expect(e?.path == g1.home + "/data/z" && e?.token == "tok")
    }

    @Test func domainDeathReleasesItAndFiresReleaseDomain() throws {
        let s = try Self.dom0()
        let g = try s.createGuest(name: "mortal")
        defer { g.xenstore.close() }
        try g.xenstore.write("data/x", "1")
        let ev = Events()
        _ = try s.xenstore.watch("@releaseDomain", token: "rel", callback: ev.callback)
        #expect(ev.next()?.path == "@releaseDomain")  // registration
        try s.hypervisor.destroyDomain(g.domid)
        #expect(ev.next()?.path == "@releaseDomain")
        #expect(try !s.xenstore.isDomainIntroduced(XenStore.DomID(g.domid)))
    }

    /// xenstore.txt: "@releaseDomain occurs on any domain crash or shutdown"; C
    /// xenstored's check_domain fires it the first time it sees XEN_DOMINF_shutdown,
    /// and the domain stays introduced until it dies.
    @Test func guestShutdownFiresReleaseDomain() throws {
        let s = try Self.dom0()
        let g = try s.createGuest(name: "quitter")
        defer { g.xenstore.close() }
        try g.xenstore.write("data/x", "1")
        let ev = Events()
        _ = try s.xenstore.watch("@releaseDomain", token: "rel", callback: ev.callback)
        #expect(ev.next()?.path == "@releaseDomain")  // registration
        try g.hypervisor.shutdownSelf(reason: .poweroff)
        #expect(ev.next()?.path == "@releaseDomain")
        #expect(try s.xenstore.isDomainIntroduced(XenStore.DomID(g.domid)))
        #expect(try s.xenstore.read(g.home + "/data/x") == "1")
        try s.hypervisor.destroyDomain(g.domid)
        #expect(ev.next()?.path == "@releaseDomain")
        #expect(try !s.xenstore.isDomainIntroduced(XenStore.DomID(g.domid)))
    }

    @Test func aCorruptRingIndexClosesOnlyThatGuest() throws {
        let s = try Self.dom0()
        let liar = try s.createGuest(name: "liar"), honest = try s.createGuest(name: "honest")
        defer { liar.xenstore.close(); honest.xenstore.close() }
        try liar.xenstore.write("data/x", "1")
        // The guest publishes a request producer 5000 bytes ahead of the consumer.
        let page = try liar.hypervisor.memory!.region.slice(offset: Int(liar.domain.storeMFN) * 4096, length: 4096)
        let cons: UInt32 = try page.load(at: MemoryLayout<xenstore_domain_interface>.offset(of: \.req_cons)!)
        try page.store(cons &+ 5000, at: MemoryLayout<xenstore_domain_interface>.offset(of: \.req_prod)!)
        try liar.hypervisor.channel(liar.domain.storePort).notify()
        // The daemon shuts that connection: the guest's requests fail from then on...
        var failed = false
        for _ in 0..<100 {
            do { _ = try liar.xenstore.read("data/x") } catch { failed = true; break }
        }
        #expect(failed)
        // ...while the other guest and dom0 carry on.
        try honest.xenstore.write("data/ok", "yes")
        #expect(try s.xenstore.read(liar.home + "/name") == "liar")
    }
}
