import CXen
import Foundation
import Glibc
import Synchronization
import Testing
@testable import XenHV

/// Two unmaps of one handle at once: one wins, the other gets
/// GNTST_bad_handle, as in Xen's unmap_common. Never a double munmap, a pin
/// dropped twice or a handle freed twice.
@Suite struct UnmapRaceTests {
    /// What the main thread and the two unmapping threads share.
    final class Shared: Sendable {
        /// The round the unmappers may run.
        let go = Atomic<Int>(0)
        /// Unmaps done, over all rounds.
        let finished = Atomic<Int>(0)
        let handle = Atomic<UInt32>(0)
        /// This round's unmaps that returned GNTST_okay.
        let okays = Atomic<Int>(0)
        /// Unmappers that entered this round's unmap, over all rounds.
        let entered = Atomic<Int>(0)
        /// Set when the test ends, however it ends: the unmappers return.
        let stop = Atomic<Bool>(false)
    }

    @Test func twoUnmapsOfOneHandleHaveOneWinner() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        #expect(g.send("grant 5 0 10 ro") == "ok")
        #expect(g.send("grant 6 0 11 ro") == "ok")
        let rounds = 300
        let s = Shared()
        let hv = f.dom0
        let threads = (0..<2).map { _ in
            Thread {
                for r in 1...rounds {
                    while s.go.load(ordering: .acquiring) < r {
                        if s.stop.load(ordering: .relaxed) { return }
                        sched_yield()
                    }
                    s.entered.add(1, ordering: .releasing)
                    if hv.unmap(handle: s.handle.load(ordering: .relaxed)) == .okay { s.okays.add(1, ordering: .relaxed) }
                    s.finished.add(1, ordering: .releasing)
                }
            }
        }
        defer { s.stop.store(true, ordering: .relaxed) }
        threads.forEach { $0.start() }
        // A pin held throughout: a second decrement of the racing one would clear GTF_reading.
        let held = try f.dom0.mapGrant(domid: d.domid, ref: 5, writable: false).get()
        let dom = try #require(f.dom0.foreignDomain(d.domid))
        var doubles = 0
        for r in 1...rounds {
            let m = try f.dom0.mapGrant(domid: d.domid, ref: 5, writable: false).get()
            s.handle.store(m.handle, ordering: .relaxed)
            s.okays.store(0, ordering: .relaxed)
            // The entry lock, held while both unmaps start, lines them up at
            // it: the widest window the race can have. (Only the chance to
            // see the old race depends on timing; one winner is exact.)
            let pins = dom.active.lock(5, owner: 0xFFFF_FFF0)
            s.go.store(r, ordering: .releasing)
            while s.entered.load(ordering: .acquiring) < 2 * r { sched_yield() }
            for _ in 0..<200 { sched_yield() }
            dom.active.unlock(5, pins: pins)
            while s.finished.load(ordering: .acquiring) < 2 * r { sched_yield() }
            if s.okays.load(ordering: .relaxed) != 1 { doubles += 1 }
        }
        #expect(doubles == 0, "\(doubles) of \(rounds) handles were unmapped twice")
        #expect(g.send("flags 5") == "\(GTF_permit_access | GTF_readonly | GTF_reading)")
        // No handle went on the free list twice.
        let a = try f.dom0.mapGrant(domid: d.domid, ref: 6, writable: false).get()
        let b = try f.dom0.mapGrant(domid: d.domid, ref: 6, writable: false).get()
        #expect(a.handle != b.handle && a.handle != held.handle && b.handle != held.handle)
        #expect(f.dom0.unmapGrant(a) == .okay)
        #expect(f.dom0.unmapGrant(b) == .okay)
        #expect(f.dom0.unmapGrant(held) == .okay)
        #expect(g.send("end 5") == "ok")
        #expect(g.send("end 6") == "ok")
    }

    /// The page goes before the pin (the granter may reuse it once the busy
    /// bits clear), and the munmap does not hold the grant's entry lock, which
    /// every process mapping or copying that grant takes: with the lock held
    /// elsewhere, an unmap has already unmapped the page while it waits.
    @Test func unmapDropsThePageBeforeItWaitsForTheEntryLock() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        #expect(g.send("grant 7 0 12 rw") == "ok")
        let m = try f.dom0.mapGrant(domid: d.domid, ref: 7, writable: true).get()
        let dom = try #require(f.dom0.foreignDomain(d.domid))
        let pins = dom.active.lock(7, owner: 0xFFFF_FFF0)
        let s = Shared()
        let hv = f.dom0
        let unmapper = Thread {
            if hv.unmap(handle: m.handle) == .okay { s.okays.add(1, ordering: .relaxed) }
            s.finished.add(1, ordering: .releasing)
        }
        unmapper.start()
        let page = m.region.base
        let deadline = monotonicSeconds() + 10
        var unmapped = false
        while !unmapped && monotonicSeconds() < deadline {
            unmapped = msync(page, HVLimits.pageSize, MS_ASYNC) != 0 && errno == ENOMEM
            if !unmapped { sched_yield() }
        }
        #expect(unmapped, "the page was still mapped while the unmap waited for the entry lock")
        #expect(s.finished.load(ordering: .acquiring) == 0, "the unmap dropped its pin without the entry lock")
        #expect(g.send("flags 7") == "\(GTF_permit_access | GTF_reading | GTF_writing)")
        dom.active.unlock(7, pins: pins)
        while s.finished.load(ordering: .acquiring) == 0 { sched_yield() }
        #expect(s.okays.load(ordering: .relaxed) == 1)
        #expect(g.send("flags 7") == "\(GTF_permit_access)")
        #expect(g.send("end 7") == "ok")
    }
}
