import CXen
import CXenTestSupport
@testable import XenRing

/// Page-aligned memory standing in for a granted ring, initially dirty (0xA5)
/// so that a byte nobody wrote is visible as such.
final class RingMemory {
    let base: UnsafeMutableRawPointer
    let pages: Int
    var bytes: Int { pages * RingLayout.pageSize }

    init(pages: Int) {
        self.pages = pages
        base = .allocate(byteCount: pages * RingLayout.pageSize, alignment: RingLayout.pageSize)
        base.initializeMemory(as: UInt8.self, repeating: 0xA5, count: pages * RingLayout.pageSize)
    }
    deinit { base.deallocate() }

    func shared<P: RingProtocol>(_: P.Type = BlkifRing.self) -> SharedRing<P> {
        SharedRing<P>(attachingTo: base, pages: pages)
    }

    /// The four header words, as the peer sees them.
    var header: (reqProd: UInt32, reqEvent: UInt32, rspProd: UInt32, rspEvent: UInt32) {
        (word(0), word(4), word(8), word(12))
    }
    func word(_ offset: Int) -> UInt32 { base.load(fromByteOffset: offset, as: UInt32.self) }
    func setWord(_ offset: Int, _ value: UInt32) { base.storeBytes(of: value, toByteOffset: offset, as: UInt32.self) }

    /// The bytes of blkif slot `index` of a ring of `size` entries.
    func blkifSlot(_ index: UInt32, size: UInt32) -> UnsafeMutableRawBufferPointer {
        let offset = RingLayout.headerSize + Int(index & (size - 1)) * BlkifRing.slotStride
        return UnsafeMutableRawBufferPointer(start: base + offset, count: BlkifRing.slotStride)
    }
}

/// What a test front end asks for; both the C and the Swift front end build
/// the same blkif_request from it (segments per cxts_seg_gref).
struct RequestSpec: Equatable, CustomStringConvertible {
    var id: UInt64
    var operation: UInt8
    var sector: UInt64
    var segments: UInt8

    /// The request the tests derive from an id.
    init(id: UInt64) {
        self.id = id
        operation = UInt8(id % 4)   // READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE
        sector = id &* 0x9E37_79B9_7F4A_7C15
        segments = UInt8(id % 12)   // 0...11
    }

    init(id: UInt64, operation: UInt8, sector: UInt64, segments: UInt8) {
        self.id = id
        self.operation = operation
        self.sector = sector
        self.segments = segments
    }

    init(_ request: blkif_request) {
        id = request.id
        operation = request.operation
        sector = request.sector_number
        segments = request.nr_segments
    }

    var request: blkif_request {
        var r = blkif_request()
        r.operation = operation
        r.nr_segments = segments
        r.id = id
        r.sector_number = sector
        withUnsafeMutableBytes(of: &r.seg) { seg in
            for i in 0..<Int(segments) {
                let s = blkif_request_segment(gref: cxts_seg_gref(id, UInt32(i)), first_sect: UInt8(i % 8), last_sect: 7)
                seg.storeBytes(of: s, toByteOffset: i * MemoryLayout<blkif_request_segment>.stride, as: blkif_request_segment.self)
            }
        }
        return r
    }

    /// The segments of `request` as [gref, first, last] triples.
    static func segments(of request: blkif_request) -> [[UInt32]] {
        withUnsafeBytes(of: request.seg) { seg in
            (0..<min(Int(request.nr_segments), Int(BLKIF_MAX_SEGMENTS_PER_REQUEST))).map {
                let s = seg.load(fromByteOffset: $0 * MemoryLayout<blkif_request_segment>.stride, as: blkif_request_segment.self)
                return [s.gref, UInt32(s.first_sect), UInt32(s.last_sect)]
            }
        }
    }

    /// True if `request` is exactly what this spec describes, segments included.
    func matches(_ request: blkif_request) -> Bool {
        RequestSpec(request) == self && request.handle == 0
            && Self.segments(of: request) == Self.segments(of: self.request)
    }

    /// The answer the tests' back ends give.
    var response: blkif_response {
        blkif_response(id: id, operation: operation, status: Int16(id % 3 == 0 ? BLKIF_RSP_ERROR : BLKIF_RSP_OKAY))
    }

    var description: String { "req(id \(id) op \(operation) sector \(sector) segs \(segments))" }
}

/// A C ring macro refused the ring: RING_*_PROD_OVERFLOW.
struct CRingOverflow: Error {}

/// A blkif front end; implemented by XenRing's FrontRing and by ring.h's macros.
/// Ends are classes so that `#expect(front.push())` can call them.
protocol BlkFront: AnyObject {
    var freeRequests: UInt32 { get }
    func queue(_ spec: RequestSpec) -> Bool
    /// RING_PUSH_REQUESTS_AND_CHECK_NOTIFY.
    func push() -> Bool
    func unconsumed() throws -> UInt32
    func take() throws -> blkif_response?
    /// RING_FINAL_CHECK_FOR_RESPONSES.
    func finalCheck() throws -> Bool
}

/// A blkif back end; implemented by XenRing's BackRing and by ring.h's macros.
protocol BlkBack: AnyObject {
    func unconsumed() throws -> UInt32
    func take() throws -> blkif_request?
    func respond(_ response: blkif_response)
    /// RING_PUSH_RESPONSES_AND_CHECK_NOTIFY.
    func push() -> Bool
    /// RING_FINAL_CHECK_FOR_REQUESTS.
    func finalCheck() throws -> Bool
}

final class SwiftFront: BlkFront {
    var ring: FrontRing<BlkifRing>
    init(_ memory: RingMemory, start: UInt32? = nil) {
        ring = start.map { FrontRing(attaching: memory.shared(), at: $0) } ?? FrontRing(initializing: memory.shared())
    }
    var freeRequests: UInt32 { ring.freeRequests }
    func queue(_ spec: RequestSpec) -> Bool { ring.enqueue(spec.request) }
    func push() -> Bool { ring.pushRequestsAndCheckNotify() }
    func unconsumed() throws -> UInt32 { try ring.unconsumedResponses() }
    func take() throws -> blkif_response? { try ring.nextResponse() }
    func finalCheck() throws -> Bool { try ring.finalCheckForResponses() }
}

final class CFront: BlkFront {
    var ring = blkif_front_ring()
    init(_ memory: RingMemory, start: UInt32? = nil) {
        if let start {
            cxts_blk_front_attach(&ring, memory.base, memory.bytes, start)
        } else {
            cxts_blk_front_init(&ring, memory.base, memory.bytes)
        }
    }
    var freeRequests: UInt32 { withUnsafePointer(to: ring) { cxts_blk_front_free($0) } }
    func queue(_ s: RequestSpec) -> Bool {
        cxts_blk_front_queue(&ring, s.id, s.operation, s.sector, s.segments) != 0
    }
    func push() -> Bool { cxts_blk_front_push(&ring) != 0 }
    func unconsumed() throws -> UInt32 { cxts_blk_front_unconsumed(&ring) }
    func take() throws -> blkif_response? {
        var rsp = blkif_response()
        switch cxts_blk_front_take(&ring, &rsp) {
        case 1: return rsp
        case 0: return nil
        default: throw CRingOverflow()
        }
    }
    func finalCheck() throws -> Bool { cxts_blk_front_final_check(&ring) != 0 }
}

final class SwiftBack: BlkBack {
    var ring: BackRing<BlkifRing>
    init(_ memory: RingMemory, start: UInt32 = 0) {
        ring = BackRing(attaching: memory.shared(), at: start)
    }
    func unconsumed() throws -> UInt32 { try ring.unconsumedRequests() }
    func take() throws -> blkif_request? { try ring.nextRequest() }
    func respond(_ response: blkif_response) { ring.enqueue(response) }
    func push() -> Bool { ring.pushResponsesAndCheckNotify() }
    func finalCheck() throws -> Bool { try ring.finalCheckForRequests() }
}

final class CBack: BlkBack {
    var ring = blkif_back_ring()
    init(_ memory: RingMemory, start: UInt32 = 0) {
        cxts_blk_back_attach(&ring, memory.base, memory.bytes, start)
    }
    func unconsumed() throws -> UInt32 { cxts_blk_back_unconsumed(&ring) }
    func take() throws -> blkif_request? {
        var req = blkif_request()
        switch cxts_blk_back_take(&ring, &req) {
        case 1: return req
        case 0: return nil
        default: throw CRingOverflow()
        }
    }
    func respond(_ r: blkif_response) { cxts_blk_back_respond(&ring, r.id, r.operation, r.status) }
    func push() -> Bool { cxts_blk_back_push(&ring) != 0 }
    func finalCheck() throws -> Bool { cxts_blk_back_final_check(&ring) != 0 }
}

/// Which implementation plays a side of the ring.
enum Impl: String, CaseIterable, Sendable {
    case c = "C", swift = "Swift"

    func front(_ memory: RingMemory, start: UInt32? = nil) -> any BlkFront {
        switch self {
        case .c: CFront(memory, start: start)
        case .swift: SwiftFront(memory, start: start)
        }
    }
    func back(_ memory: RingMemory, start: UInt32 = 0) -> any BlkBack {
        switch self {
        case .c: CBack(memory, start: start)
        case .swift: SwiftBack(memory, start: start)
        }
    }
}

/// SplitMix64: a small deterministic generator, so every run replays the same steps.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
