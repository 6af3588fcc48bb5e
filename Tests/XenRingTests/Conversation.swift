import CXen
import CXenTestSupport
import Testing
@testable import XenRing

/// A random but replayable blkif conversation between a front and a back end
/// on one ring. Every request the back end sees must be exactly the one the
/// front end queued, in order; every response must answer an outstanding
/// request. The returned trace holds everything either side observed (notify
/// and work-to-do booleans, counts, entries, the shared header after each
/// step), so two runs with the same seed can be compared step by step.
func converse(
    front: some BlkFront, back: some BlkBack, memory: RingMemory,
    size: UInt32, seed: UInt64, steps: Int
) throws -> [String] {
    var rng = SplitMix64(state: seed)
    var trace: [String] = []
    var nextID: UInt64 = 1
    var published: [RequestSpec] = []     // queued by the front, not yet seen by the back
    var taken: [RequestSpec] = []         // seen by the back, not yet answered
    var outstanding: [UInt64: RequestSpec] = [:]  // queued, not yet answered to the front

    for step in 0..<steps {
        switch rng.next() % 7 {
        case 0:  // front queues a few requests, or one more than fits
            let fill = rng.next() % 8 == 0
            let attempts = fill ? Int(front.freeRequests) + 1 : Int(rng.next() % 15)
            for _ in 0..<attempts {
                let spec = RequestSpec(id: nextID)
                let free = front.freeRequests
                let queued = front.queue(spec)
                #expect(queued == (free > 0), "queue on free \(free)")
                trace.append("queue \(spec.id) -> \(queued) free \(free)")
                if queued {
                    nextID += 1
                    published.append(spec)
                    outstanding[spec.id] = spec
                }
            }
        case 1:
            trace.append("push requests notify \(front.push())")
        case 2:  // back consumes up to one more than is there
            let available = try back.unconsumed()
            trace.append("back unconsumed \(available)")
            for _ in 0..<Int(rng.next() % UInt64(available + 2)) {
                guard let request = try back.take() else { trace.append("back none"); break }
                let spec = try #require(published.first, "request \(request.id) never queued")
                #expect(spec.matches(request), "got \(RequestSpec(request)), queued \(spec)")
                published.removeFirst()
                taken.append(spec)
                trace.append("back got \(spec.id)")
            }
        case 3:  // back answers some of what it took, in any order, and pushes
            for _ in 0..<Int(rng.next() % UInt64(taken.count + 1)) {
                let spec = taken.remove(at: Int(rng.next() % UInt64(taken.count)))
                back.respond(spec.response)
                trace.append("respond \(spec.id)")
            }
            trace.append("push responses notify \(back.push())")
        case 4:
            trace.append("back final check \(try back.finalCheck())")
        case 5:  // front consumes up to one more response than is there
            let available = try front.unconsumed()
            trace.append("front unconsumed \(available)")
            for _ in 0..<Int(rng.next() % UInt64(available + 2)) {
                guard let response = try front.take() else { trace.append("front none"); break }
                let answered = outstanding.removeValue(forKey: response.id)
                let spec = try #require(answered, "response \(response.id) answers nothing outstanding")
                let want = spec.response
                #expect(response.operation == want.operation && response.status == want.status)
                trace.append("front got \(response.id) status \(response.status)")
            }
        default:
            trace.append("front final check \(try front.finalCheck())")
        }
        let h = memory.header
        trace.append("#\(step) header \(h.reqProd) \(h.reqEvent) \(h.rspProd) \(h.rspEvent) free \(front.freeRequests)")
        #expect(front.freeRequests <= size)
    }
    return trace
}

/// Sets up a ring of `pages` pages whose indices all start at `start`, with
/// the given implementations on each side, and runs a conversation.
func converse(front frontImpl: Impl, back backImpl: Impl, pages: Int, start: UInt32,
              seed: UInt64, steps: Int) throws -> [String] {
    let memory = RingMemory(pages: pages)
    let size = BlkifRing.entries(pages: pages)
    let front: any BlkFront
    if start == 0 {
        front = frontImpl.front(memory)  // XEN_FRONT_RING_INIT / FrontRing(initializing:)
    } else {
        cxts_blk_sring_init_at(memory.base, start)
        front = frontImpl.front(memory, start: start)  // FRONT_RING_ATTACH / init(attaching:at:)
    }
    let back = backImpl.back(memory, start: start)
    return try converse(front: front, back: back, memory: memory, size: size, seed: seed, steps: steps)
}
