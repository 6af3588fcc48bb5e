import CXen
import CXenTestSupport
import Glibc
import Testing
import XenRing

/// Two threads on one ring, synchronised only by the ring protocol and
/// eventfd kicks standing in for event channels.
@Suite struct RingThreads {
    @Test("1,000,000 requests: C front-end thread (ring.h macros) -> Swift BackRing, every id in order, every kick consumed")
    func millionRequests() throws {
        let count: UInt64 = 1_000_000
        let timeoutMS: Int32 = 20_000  // a lost wakeup shows as a timeout, not a hang
        let memory = RingMemory(pages: 1)
        let kickBack = cxts_kick_fd(), kickFront = cxts_kick_fd()
        try #require(kickBack >= 0 && kickFront >= 0)
        defer { close(kickBack); close(kickFront) }

        let pump = UnsafeMutablePointer<cxts_blk_pump>.allocate(capacity: 1)
        defer { pump.deallocate() }
        pump.initialize(to: cxts_blk_pump())
        pump.pointee.sring = memory.base
        pump.pointee.bytes = memory.bytes
        pump.pointee.count = count
        pump.pointee.kick_back = kickBack
        pump.pointee.kick_front = kickFront
        pump.pointee.timeout_ms = timeoutMS
        // XEN_FRONT_RING_INIT happens before this returns, so attaching is safe.
        try #require(cxts_blk_pump_start(pump) == 0)

        var back = BackRing<BlkifRing>(attaching: memory.shared())
        var next: UInt64 = 0, kicksSent: UInt64 = 0, kicksReceived: UInt64 = 0
        var failure: String?
        serve: while next < count {
            while let request = try back.nextRequest() {
                let want = RequestSpec(id: next, operation: UInt8(next % 2), sector: next, segments: UInt8(next % 12))
                guard want.matches(request) else {
                    failure = "request \(next): got \(RequestSpec(request))"
                    break serve
                }
                back.enqueue(want.response)
                next += 1
            }
            if back.pushResponsesAndCheckNotify() {
                #expect(cxts_kick(kickFront) == 0)
                kicksSent += 1
            }
            if next == count { break }
            // RING_FINAL_CHECK_FOR_REQUESTS re-arms req_event; only then may we sleep.
            if try back.finalCheckForRequests() { continue }
            let kicks = cxts_wait_kicks(kickBack, timeoutMS)
            guard kicks > 0 else {
                failure = "no kick for \(timeoutMS) ms after request \(next): lost wakeup"
                break
            }
            kicksReceived += UInt64(kicks)
        }
        try #require(cxts_blk_pump_join(pump) == 0)
        let result = pump.pointee

        #expect(failure == nil, "\(failure ?? "")")
        #expect(next == count)
        #expect(result.error == Int32(CXTS_PUMP_OK), "C front end: error \(result.error) at response \(result.error_index)")
        #expect(result.responses == count)
        // Every kick one side sent was consumed by the other, now or while it waited.
        #expect(kicksReceived + cxts_drain_kicks(kickBack) == result.kicks_sent)
        #expect(result.kicks_received + cxts_drain_kicks(kickFront) == kicksSent)
        #expect(result.kicks_sent > 0 && kicksSent > 0)
        #expect(back.reqCons == UInt32(truncatingIfNeeded: count) && memory.header.rspProd == back.reqCons)
    }
}
