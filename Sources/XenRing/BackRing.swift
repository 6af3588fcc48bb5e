import CXen

/// The back (request-consuming) end of a ring: ring.h's `name_back_ring`
/// with Linux blkback's defensive consumption loop.
///
/// Requests are copied out of their slots once (`RING_COPY_REQUEST`) and only
/// the copy is returned. A producer index that runs more than a ring's worth
/// ahead of our responses is reported as ``RingError/requestProducerOverflow``.
public struct BackRing<P: RingProtocol>: Sendable
where P.Request: BitwiseCopyable, P.Response: BitwiseCopyable {
    public let shared: SharedRing<P>
    /// `rsp_prod_pvt`: responses queued but not yet published.
    @inlinable
    public var rspProdPvt: UInt32 { _rspProdPvt }
    @usableFromInline var _rspProdPvt: UInt32
    /// `req_cons`: next request to consume.
    @inlinable
    public var reqCons: UInt32 { _reqCons }
    @usableFromInline var _reqCons: UInt32

    /// `BACK_RING_INIT` / `BACK_RING_ATTACH`.
    public init(attaching shared: SharedRing<P>, at index: UInt32 = 0) {
        self.shared = shared
        self._rspProdPvt = index
        self._reqCons = index
    }

    @inlinable
    public var size: UInt32 { shared.size }

    /// Reads `req_prod` once (acquire), checks it with
    /// `RING_REQUEST_PROD_OVERFLOW`, and returns how many requests may be
    /// consumed now: `min(req_prod - req_cons, size - (req_cons - rsp_prod_pvt))`,
    /// as `RING_HAS_UNCONSUMED_REQUESTS` computes it.
    ///
    /// Also refused: a `req_prod` behind `req_cons`. ring.h's arithmetic would
    /// then hand out up to a ring's worth of slots already consumed, as if new.
    @inlinable
    public func unconsumedRequests() throws(RingError) -> UInt32 {
        let prod = shared.reqProd
        let ahead = prod &- rspProdPvt
        guard ahead <= size, ahead >= reqCons &- rspProdPvt else {
            throw .requestProducerOverflow(reqProd: prod, rspProdPvt: rspProdPvt, size: size)
        }
        let req = prod &- reqCons
        let room = size &- (reqCons &- rspProdPvt)
        return Swift.min(req, room)
    }

    /// Consumes up to `limit` requests, each copied out once, calling `body`
    /// with the copy. Returns how many were consumed. Throws without consuming
    /// anything if the producer index is bogus.
    @inlinable @discardableResult
    public mutating func consumeRequests(
        limit: UInt32 = .max, _ body: (P.Request) throws -> Void
    ) throws -> UInt32 {
        let n = Swift.min(try unconsumedRequests(), limit)
        var i: UInt32 = 0
        while i < n {
            let r = shared.copyRequest(at: reqCons)
            _reqCons &+= 1
            i += 1
            try body(r)
        }
        return n
    }

    /// Takes the next request, copied out once; nil when none is available.
    @inlinable
    public mutating func nextRequest() throws(RingError) -> P.Request? {
        guard try unconsumedRequests() > 0 else { return nil }
        let r = shared.copyRequest(at: reqCons)
        _reqCons &+= 1
        return r
    }

    /// Queues one response in the next slot (`RING_GET_RESPONSE(r, rsp_prod_pvt++)`),
    /// zeroing its padding and the rest of the slot. A response is only ever written for a
    /// request already consumed, so this cannot overrun the front end.
    @inlinable
    public mutating func enqueue(_ response: P.Response) {
        precondition(rspProdPvt != reqCons, "response without an outstanding request")
        shared.writeResponse(response, at: rspProdPvt)
        _rspProdPvt &+= 1
    }

    /// `RING_PUSH_RESPONSES`.
    @inlinable
    public mutating func pushResponses() {
        shared.setRspProd(rspProdPvt)
    }

    /// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`.
    @inlinable
    public mutating func pushResponsesAndCheckNotify() -> Bool {
        pushResponsesAndCheckNotify(since: shared.rspProd)
    }

    /// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY` over everything published since
    /// `old` (an earlier `rsp_prod`): for a backend that publishes responses
    /// as it goes (``pushResponses()``, no notification) and decides once, at
    /// the end, whether the frontend asked to be woken for any of them.
    @inlinable
    public mutating func pushResponsesAndCheckNotify(since old: UInt32) -> Bool {
        let new = rspProdPvt
        shared.setRspProd(new)
        cxen_mb()
        return (new &- shared.rspEvent) < (new &- old)
    }

    /// `RING_FINAL_CHECK_FOR_REQUESTS`: sets `req_event = req_cons + 1` and
    /// checks again, so a request that raced with going to sleep is not lost.
    @inlinable
    public mutating func finalCheckForRequests() throws(RingError) -> Bool {
        if try unconsumedRequests() > 0 { return true }
        shared.setReqEvent(reqCons &+ 1)
        cxen_mb()
        return try unconsumedRequests() > 0
    }
}
