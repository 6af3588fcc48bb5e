import CXen

/// The request/response pair a shared ring carries: the Swift side of ring.h's
/// `DEFINE_RING_TYPES(name, req_t, rsp_t)`.
///
/// Entries are plain C structs imported from libxen-dev; a slot is the union of
/// the two, exactly as `union name_sring_entry` lays it out.
///
/// Both entry types must be `BitwiseCopyable`. That is required by
/// ``SharedRing``, ``FrontRing`` and ``BackRing`` in their `where` clauses, not
/// here: Swift 6.3 cannot deserialize an associated-type conformance of an
/// imported C struct to `BitwiseCopyable` ("Conformance of 'blkif_request' to
/// 'BitwiseCopyable' not found in referenced module 'CXen'"), which made
/// `FrontRing<BlkifRing>` unusable from any other module.
public protocol RingProtocol {
    associatedtype Request
    associatedtype Response
    /// A zero value, used as the destination of the single copy out of a slot.
    static var zeroRequest: Request { get }
    static var zeroResponse: Response { get }
    /// Writes `response` over the whole slot (`slotStride` bytes) at `slot`.
    ///
    /// Swift leaves a value's padding bytes undefined, so copying a response
    /// with interior padding would hand stale process memory to the peer
    /// (XSA-216). The default copies the value's bytes and zeroes the rest of
    /// the slot, which is right only for a padding-free response; a protocol
    /// whose response has padding writes it member by member into a zeroed slot.
    static func storeResponse(_ response: Response, into slot: UnsafeMutableRawPointer)
}

extension RingProtocol {
    /// `sizeof(union name_sring_entry)`: the larger member, rounded up to the
    /// stricter alignment, as C sizes a union.
    @inlinable
    public static var slotStride: Int {
        let size = Swift.max(MemoryLayout<Request>.size, MemoryLayout<Response>.size)
        let align = Swift.max(MemoryLayout<Request>.alignment, MemoryLayout<Response>.alignment)
        return (size + align - 1) / align * align
    }

    /// Copies the response's bytes and zeroes the rest of the slot: for
    /// responses without interior padding (netif_tx_response, netif_rx_response).
    @inlinable
    public static func storeResponse(_ response: Response, into slot: UnsafeMutableRawPointer) {
        withUnsafeBytes(of: response) { src in
            slot.copyMemory(from: src.baseAddress!, byteCount: src.count)
            (slot + src.count).initializeMemory(as: UInt8.self, repeating: 0, count: slotStride - src.count)
        }
    }

    /// `__CONST_RING_SIZE(name, pages * PAGE_SIZE)`: how many slots fit after the
    /// 64-byte header, rounded down to a power of two.
    @inlinable
    public static func entries(pages: Int) -> UInt32 {
        let fit = (pages * RingLayout.pageSize - RingLayout.headerSize) / slotStride
        precondition(fit > 0, "ring too small for one entry")
        return UInt32(1) << (UInt32(Int.bitWidth - 1 - fit.leadingZeroBitCount))
    }
}

/// Layout constants shared by every ring (ring.h's `struct name_sring` header).
public enum RingLayout {
    public static let pageSize = 4096
    /// req_prod, req_event, rsp_prod, rsp_event, pvt[4], pad[44].
    public static let headerSize = 64
    /// Multi-page rings go up to order 4 (16 pages), as blkback's max-ring-page-order.
    public static let maxOrder = 4
    public static let maxPages = 1 << maxOrder

    public static let reqProdOffset = 0
    public static let reqEventOffset = 4
    public static let rspProdOffset = 8
    public static let rspEventOffset = 12
}

/// blkif.h's ring: `blkif_request` (112 bytes) / `blkif_response` (16 bytes).
public enum BlkifRing: RingProtocol {
    public typealias Request = blkif_request
    public typealias Response = blkif_response
    public static var zeroRequest: blkif_request { blkif_request() }
    public static var zeroResponse: blkif_response { blkif_response() }

    /// blkif_response has padding (byte 9 and bytes 12..<16): zero the slot,
    /// then store the members, as Linux blkback does since XSA-216.
    @inlinable
    public static func storeResponse(_ response: blkif_response, into slot: UnsafeMutableRawPointer) {
        typealias R = blkif_response
        slot.initializeMemory(as: UInt8.self, repeating: 0, count: slotStride)
        slot.storeBytes(of: response.id, toByteOffset: MemoryLayout<R>.offset(of: \.id)!, as: UInt64.self)
        slot.storeBytes(of: response.operation, toByteOffset: MemoryLayout<R>.offset(of: \.operation)!, as: UInt8.self)
        slot.storeBytes(of: response.status, toByteOffset: MemoryLayout<R>.offset(of: \.status)!, as: Int16.self)
    }
}

/// netif.h's transmit ring: `netif_tx_request` / `netif_tx_response`.
public enum NetifTxRing: RingProtocol {
    public typealias Request = netif_tx_request
    public typealias Response = netif_tx_response
    public static var zeroRequest: netif_tx_request { netif_tx_request() }
    public static var zeroResponse: netif_tx_response { netif_tx_response() }
}

/// netif.h's receive ring: `netif_rx_request` / `netif_rx_response`.
public enum NetifRxRing: RingProtocol {
    public typealias Request = netif_rx_request
    public typealias Response = netif_rx_response
    public static var zeroRequest: netif_rx_request { netif_rx_request() }
    public static var zeroResponse: netif_rx_response { netif_rx_response() }
}

/// A protocol violation seen on a ring. The ring that reports one is stopped
/// by its owner; it is never looped on.
public enum RingError: Error, Equatable, CustomStringConvertible {
    /// `req_prod - rsp_prod_pvt > size`: the frontend published more requests
    /// than there can be (Linux blkback: "bogus ring requests"); also reported
    /// for a `req_prod` that moved back behind `req_cons`.
    case requestProducerOverflow(reqProd: UInt32, rspProdPvt: UInt32, size: UInt32)
    /// `rsp_prod - rsp_cons > size`: the backend published more responses than
    /// requests were outstanding.
    case responseProducerOverflow(rspProd: UInt32, rspCons: UInt32, size: UInt32)

    public var description: String {
        switch self {
        case let .requestProducerOverflow(p, r, s):
            return "bogus ring requests: req_prod \(p) is \(p &- r) past rsp_prod_pvt \(r), ring holds \(s)"
        case let .responseProducerOverflow(p, c, s):
            return "bogus ring responses: rsp_prod \(p) is \(p &- c) past rsp_cons \(c), ring holds \(s)"
        }
    }
}
