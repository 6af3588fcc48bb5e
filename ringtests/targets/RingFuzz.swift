import CXen
import Glibc
import XenRing

/// Ring pages with an inaccessible guard page on each side: a slot access
/// outside the ring faults at once instead of reading a neighbour.
final class GuardedPages {
    let base: UnsafeMutableRawPointer
    let pages: Int
    private let mapping: UnsafeMutableRawPointer

    init(pages: Int) {
        self.pages = pages
        let total = (pages + 2) * 4096
        mapping = mmap(nil, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        base = mapping + 4096
        mprotect(base, pages * 4096, PROT_READ | PROT_WRITE)
    }
    deinit { munmap(mapping, (pages + 2) * 4096) }
}

/// One shared ring per order, reused across runs (as libFuzzer runs millions).
nonisolated(unsafe) private var ringMemory: [GuardedPages] = (0...RingLayout.maxOrder).map { GuardedPages(pages: 1 << $0) }

func fuzzRingConsumer(_ data: UnsafeRawBufferPointer) {
    var input = FuzzInput(data)
    let order = Int(input.u8() % UInt8(RingLayout.maxOrder + 1))
    let mem = ringMemory[order]
    let pages = 1 << order
    mem.base.initializeMemory(as: UInt8.self, repeating: 0, count: pages * 4096)
    let start = input.u32()
    let ring = SharedRing<BlkifRing>(attachingTo: mem.base, pages: pages)
    var back = BackRing(attaching: ring, at: start)
    // Header and slots as the guest wrote them.
    input.fill(mem.base, min(pages * 4096, 64 + Int(input.u8()) * 112))
    var answered: UInt32 = 0
    for _ in 0..<8 {
        // The guest rewrites its producer index between our passes.
        let prodWord = mem.base.assumingMemoryBound(to: UInt32.self)
        if input.u8() & 1 == 1 { prodWord.pointee = input.u32() }
        guard let n = try? back.unconsumedRequests() else { continue }
        precondition(n <= ring.size, "consumer offered \(n) requests on a \(ring.size)-slot ring")
        precondition(back.reqCons &- back.rspProdPvt <= ring.size, "consumed past the ring")
        var got: UInt32 = 0
        while let req = try? back.nextRequest() {
            got += 1
            var rsp = blkif_response()
            rsp.id = req.id
            rsp.operation = req.operation
            rsp.status = Int16(BLKIF_RSP_ERROR)
            back.enqueue(rsp)
            answered += 1
            precondition(got <= ring.size, "looped past the ring size")
        }
        _ = back.pushResponsesAndCheckNotify()
        _ = try? back.finalCheckForRequests()
    }
    precondition(back.rspProdPvt &- start == answered, "responses out of step with requests")
}

func fuzzRingProducer(_ data: UnsafeRawBufferPointer) {
    var input = FuzzInput(data)
    let order = Int(input.u8() % UInt8(RingLayout.maxOrder + 1))
    let mem = ringMemory[order]
    let pages = 1 << order
    mem.base.initializeMemory(as: UInt8.self, repeating: 0, count: pages * 4096)
    let ring = SharedRing<BlkifRing>(attachingTo: mem.base, pages: pages)
    var front = FrontRing(attaching: ring, at: input.u32())
    let queued = Int(input.u8())
    for i in 0..<queued {
        var r = blkif_request()
        r.id = UInt64(i)
        guard front.enqueue(r) else { break }
    }
    _ = front.pushRequestsAndCheckNotify()
    var received = 0
    for _ in 0..<8 {
        // The back end publishes whatever rsp_prod it likes, and scribbles slots.
        (mem.base + 8).assumingMemoryBound(to: UInt32.self).pointee = input.u32()
        input.fill(mem.base + 64, Int(input.u8()) * 16)
        while let _ = try? front.nextResponse() {
            received += 1
            precondition(received <= queued, "took more responses than requests were sent")
        }
        _ = try? front.finalCheckForResponses()
    }
}
