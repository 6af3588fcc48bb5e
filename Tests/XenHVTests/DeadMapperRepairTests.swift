import CXen
import Foundation
import Glibc
import Synchronization
import Testing
@testable import XenHV
import XenTestKit

/// xenhv repairs a dead mapper's grants itself (Xen's gnttab_release_mappings)
/// and never waits for ever on a live mapper's entry lock.
@Suite struct DeadMapperRepairTests {
    final class Flags: Sendable {
        let done = Atomic<Bool>(false)
        let stop = Atomic<Bool>(false)
    }

    /// A live mapper (this process) holds entry A's lock and waits for entry
    /// B's, which a second mapper holds (a grant copy takes two). A first
    /// mapper, which mapped A, dies: xenhv's repair of A waits for us. Then
    /// the second dies too. xenhv, still in the first repair, must see it,
    /// take B over and repair it, so we go on and let A go: before, it
    /// waited on A for ever, and every domain with it.
    @Test(.timeLimit(.minutes(1)))
    func aRepairWaitingOnALiveMapperFreesTheLockThatMapperWaitsFor() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        #expect(g.send("grant 20 0 30 rw") == "ok")  // A
        #expect(g.send("grant 21 0 31 rw") == "ok")  // B
        let first = try f.dom0Peer()
        let second = try f.dom0Peer()
        #expect(first.send("map \(d.domid) 20 rw").hasPrefix("ok"))
        #expect(second.send("lock \(d.domid) 21") == "ok")
        let hv = f.dom0
        let dom = try #require(hv.foreignDomain(d.domid))
        let me = hv.clientID
        let a = dom.active.lock(20, owner: me)
        let flags = Flags()
        defer { flags.stop.store(true, ordering: .relaxed) }
        Thread {
            var b: Pins? = nil
            while b == nil && !flags.stop.load(ordering: .relaxed) {
                b = dom.active.tryLock(21, owner: me, stealingFrom: [])
                if b == nil { sched_yield() }
            }
            if let b { dom.active.unlock(21, pins: b) }
            dom.active.unlock(20, pins: a)
            flags.done.store(true, ordering: .releasing)
        }.start()
        first.kill9()
        // xenhv is in the first repair, waiting for A: it uses CPU where it
        // was idle (a measurement of where it is, not a wait for time).
        let xenhv = f.daemon.pid
        #expect(eventually(seconds: 10, every: 50) {
            let c0 = OtherProcess.cpuSeconds(xenhv)
            idle(milliseconds: 100)
            return OtherProcess.cpuSeconds(xenhv) - c0 > 0.03
        }, "xenhv did not start waiting for the entry lock")
        second.kill9()
        try #require(eventually(seconds: 10) { flags.done.load(ordering: .acquiring) },
                     "the live mapper never got entry B: xenhv waited on A for ever")
        _ = try hv.listDomains()  // both hang-ups served before this answer
        #expect(g.send("flags 20") == "\(GTF_permit_access)", "A keeps no pin or busy bit of the dead mapper")
        #expect(g.send("end 20") == "ok")
        #expect(g.send("end 21") == "ok")
    }

    /// A mapper dies holding an entry lock of a domain already destroyed:
    /// xenhv repairs live domains' entries only, so that lock stays taken.
    /// A live mapper letting go of its own mapping of the grant must not
    /// wait for it: the domain is gone and nobody reads its pins again.
    /// Before, the unmap spun for ever (and a backend's detach with it).
    @Test(.timeLimit(.minutes(1)))
    func unmappingADestroyedDomainsGrantNeverWaitsOnADeadMappersLock() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        #expect(g.send("grant 20 0 30 rw") == "ok")
        let hv = f.dom0
        let mapping = try hv.mapGrant(domid: d.domid, ref: 20, writable: true).get()
        let peer = try f.dom0Peer()
        #expect(peer.send("lock \(d.domid) 20") == "ok")
        try hv.destroyDomain(d.domid)
        peer.kill9()
        _ = try hv.listDomains()  // the hang-up served before this answer
        let flags = Flags()
        Thread {
            _ = hv.unmapGrant(mapping)
            flags.done.store(true, ordering: .releasing)
        }.start()
        #expect(eventually(seconds: 10) { flags.done.load(ordering: .acquiring) },
                "the unmap waited for a lock a dead mapper holds on a destroyed domain's entry")
    }
}
