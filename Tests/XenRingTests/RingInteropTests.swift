import CXen
import CXenTestSupport
import Testing
@testable import XenRing

/// XenRing against ring.h's own macros (CXenTestSupport/peer.c) on the same
/// shared memory.
@Suite struct RingInterop {
    static let combinations: [(front: Impl, back: Impl)] = [(.c, .swift), (.swift, .c), (.swift, .swift)]

    @Test("init: FrontRing(initializing:) writes XEN_FRONT_RING_INIT's header; sizes equal nr_ents",
          arguments: 0...RingLayout.maxOrder)
    func initMatchesC(order: Int) {
        let pages = 1 << order
        let c = RingMemory(pages: pages), swift = RingMemory(pages: pages)
        var cFront = blkif_front_ring(), cBack = blkif_back_ring()
        cxts_blk_front_init(&cFront, c.base, c.bytes)
        cxts_blk_back_init(&cBack, c.base, c.bytes)
        let front = FrontRing<BlkifRing>(initializing: swift.shared())
        let back = BackRing<BlkifRing>(attaching: swift.shared())
        #expect(Array(UnsafeRawBufferPointer(start: swift.base, count: c.bytes))
                == Array(UnsafeRawBufferPointer(start: c.base, count: c.bytes)))
        #expect(front.size == cFront.nr_ents && back.size == cBack.nr_ents)
        #expect(front.freeRequests == cxts_blk_front_free(&cFront))
    }

    @Test("notify and final-check results follow ring.h step by step", arguments: combinations)
    func scriptedNotifications(front frontImpl: Impl, back backImpl: Impl) throws {
        let memory = RingMemory(pages: 1)
        let front = frontImpl.front(memory)
        let back = backImpl.back(memory)
        var nextID: UInt64 = 0
        func queue(_ n: Int) {
            for _ in 0..<n { #expect(front.queue(RequestSpec(id: nextID))); nextID += 1 }
        }
        func take(_ n: Int) throws -> [blkif_request] {
            try (0..<n).map { _ in try #require(try back.take()) }
        }
        func header() -> [UInt32] { let h = memory.header; return [h.reqProd, h.reqEvent, h.rspProd, h.rspEvent] }

        #expect(header() == [0, 1, 0, 1])
        queue(1)
        #expect(front.push() == true, "req_event 1: the first request notifies")
        queue(1)
        #expect(front.push() == false, "req_event still 1: the back end is awake")
        var requests = try take(2)
        let none = try back.take()
        #expect(none == nil)
        #expect(try back.finalCheck() == false)
        #expect(header() == [2, 3, 0, 1], "final check re-arms req_event = req_cons + 1")
        queue(3)
        #expect(front.push() == true, "req_prod 2 -> 5 passes req_event 3")
        queue(1)
        #expect(front.push() == false)
        #expect(try back.finalCheck() == true, "work pending: req_event left alone")
        #expect(header() == [6, 3, 0, 1])
        requests += try take(4)
        #expect(requests.map(\.id) == Array(0..<6))

        back.respond(RequestSpec(id: 0).response)
        #expect(back.push() == true, "rsp_event 1: the first response notifies")
        back.respond(RequestSpec(id: 1).response)
        #expect(back.push() == false)
        let first = try front.take(), second = try front.take()
        #expect(first?.id == 0 && second?.id == 1)
        #expect(try front.finalCheck() == false)
        #expect(header() == [6, 3, 2, 3], "rsp_event = rsp_cons + 1; req_event untouched")
        for id: UInt64 in 2..<6 { back.respond(RequestSpec(id: id).response) }
        #expect(back.push() == true, "rsp_prod 2 -> 6 passes rsp_event 3")
        #expect(try front.finalCheck() == true)
        #expect(try front.unconsumed() == 4)
        #expect(front.freeRequests == 28)
        #expect(try back.finalCheck() == false)
        #expect(header() == [6, 7, 6, 3])
    }

    @Test("random conversations: every observation equals ring.h's (C/C) run",
          arguments: 0...RingLayout.maxOrder, [0, 0x7FFF_FFFE, UInt32.max - 40, UInt32.max])
    func randomConversations(order: Int, start: UInt32) throws {
        let pages = 1 << order
        let size = BlkifRing.entries(pages: pages)
        // Enough steps to go round the ring several times and, for the
        // near-UInt32.max starts, to wrap the indices through zero.
        let steps = 700 + Int(size) * 6
        let seed = UInt64(order) << 32 | UInt64(start)
        let reference = try converse(front: .c, back: .c, pages: pages, start: start, seed: seed, steps: steps)
        for events in ["push requests notify true", "push requests notify false",
                       "push responses notify true", "push responses notify false",
                       "back final check true", "back final check false",
                       "front final check true", "front final check false", "-> false"] {
            #expect(reference.contains { $0.hasSuffix(events) || $0.contains(events + " ") },
                    "the run never saw \(events)")
        }
        let last = try #require(reference.last(where: { $0.contains("header") }))
        if start >= UInt32.max - 40 {
            let reqProd = try #require(UInt32(last.split(separator: " ")[2]))
            #expect(reqProd < start, "indices wrapped through zero (\(last))")
        }
        for (front, back) in Self.combinations {
            let trace = try converse(front: front, back: back, pages: pages, start: start, seed: seed, steps: steps)
            let diverged = zip(trace, reference).enumerated().first { $0.element.0 != $0.element.1 }?.offset
            #expect(diverged == nil && trace.count == reference.count,
                    "\(front) front / \(back) back diverges from C/C at \(diverged.map { "\(trace[$0]) vs \(reference[$0])" } ?? "the end")")
        }
    }

    @Test("index wrap: C front attached at UInt32.max - 2, Swift back, and the reverse")
    func wrapAroundExplicit() throws {
        let start = UInt32.max - 2
        for (frontImpl, backImpl) in [(Impl.c, Impl.swift), (.swift, .c)] {
            let memory = RingMemory(pages: 1)
            cxts_blk_sring_init_at(memory.base, start)
            let front = frontImpl.front(memory, start: start)
            let back = backImpl.back(memory, start: start)
            for id: UInt64 in 0..<6 { #expect(front.queue(RequestSpec(id: id))) }
            #expect(front.push())
            #expect(memory.header.reqProd == 3, "req_prod wrapped: max - 2 + 6")
            #expect(try back.unconsumed() == 6)
            // Slot of index max is the ring's last, index 0 is slot 0.
            #expect(memory.blkifSlot(UInt32.max, size: 32).load(fromByteOffset: 8, as: UInt64.self) == 2)
            #expect(memory.blkifSlot(0, size: 32).load(fromByteOffset: 8, as: UInt64.self) == 3)
            for id: UInt64 in 0..<6 {
                let request = try #require(try back.take())
                #expect(RequestSpec(id: id).matches(request))
                back.respond(RequestSpec(id: id).response)
            }
            #expect(back.push())
            #expect(memory.header.rspProd == 3)
            for id: UInt64 in 0..<6 {
                let response = try front.take()
                #expect(response?.id == id)
            }
            #expect(front.freeRequests == 32)
        }
    }

    @Test("BackRing zeroes the 96 bytes after a 16-byte response, and its padding, in a dirty slot")
    func responsePaddingZeroed() throws {
        let memory = RingMemory(pages: 1)
        var cFront = blkif_front_ring()
        cxts_blk_front_init(&cFront, memory.base, memory.bytes)
        var back = BackRing<BlkifRing>(attaching: memory.shared())
        for id: UInt64 in 0..<3 { #expect(cxts_blk_front_queue(&cFront, id, 1, id, 1) == 1) }
        _ = cxts_blk_front_push(&cFront)

        // Response 0: an ordinary value, into the slot that still holds request 0
        // (whose unused segments are the page's 0xA5 dirt).
        _ = try #require(try back.nextRequest())
        back.enqueue(blkif_response(id: 0x1122_3344_5566_7788, operation: 1, status: -1))
        // Response 1: the slot scribbled over, and a value whose padding bytes
        // are dirty too. Swift does not define a value's padding, so the ring
        // must not copy it to the peer (XSA-216).
        _ = try #require(try back.nextRequest())
        memory.blkifSlot(1, size: 32).initializeMemory(as: UInt8.self, repeating: 0xA5)
        var dirty = [UInt8](repeating: 0xA5, count: 16).withUnsafeBytes { $0.load(as: blkif_response.self) }
        dirty.id = 7; dirty.operation = 0; dirty.status = 0
        back.enqueue(dirty)

        for (index, id, op, status) in [(UInt32(0), UInt64(0x1122_3344_5566_7788), UInt8(1), Int16(-1)),
                                        (1, 7, 0, 0)] {
            let slot = memory.blkifSlot(index, size: 32)
            #expect(slot.load(fromByteOffset: 0, as: UInt64.self) == id)
            #expect(slot.load(fromByteOffset: 8, as: UInt8.self) == op)
            #expect(slot.load(fromByteOffset: 10, as: Int16.self) == status)
            let padding = [9, 12, 13, 14, 15].map { slot[$0] }
            #expect(padding == [0, 0, 0, 0, 0], "padding inside blkif_response, slot \(index)")
            #expect(slot[16...].allSatisfy { $0 == 0 }, "bytes 16..<112 of slot \(index)")
        }
        back.pushResponses()
        var rsp = blkif_response()
        var took = cxts_blk_front_take(&cFront, &rsp)
        #expect(took == 1 && rsp.id == 0x1122_3344_5566_7788 && rsp.status == -1)
        took = cxts_blk_front_take(&cFront, &rsp)
        #expect(took == 1 && rsp.id == 7 && rsp.status == 0)
    }
}
