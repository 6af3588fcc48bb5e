import CXen

/// The front (request-producing) end of a ring: ring.h's `name_front_ring`
/// and the FRONT_RING_* / RING_* macros that act on it.
public struct FrontRing<P: RingProtocol>: Sendable
where P.Request: BitwiseCopyable, P.Response: BitwiseCopyable {
    public let shared: SharedRing<P>
    /// `req_prod_pvt`: requests queued but not yet published.
    @inlinable
    public var reqProdPvt: UInt32 { _reqProdPvt }
    @usableFromInline var _reqProdPvt: UInt32
    /// `rsp_cons`: next response to consume.
    @inlinable
    public var rspCons: UInt32 { _rspCons }
    @usableFromInline var _rspCons: UInt32

    /// `XEN_FRONT_RING_INIT`: initialises the shared header and attaches.
    public init(initializing shared: SharedRing<P>) {
        shared.initialize()
        self.init(attaching: shared, at: 0)
    }

    /// `FRONT_RING_ATTACH`: attaches to an existing ring at index `index`.
    public init(attaching shared: SharedRing<P>, at index: UInt32) {
        self.shared = shared
        self._reqProdPvt = index
        self._rspCons = index
    }

    @inlinable
    public var size: UInt32 { shared.size }

    /// `RING_FREE_REQUESTS`.
    @inlinable
    public var freeRequests: UInt32 { size &- (reqProdPvt &- rspCons) }

    /// `RING_FULL`.
    @inlinable
    public var isFull: Bool { freeRequests == 0 }

    /// Queues one request (`*RING_GET_REQUEST(r, req_prod_pvt++) = req`).
    /// Returns false, queuing nothing, when the ring is full.
    @inlinable @discardableResult
    public mutating func enqueue(_ request: P.Request) -> Bool {
        guard !isFull else { return false }
        shared.write(request, at: reqProdPvt)
        _reqProdPvt &+= 1
        return true
    }

    /// `RING_PUSH_REQUESTS`: publishes queued requests (release store).
    @inlinable
    public mutating func pushRequests() {
        shared.setReqProd(reqProdPvt)
    }

    /// `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`: publishes, then reports whether
    /// the back end asked to be notified of a request in the range just pushed.
    @inlinable
    public mutating func pushRequestsAndCheckNotify() -> Bool {
        let old = shared.reqProd
        let new = reqProdPvt
        shared.setReqProd(new)
        cxen_mb()
        return (new &- shared.reqEvent) < (new &- old)
    }

    /// `RING_HAS_UNCONSUMED_RESPONSES`, with the overflow check of
    /// `RING_RESPONSE_PROD_OVERFLOW`: a lying back end is an error, not a loop.
    @inlinable
    public func unconsumedResponses() throws(RingError) -> UInt32 {
        let prod = shared.rspProd
        let n = prod &- rspCons
        guard n <= size else {
            throw .responseProducerOverflow(rspProd: prod, rspCons: rspCons, size: size)
        }
        // Responses can never exceed what we have published as requests.
        guard n <= reqProdPvt &- rspCons else {
            throw .responseProducerOverflow(rspProd: prod, rspCons: rspCons, size: size)
        }
        return n
    }

    /// Takes the next response, copied out of its slot once; nil when none.
    @inlinable
    public mutating func nextResponse() throws(RingError) -> P.Response? {
        guard try unconsumedResponses() > 0 else { return nil }
        let r = shared.copyResponse(at: rspCons)
        _rspCons &+= 1
        return r
    }

    /// `RING_FINAL_CHECK_FOR_RESPONSES`: if nothing is pending, asks for a
    /// notification on the next response and checks once more, so a response
    /// that raced with going to sleep is never lost.
    @inlinable
    public mutating func finalCheckForResponses() throws(RingError) -> Bool {
        if try unconsumedResponses() > 0 { return true }
        shared.setRspEvent(rspCons &+ 1)
        cxen_mb()
        return try unconsumedResponses() > 0
    }
}
