import CXen
import Foundation
import Glibc
@testable import NetBack
import NetFrontKit
import Synchronization
import Testing
import XenHV
import XenRing
import XenTestKit

/// Tells a flooding frontend thread to stop, and what stopped it early.
final class FloodControl: Sendable {
    let stop = Atomic<Bool>(false)
    let failure = Mutex<String?>(nil)
}

/// A queue worker takes bounded turns (Linux's NAPI budget): a guest that
/// keeps its tx ring full cannot keep it from its stop eventfd. Needs root
/// (taps); every vif is closed in a defer, after the flooding thread stopped.
@Suite(.serialized) struct WorkerTurnTests {
    /// A frontend thread refills every free tx slot as soon as responses come
    /// back, never sleeping; `disconnect()` must still return promptly. End
    /// to end only: on this 2-core machine under load the flood held the
    /// unbudgeted loop from under a millisecond to about 250 ms, not for ever,
    /// so ``aTransmitPassIsBudgeted()`` is the check that fails without the budget.
    @Test func disconnectReturnsWhileTheGuestFloodsItsTxRing() throws {
        let f = try HypervisorFixture()
        let g = try GuestVif(fixture: f, network: nil)
        let flood = FloodControl()
        // Full-size UDP frames with NETTXF_csum_blank to nowhere on an up,
        // unbridged tap: each costs the backend a grant copy, the checksum
        // set-up and a tap write, while the frontend only queues a request
        // (every buffer holds the frame already), as fast as it can.
        try Netlink().setUp(g.vif.name)
        let frame = Frames.udp(srcMAC: g.mac, dstMAC: [0x00, 0x16, 0x3e, 0x7f, 0x7f, 0x7f], src: g.ip, dst: [10, 0, 0, 9],
                               sport: 1, dport: 2, payload: Array(repeating: 0x5a, count: 1472), checksumBlank: true)
        let q = g.queue  // only the flooder touches it until it is joined
        for id in 0..<UInt16(256) { try q.writeTxBuffer(id, offset: 0, frame) }
        let flooder = TestThread {
            do {
                while !flood.stop.load(ordering: .relaxed) {
                    // Each packet is published at once, so the backend finds
                    // the ring refilled whenever it looks.
                    while q.tx.freeRequests > 0, let id = q.takeTxID() {
                        q.tx.enqueueTxSlot(0, of: 1, totalBytes: frame.count, slotBytes: frame.count, gref: q.txRef(id), id: id,
                                           flags: UInt16(NETTXF_csum_blank))
                        try q.pushTx()
                    }
                    _ = try q.reapTx()
                }
            } catch {
                flood.failure.withLock { $0 = "\(error)" }
            }
        }
        var flooderJoined = false
        defer {
            flood.stop.store(true, ordering: .relaxed)
            if !flooderJoined { flooder.join() }
            g.close()
        }
        // The flood is on once the backend has carried a few rings' worth.
        #expect(eventually(seconds: 5, every: 1) { g.vif.stats.snapshot.txPackets > 256 })
        let returned = DispatchSemaphore(value: 0)
        let vif = g.vif
        let disconnector = TestThread { vif.disconnect(); returned.signal() }
        let prompt = returned.wait(timeout: .now() + 5) == .success
        flood.stop.store(true, ordering: .relaxed)
        flooder.join()
        flooderJoined = true
        if !prompt { returned.wait() }  // the flood is over: it returns now
        disconnector.join()
        #expect(prompt, "disconnect() did not return within 5 s while the guest flooded")
        #expect(flood.failure.withLock { $0 } == nil)
        #expect(!g.vif.isConnected)
    }

    /// The worst flood, made deterministic: a frontend that refills the whole
    /// ring inside every notification, before the backend looks again. One
    /// `run` is one turn: at most a ring's worth of requests
    /// (``TxEngine/turnBudget``), then back to the worker loop with work left.
    @Test func aTransmitPassIsBudgeted() throws {
        let f = try HypervisorFixture()
        let (domid, guest) = try f.guest(pages: NetFront.pagesNeeded(queues: 1), name: uniqueName("netfront"))
        let q = try NetFront(guest: guest).queues[0]
        guard case .success(let m) = f.dom0.mapGrant(domid: domid, ref: q.rings.txRingRef, writable: true) else {
            Issue.record("cannot map the tx ring")
            return
        }
        defer { f.dom0.unmapGrant(m) }
        let sink = open("/dev/null", O_WRONLY | O_CLOEXEC)  // the tap: every write succeeds
        #expect(sink >= 0)
        defer { close(sink) }
        let stats = VifStats()
        var engine = TxEngine(ring: BackRing(attaching: try m.region.ring(NetifTxRing.self, pages: 1)), hypervisor: f.dom0,
                              domid: domid, tapFD: sink, stats: stats, queueStats: stats.queues[0], rate: nil)
        let frame = Frames.udp(srcMAC: [0x00, 0x16, 0x3e, 1, 2, 3], dstMAC: [0x00, 0x16, 0x3e, 4, 5, 6], src: [10, 0, 0, 1],
                               dst: [10, 0, 0, 2], sport: 1, dport: 2, payload: Array(repeating: 0x5a, count: 18))
        for id in 0..<UInt16(256) { try q.writeTxBuffer(id, offset: 0, frame) }
        func refill() throws {
            _ = try q.reapTx()
            while q.tx.freeRequests > 0, let id = q.takeTxID() {
                q.tx.enqueueTxSlot(0, of: 1, totalBytes: frame.count, slotBytes: frame.count, gref: q.txRef(id), id: id)
            }
            q.tx.pushRequests()
            _ = try q.tx.finalCheckForResponses()  // ask to be notified of the next responses
        }
        try refill()
        var kicks = 0
        let refills = 40
        let result = engine.run(kick: {
            kicks += 1
            if kicks <= refills { try? refill() }
        })
        // Without a budget the pass ends only when this frontend stops refilling.
        #expect(kicks <= 2, "one pass served \(kicks) ring refills")
        #expect(result == .budgetSpent(notify: false) || result == .budgetSpent(notify: true), "\(result)")
        #expect(stats.snapshot.txPackets <= UInt64(TxEngine.turnBudget))
        #expect(stats.snapshot.txDrops == 0)
    }

    /// A tap deleted under a connected vif (`ip link del`): tun then answers
    /// every poll with POLLERR and every read with EBADFD. The worker must
    /// take the tap as gone, not spin on it.
    @Test func aDeletedTapDoesNotMakeTheWorkerSpin() throws {
        let f = try HypervisorFixture()
        let before = Set(threadCPUTimes().keys)
        let g = try GuestVif(fixture: f, network: nil)
        defer { g.close() }
        let workers = Set(threadCPUTimes().keys).subtracting(before)
        #expect(!workers.isEmpty)
        try Netlink().setUp(g.vif.name)
        try Netlink().deleteLink(g.vif.name)
        let c0 = threadCPUTimes(), w0 = Date()
        idle(milliseconds: 1000)  // a measurement window, not synchronisation
        let used = cpuSeconds(of: workers, from: c0, to: threadCPUTimes()), window = Date().timeIntervalSince(w0)
        #expect(used < 0.25 * window, "the queue worker used \(used) s of CPU in \(window) s after its tap was deleted")
        // And the queue says so, once.
        let seen = eventually(seconds: 5, every: 1) { g.vif.stats.snapshot[.tapGone] == 1 }
        #expect(seen, "the worker did not see its tap go; it waits in: \(workers.map(threadState))")
        #expect(g.vif.stats.snapshot[.tapGone] == 1)
    }
}
