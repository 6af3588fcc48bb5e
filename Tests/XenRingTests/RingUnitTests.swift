import CXen
import Glibc
import Testing
@testable import XenRing

/// XenRing on its own: a lying or confused peer, the copy-once rule, and the
/// front end's accounting.
@Suite struct RingUnits {
    /// A one-page blkif ring with a Swift front and back end, `published`
    /// requests pushed and `answered` of them consumed, answered and pushed.
    static func ring(published: UInt64 = 0, consumed: UInt64? = nil, answered: UInt64 = 0)
        throws -> (RingMemory, FrontRing<BlkifRing>, BackRing<BlkifRing>) {
        let memory = RingMemory(pages: 1)
        var front = FrontRing<BlkifRing>(initializing: memory.shared())
        var back = BackRing<BlkifRing>(attaching: memory.shared())
        for id in 0..<published { let queued = front.enqueue(RequestSpec(id: id).request); #expect(queued) }
        front.pushRequests()
        for _ in 0..<(consumed ?? answered) { _ = try #require(try back.nextRequest()) }
        for id in 0..<answered { back.enqueue(RequestSpec(id: id).response) }
        back.pushResponses()
        return (memory, front, back)
    }

    // MARK: A lying producer

    @Test("req_prod far beyond the ring: every consumer entry point throws requestProducerOverflow",
          arguments: [33, 1000, 0x8000_0000, UInt32.max] as [UInt32])
    func lyingRequestProducer(reqProd: UInt32) throws {
        var (memory, _, back) = try Self.ring(published: 3)
        memory.setWord(RingLayout.reqProdOffset, reqProd)
        let expected = RingError.requestProducerOverflow(reqProd: reqProd, rspProdPvt: 0, size: 32)
        #expect(throws: expected) { try back.unconsumedRequests() }
        #expect(throws: expected) { try back.nextRequest() }
        var calls = 0
        #expect(throws: expected) { try back.consumeRequests { _ in calls += 1 } }
        #expect(throws: expected) { try back.finalCheckForRequests() }
        #expect(calls == 0 && back.reqCons == 0, "nothing consumed")
        #expect(memory.header.reqEvent == 1, "the final check did not re-arm req_event")
    }

    /// A back end that publishes as it goes and decides on the notification
    /// once must wake a front end that went to sleep on any of those
    /// responses, as one RING_PUSH_RESPONSES_AND_CHECK_NOTIFY over the window.
    @Test("pushResponsesAndCheckNotify(since:) notifies for an rsp_event anywhere in the window")
    func notifyDecidedOnceOverAWindow() throws {
        for asleepAfter in 0...3 {
            var (memory, front, back) = try Self.ring(published: 6, consumed: 6)
            defer { withExtendedLifetime(memory) {} }  // the rings point into it
            let old = back.shared.rspProd
            var notify = false
            for id in 0..<3 as Range<UInt64> {
                if asleepAfter == Int(id) {
                    // The front end takes what is published and goes to sleep (rsp_event = rsp_cons + 1).
                    while try front.nextResponse() != nil {}
                    #expect(try !front.finalCheckForResponses())
                }
                back.enqueue(RequestSpec(id: id).response)
                back.pushResponses()
            }
            if asleepAfter == 3 {
                while try front.nextResponse() != nil {}
                #expect(try !front.finalCheckForResponses())
                notify = back.pushResponsesAndCheckNotify(since: back.shared.rspProd)
                #expect(!notify, "nothing new since it slept")
            } else {
                notify = back.pushResponsesAndCheckNotify(since: old)
                #expect(notify, "asleep after \(asleepAfter) responses: not woken")
            }
        }
    }

    @Test("req_prod exactly a ring ahead is legal; one more is not")
    func overflowBoundary() throws {
        let (memory, _, back) = try Self.ring(published: 10, answered: 10)
        memory.setWord(RingLayout.reqProdOffset, 10 + 32)
        #expect(try back.unconsumedRequests() == 32)
        memory.setWord(RingLayout.reqProdOffset, 10 + 33)
        #expect(throws: RingError.requestProducerOverflow(reqProd: 43, rspProdPvt: 10, size: 32)) {
            try back.unconsumedRequests()
        }
    }

    @Test("a lying req_prod makes BackRing read no slot: the slot pages are PROT_NONE")
    func overflowReadsNoSlot() throws {
        let pages = 16, bytes = pages * RingLayout.pageSize
        let map = try #require(mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0))
        try #require(map != MAP_FAILED)
        defer { munmap(map, bytes) }
        // Indices at 100: the next slot is 64 + 100 * 112 bytes in, on page 2.
        let shared = SharedRing<BlkifRing>(attachingTo: map, pages: pages)
        shared.initialize()
        for offset in [RingLayout.reqProdOffset, RingLayout.rspProdOffset] {
            map.storeBytes(of: 100 + (offset == RingLayout.reqProdOffset ? 100_000 : 0), toByteOffset: offset, as: UInt32.self)
        }
        var back = BackRing<BlkifRing>(attaching: shared, at: 100)
        // Any slot read from here on faults and kills the test run.
        try #require(mprotect(map + RingLayout.pageSize, bytes - RingLayout.pageSize, PROT_NONE) == 0)
        #expect(throws: RingError.self) { try back.nextRequest() }
        #expect(throws: RingError.self) { try back.consumeRequests { _ in Issue.record("body called") } }
        #expect(back.reqCons == 100)
    }

    @Test("req_prod moving backwards below rsp_prod_pvt throws")
    func requestIndexBackwardsPastResponses() throws {
        var (memory, _, back) = try Self.ring(published: 10, answered: 10)
        memory.setWord(RingLayout.reqProdOffset, 5)
        #expect(throws: RingError.requestProducerOverflow(reqProd: 5, rspProdPvt: 10, size: 32)) {
            try back.nextRequest()
        }
        #expect(back.reqCons == 10)
    }

    @Test("req_prod moving backwards behind req_cons throws instead of handing out stale slots")
    func requestIndexBackwardsBehindConsumer() throws {
        // 10 requests consumed, 2 answered; then req_prod drops from 10 to 5.
        var (memory, _, back) = try Self.ring(published: 10, consumed: 10, answered: 2)
        memory.setWord(RingLayout.reqProdOffset, 5)
        var calls = 0
        #expect(throws: RingError.self) { try back.unconsumedRequests() }
        #expect(throws: RingError.self) { try back.consumeRequests { _ in calls += 1 } }
        #expect(throws: RingError.self) { try back.nextRequest() }
        #expect(calls == 0 && back.reqCons == 10)
        // The honest producer index is accepted again.
        memory.setWord(RingLayout.reqProdOffset, 10)
        #expect(try back.unconsumedRequests() == 0)
    }

    @Test("rsp_prod moving backwards behind rsp_cons throws responseProducerOverflow")
    func responseIndexBackwards() throws {
        var (memory, front, _) = try Self.ring(published: 10, answered: 10)
        for id: UInt64 in 0..<10 {
            let response = try front.nextResponse()
            #expect(response?.id == id)
        }
        memory.setWord(RingLayout.rspProdOffset, 4)
        #expect(throws: RingError.responseProducerOverflow(rspProd: 4, rspCons: 10, size: 32)) {
            try front.nextResponse()
        }
        #expect(front.rspCons == 10)
    }

    @Test("a back end publishing more responses than requests: FrontRing throws responseProducerOverflow",
          arguments: [5, 31, 32, 33, 5000] as [UInt32])
    func moreResponsesThanRequests(rspProd: UInt32) throws {
        var (memory, front, _) = try Self.ring(published: 4, consumed: 4)
        memory.setWord(RingLayout.rspProdOffset, rspProd)
        let expected = RingError.responseProducerOverflow(rspProd: rspProd, rspCons: 0, size: 32)
        #expect(throws: expected) { try front.unconsumedResponses() }
        #expect(throws: expected) { try front.nextResponse() }
        #expect(throws: expected) { try front.finalCheckForResponses() }
        #expect(front.rspCons == 0)
        memory.setWord(RingLayout.rspProdOffset, 4)
        #expect(try front.unconsumedResponses() == 4, "4 responses for 4 requests are fine")
    }

    // MARK: Copy once (RING_COPY_REQUEST, XSA-155)

    @Test("nextRequest returns a copy: rewriting the slot afterwards changes nothing")
    func copyOnceNext() throws {
        var (memory, _, back) = try Self.ring(published: 1)
        let request = try #require(try back.nextRequest())
        let slot = memory.blkifSlot(0, size: 32)
        slot.storeBytes(of: 0xDEAD, toByteOffset: 8, as: UInt64.self)      // id
        slot.storeBytes(of: 11, toByteOffset: 1, as: UInt8.self)           // nr_segments
        slot.storeBytes(of: 0xBAD, toByteOffset: 24, as: UInt32.self)      // seg[0].gref
        #expect(RequestSpec(id: 0).matches(request))
        #expect(request.id == 0 && request.nr_segments == 0 && request.seg.0.gref == 0)
    }

    @Test("consumeRequests hands the body a copy: rewriting the slot inside the body changes nothing")
    func copyOnceConsume() throws {
        var (memory, _, back) = try Self.ring(published: 3)
        var seen: [UInt64] = []
        let n = try back.consumeRequests { request in
            let index = UInt32(seen.count)
            memory.blkifSlot(index, size: 32).initializeMemory(as: UInt8.self, repeating: 0xEE)
            #expect(RequestSpec(id: UInt64(index)).matches(request))
            seen.append(request.id)
        }
        #expect(n == 3 && seen == [0, 1, 2])
    }

    @Test("nextResponse returns a copy")
    func copyOnceResponse() throws {
        var (memory, front, _) = try Self.ring(published: 1, answered: 1)
        let response = try #require(try front.nextResponse())
        memory.blkifSlot(0, size: 32).initializeMemory(as: UInt8.self, repeating: 0xEE)
        #expect(response.id == 0 && response.status == -1)
    }

    // MARK: Front-end accounting

    @Test("enqueue returns false when full and writes nothing")
    func enqueueWhenFull() throws {
        var (memory, front, back) = try Self.ring()
        var accepted: [Bool] = []
        func enqueue(_ id: UInt64) { accepted.append(front.enqueue(RequestSpec(id: id).request)) }

        for id: UInt64 in 0..<33 { enqueue(id) }
        #expect(accepted == Array(repeating: true, count: 32) + [false])
        #expect(front.isFull && front.freeRequests == 0 && front.reqProdPvt == 32)
        #expect(memory.blkifSlot(0, size: 32).load(fromByteOffset: 8, as: UInt64.self) == 0, "slot 0 still holds request 0")
        // Pushing frees nothing, nor does a response until the front consumes it.
        front.pushRequests()
        enqueue(99)
        _ = try back.nextRequest()
        back.enqueue(RequestSpec(id: 0).response)
        back.pushResponses()
        enqueue(99)
        #expect(accepted.suffix(2) == [false, false])
        _ = try front.nextResponse()
        #expect(front.freeRequests == 1)
        enqueue(32)
        #expect(accepted.last == true)
        #expect(memory.blkifSlot(32, size: 32).load(fromByteOffset: 8, as: UInt64.self) == 32)
    }

    @Test("freeRequests is RING_FREE_REQUESTS: size - (req_prod_pvt - rsp_cons), across the index wrap",
          arguments: [0, UInt32.max - 3] as [UInt32])
    func freeRequests(start: UInt32) throws {
        let memory = RingMemory(pages: 1)
        let shared: SharedRing<BlkifRing> = memory.shared()
        shared.initialize()
        for offset in [RingLayout.reqProdOffset, RingLayout.rspProdOffset] { memory.setWord(offset, start) }
        var front = FrontRing<BlkifRing>(attaching: shared, at: start)
        var back = BackRing<BlkifRing>(attaching: shared, at: start)
        #expect(front.freeRequests == 32)
        for id: UInt64 in 0..<5 { front.enqueue(RequestSpec(id: id).request) }
        #expect(front.freeRequests == 27, "queued, not yet pushed, still counts")
        front.pushRequests()
        #expect(front.freeRequests == 27)
        var taken: [RequestSpec] = []
        try back.consumeRequests(limit: 3) { taken.append(RequestSpec($0)) }
        for spec in taken { back.enqueue(spec.response) }
        back.pushResponses()
        #expect(front.freeRequests == 27, "responses published but not consumed")
        while try front.nextResponse() != nil {}
        #expect(front.freeRequests == 30 && front.rspCons == start &+ 3)
    }
}
