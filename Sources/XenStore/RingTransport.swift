// The guest transport: the xenstore ring page (struct xenstore_domain_interface, 1 KiB
// request ring + 1 KiB response ring + free-running u32 indices) and an event channel.
// Rules (docs/misc/xenstore-ring.txt): read the peer's index once, check it against
// the ring size, fence, copy out, then parse the private copy. A guest that corrupts
// an index or sends an oversized message loses its connection; nothing else does.
import Glibc
import XenHV
import CXen

enum XSRingLayout {
    static let size = Int(XENSTORE_RING_SIZE)  // 1024
    static let mask = UInt32(XENSTORE_RING_SIZE - 1)
    static let req = MemoryLayout<xenstore_domain_interface>.offset(of: \.req)!
    static let rsp = MemoryLayout<xenstore_domain_interface>.offset(of: \.rsp)!
    static let reqCons = MemoryLayout<xenstore_domain_interface>.offset(of: \.req_cons)!
    static let reqProd = MemoryLayout<xenstore_domain_interface>.offset(of: \.req_prod)!
    static let rspCons = MemoryLayout<xenstore_domain_interface>.offset(of: \.rsp_cons)!
    static let rspProd = MemoryLayout<xenstore_domain_interface>.offset(of: \.rsp_prod)!
    static let serverFeatures = MemoryLayout<xenstore_domain_interface>.offset(of: \.server_features)!
    static let connection = MemoryLayout<xenstore_domain_interface>.offset(of: \.connection)!
    static let error = MemoryLayout<xenstore_domain_interface>.offset(of: \.error)!
}

/// Our end of one guest's ring. Owns private copies of the indices we produce/consume.
final class RingEndpoint {
    let conn: XSConnection
    let port: XenstoreRingPort
    let page: UnsafeMutableRawPointer
    /// Our private request consumer and response producer indices.
    var reqCons: UInt32
    var rspProd: UInt32
    /// Bytes copied out of the request ring not yet parsed (at most one message + 1 KiB).
    var inbuf: [UInt8] = []
    var dead = false
    /// Kicks that moved nothing mute the port for a while (XSA-332).
    var storm = KickStormGuard()
    /// The last `service` stopped at its budget with work possibly left; the daemon
    /// serves the ring again next round without waiting for a kick.
    var moreWork = false
    var queuedBusy = false

    /// Requests processed per `service` call. C xenstored reads one message per
    /// connection per poll round; a small batch keeps that fairness (a guest that
    /// keeps its ring full cannot hold the single daemon thread) at fewer rounds.
    static let messagesPerTurn = 8

    init(conn: XSConnection, port: XenstoreRingPort) {
        self.conn = conn
        self.port = port
        self.page = port.page
        // Start from what the page says (a freshly built guest page has zeros).
        reqCons = cxen_load_acquire_u32(RingEndpoint.u32(port.page, XSRingLayout.reqCons))
        rspProd = cxen_load_acquire_u32(RingEndpoint.u32(port.page, XSRingLayout.rspProd))
        cxen_store_release_u32(RingEndpoint.u32(port.page, XSRingLayout.serverFeatures), UInt32(XENSTORE_SERVER_FEATURE_ERROR))
        cxen_store_release_u32(RingEndpoint.u32(port.page, XSRingLayout.error), UInt32(XENSTORE_ERROR_NONE))
        inbuf.reserveCapacity(XSHeader.size + 4096 + XSRingLayout.size)
    }

    /// C's domain_conn_reset on the page: the four indices zeroed, and a
    /// guest waiting in XENSTORE_RECONNECT switched to XENSTORE_CONNECTED
    /// (returns whether it was, so the caller kicks it once attached).
    static func reset(_ page: UnsafeMutableRawPointer) -> Bool {
        for index in [XSRingLayout.reqCons, XSRingLayout.reqProd, XSRingLayout.rspCons, XSRingLayout.rspProd] {
            cxen_store_release_u32(u32(page, index), 0)
        }
        guard cxen_load_acquire_u32(u32(page, XSRingLayout.connection)) == UInt32(XENSTORE_RECONNECT) else { return false }
        cxen_store_release_u32(u32(page, XSRingLayout.connection), UInt32(XENSTORE_CONNECTED))
        return true
    }

    @inline(__always)
    static func u32(_ page: UnsafeMutableRawPointer, _ off: Int) -> UnsafeMutablePointer<UInt32> {
        // Sound: the offsets come from MemoryLayout of the C struct; the page is 4096 bytes
        // and 4-aligned, and the words are only accessed through the CXen atomics.
        (page + off).assumingMemoryBound(to: UInt32.self)
    }

    enum Outcome { case ok, corrupt(UInt32, String) }

    /// Moves responses out and requests in until neither makes progress or
    /// `messagesPerTurn` requests were processed (then `moreWork` is set). Kicks the
    /// guest once at the end if anything moved.
    func service(_ core: XenStoreCore) -> Outcome {
        var kicked = false
        defer { if kicked && !dead { port.notify() } }
        moreWork = false
        var served = 0
        while !conn.closed {
            var progress = false
            switch flushResponses() {
            case .corrupt(let e, let why): return .corrupt(e, why)
            case .ok(let moved): if moved { progress = true; kicked = true }
            }
            if served >= Self.messagesPerTurn { moreWork = true; break }
            // Backpressure: leave requests on the ring while replies, or the
            // watch events they caused elsewhere, are undelivered.
            if conn.mayReadRequests {
                switch parseInput(core, budget: Self.messagesPerTurn - served) {
                case .corrupt(let e, let why): return .corrupt(e, why)
                case .ok(let processed): if processed > 0 { progress = true; served += processed }
                }
                if !hasCompleteMessage() {
                    switch pullRequests() {
                    case .corrupt(let e, let why): return .corrupt(e, why)
                    case .ok(let moved): if moved { progress = true; kicked = true }
                    }
                }
            }
            if !progress { break }
        }
        return .ok
    }

    enum Step { case ok(Bool), corrupt(UInt32, String) }
    enum Parsed { case ok(Int), corrupt(UInt32, String) }

    func hasCompleteMessage() -> Bool {
        if inbuf.count < XSHeader.size { return false }
        let len = inbuf.withUnsafeBytes { XSHeader(from: $0.baseAddress!).len }
        return inbuf.count >= XSHeader.size + Int(len)
    }

    /// Copies whatever the guest produced into `inbuf` and frees the ring space.
    func pullRequests() -> Step {
        let prod = cxen_load_acquire_u32(Self.u32(page, XSRingLayout.reqProd))  // read once
        let avail = prod &- reqCons
        if avail > UInt32(XSRingLayout.size) {
            return .corrupt(UInt32(XENSTORE_ERROR_RINGIDX), "request producer \(prod) vs consumer \(reqCons)")
        }
        if avail == 0 { return .ok(false) }
        cxen_rmb()  // the data is read after the index
        let src = UnsafeRawPointer(page + XSRingLayout.req)
        var cons = reqCons
        var left = Int(avail)
        while left > 0 {
            let off = Int(cons & XSRingLayout.mask)
            let n = min(left, XSRingLayout.size - off)
            let start = inbuf.count
            inbuf.append(contentsOf: repeatElement(0, count: n))
            inbuf.withUnsafeMutableBytes { b in
                // Sound: copying n <= 1024 - off bytes from inside the 1 KiB request ring.
                cxen_copy_from_shared(b.baseAddress! + start, src + off, n)
            }
            cons &+= UInt32(n)
            left -= n
        }
        reqCons = cons
        cxen_mb()  // finish reading before handing the space back
        cxen_store_release_u32(Self.u32(page, XSRingLayout.reqCons), reqCons)
        return .ok(true)
    }

    /// Parses and processes up to `budget` complete messages from the private copy.
    func parseInput(_ core: XenStoreCore, budget: Int) -> Parsed {
        var processed = 0
        var head = 0
        let maxPayload = conn.quotas.maxPayload
        var result: Parsed? = nil
        inbuf.withUnsafeBytes { b in
            while !conn.closed && processed < budget && conn.mayReadRequests {
                let avail = b.count - head
                if avail < XSHeader.size { break }
                let h = XSHeader(from: b.baseAddress! + head)
                if Int(h.len) > maxPayload {
                    result = .corrupt(UInt32(XENSTORE_ERROR_PROTO), "payload of \(h.len) bytes exceeds \(maxPayload)")
                    return
                }
                let total = XSHeader.size + Int(h.len)
                if avail < total { break }
                core.process(conn, h, UnsafeRawBufferPointer(start: b.baseAddress! + head + XSHeader.size, count: Int(h.len)))
                head += total
                processed += 1
            }
        }
        if let result { return result }
        if head > 0 { inbuf.removeSubrange(0..<head) }
        return .ok(processed)
    }

    /// Copies queued output into the response ring as space allows.
    func flushResponses() -> Step {
        if conn.pendingBytes == 0 { return .ok(false) }
        let cons = cxen_load_acquire_u32(Self.u32(page, XSRingLayout.rspCons))  // read once
        let used = rspProd &- cons
        if used > UInt32(XSRingLayout.size) {
            return .corrupt(UInt32(XENSTORE_ERROR_RINGIDX), "response consumer \(cons) vs producer \(rspProd)")
        }
        let space = XSRingLayout.size - Int(used)
        if space == 0 { return .ok(false) }
        let dst = page + XSRingLayout.rsp
        let moved = conn.withPending { b -> Int in
            let total = min(space, b.count)
            var done = 0
            var prod = rspProd
            while done < total {
                let off = Int(prod & XSRingLayout.mask)
                let n = min(total - done, XSRingLayout.size - off)
                // Sound: n <= 1024 - off bytes into the 1 KiB response ring.
                memcpy(dst + off, b.baseAddress! + done, n)
                prod &+= UInt32(n)
                done += n
            }
            return total
        }
        rspProd &+= UInt32(moved)
        cxen_wmb()  // data before index
        cxen_store_release_u32(Self.u32(page, XSRingLayout.rspProd), rspProd)
        conn.consumed(moved)
        return .ok(moved > 0)
    }

    /// Reports a protocol violation to the guest through the page's error field.
    func markError(_ code: UInt32) {
        cxen_store_release_u32(Self.u32(page, XSRingLayout.error), code)
    }
}
