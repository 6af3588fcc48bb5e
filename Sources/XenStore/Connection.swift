// One client of the store: a dom0 socket client or a guest's ring. Identity (domid,
// privilege) is fixed by the transport at creation, never taken from messages.
import Glibc

public final class XSConnection {
    public let serial: Int
    public let domid: DomID
    public let privileged: Bool
    var target: DomID?
    var transactions: [UInt32: XSTransaction] = [:]
    var watches: [XSWatch] = []
    public internal(set) var quotas: XSQuotas

    // Output: bytes not yet delivered, with the extent of every queued message so the
    // number of undelivered messages (outstanding replies + events) is known and
    // watch events not yet started can be dropped.
    struct Queued {
        /// Offsets in `out`; `start < outHead` means the transport has begun sending it.
        var start: Int
        var end: Int
        /// A watch event's body ("path\0token\0"); nil for replies.
        var event: [UInt8]?
        /// Monotonic time after which an undelivered event is dropped (0: never).
        var expires: Double
        /// The guest connection whose request caused this event (counted in
        /// its ``XSConnection/causedEvents``).
        var cause: XSConnection? = nil
    }
    var out: [UInt8] = []
    var outHead = 0
    var queued: [Queued] = []
    var queuedHead = 0
    /// Bodies of queued, not fully delivered watch events, for send_event's
    /// duplicate check.
    var pendingEvents: [[UInt8]: Int] = [:]
    /// Set when the transport gave up on this connection.
    public internal(set) var closed = false
    var closeReason: String? = nil
    /// Set by the core when output was queued outside the transport's own processing.
    var dirty = false

    /// Watch events this guest's requests caused that still wait in a dom0
    /// connection's output (C xenstored charges them to the request that
    /// caused them, and domain_can_read stops reading a domain with too many
    /// outstanding). Dom0's events are never dropped, so without this a guest
    /// writing under the nodes a slow dom0 client watches would grow the
    /// daemon without bound; at ``XSQuotas/maxCausedEvents`` its requests
    /// wait until they drain.
    var causedEvents = 0
    /// For marking this connection to be served again when its caused events drain.
    weak var core: XenStoreCore?

    init(serial: Int, domid: DomID, privileged: Bool, quotas: XSQuotas) {
        self.serial = serial; self.domid = domid; self.privileged = privileged; self.quotas = quotas
    }

    /// Whether the transport may take its next request: replies, and the
    /// watch events its requests caused elsewhere, are not backed up.
    var mayReadRequests: Bool { pendingMessages < quotas.maxOutstanding && causedEvents < quotas.maxCausedEvents }

    var caller: XSCaller { XSCaller(domid: domid, privileged: privileged, target: target, quotas: quotas) }

    public var pendingBytes: Int { out.count - outHead }
    public var pendingMessages: Int { queued.count - queuedHead }

    @inline(__always)
    func enqueue(_ type: XSType, reqID: UInt32, txID: UInt32, _ body: UnsafeRawBufferPointer,
                 event: [UInt8]? = nil, expires: Double = 0, cause: XSConnection? = nil) {
        let start = out.count
        XSHeader(type, reqID: reqID, txID: txID, len: UInt32(body.count))
            .append(to: &out)
        out.append(contentsOf: body)
        queued.append(Queued(start: start, end: out.count, event: event, expires: expires, cause: cause))
    }

    /// Queues a WATCH_EVENT unless (C xenstored's send_event) an identical event is
    /// still pending (`dedupe`; special @ events are not deduplicated). The
    /// output quota is the caller's (it drops before building the event).
    /// Returns whether it was queued.
    func enqueueEvent(_ body: [UInt8], dedupe: Bool, expires: Double, cause: XSConnection? = nil) -> Bool {
        if dedupe && pendingEvents[body] != nil { return false }
        body.withUnsafeBytes { enqueue(.watchEvent, reqID: 0, txID: 0, $0, event: body, expires: expires, cause: cause) }
        pendingEvents[body, default: 0] += 1
        cause?.causedEvents += 1
        return true
    }

    /// A queued message is gone (delivered or dropped).
    func forget(_ q: Queued) {
        if let g = q.cause {
            g.causedEvents -= 1
            if g.causedEvents == g.quotas.maxCausedEvents - 1 { g.core?.markDirty(g) }  // its ring is read again
        }
        guard let body = q.event, let i = pendingEvents.index(forKey: body) else { return }
        if pendingEvents.values[i] > 1 { pendingEvents.values[i] -= 1 } else { pendingEvents.remove(at: i) }
    }

    /// The connection is closed: what it still holds will never be delivered.
    func dropOutput() {
        for i in queuedHead..<queued.count { forget(queued[i]) }
        out = []; outHead = 0
        queued = []; queuedHead = 0
    }

    /// Drops watch events that expired before the transport began sending them (C
    /// xenstored's check_event_timeout). Returns how many were dropped.
    func dropExpiredEvents(now: Double) -> Int {
        var any = false
        for i in queuedHead..<queued.count {
            let q = queued[i]
            if q.expires != 0 && q.expires <= now && q.start >= outHead { any = true; break }
        }
        guard any else { return 0 }
        var dropped = 0
        var newOut: [UInt8] = []
        newOut.reserveCapacity(out.count - outHead)
        var kept: [Queued] = []
        kept.reserveCapacity(queued.count - queuedHead)
        for i in queuedHead..<queued.count {
            let q = queued[i]
            if q.expires != 0 && q.expires <= now && q.start >= outHead {
                forget(q)
                dropped += 1
                continue
            }
            // The message being sent keeps its unsent tail; its start goes negative.
            let from = max(q.start, outHead)
            let start = newOut.count - (from - q.start)
            newOut.append(contentsOf: out[from..<q.end])
            kept.append(Queued(start: start, end: newOut.count, event: q.event, expires: q.expires, cause: q.cause))
        }
        out = newOut
        outHead = 0
        queued = kept
        queuedHead = 0
        return dropped
    }

    @inline(__always)
    func enqueue(_ type: XSType, reqID: UInt32, txID: UInt32, _ body: [UInt8]) {
        body.withUnsafeBytes { enqueue(type, reqID: reqID, txID: txID, $0) }
    }

    @inline(__always)
    func enqueueOK(_ type: XSType, reqID: UInt32, txID: UInt32) {
        withUnsafeBytes(of: (UInt8(ascii: "O"), UInt8(ascii: "K"), UInt8(0))) { enqueue(type, reqID: reqID, txID: txID, $0) }
    }

    /// Marks `n` bytes as delivered by the transport.
    func consumed(_ n: Int) {
        outHead += n
        while queuedHead < queued.count && queued[queuedHead].end <= outHead {
            forget(queued[queuedHead])
            queuedHead += 1
        }
        if outHead == out.count {
            out.removeAll(keepingCapacity: out.capacity <= 65536)
            outHead = 0
            queued.removeAll(keepingCapacity: queued.capacity <= 4096)
            queuedHead = 0
        } else if outHead > 65536 && outHead * 2 > out.count {
            out.removeSubrange(0..<outHead)
            for i in queuedHead..<queued.count { queued[i].start -= outHead; queued[i].end -= outHead }
            queued.removeSubrange(0..<queuedHead)
            queuedHead = 0
            outHead = 0
        }
    }

    /// Unsent output, for the transport to write.
    func withPending<R>(_ body: (UnsafeRawBufferPointer) -> R) -> R {
        out.withUnsafeBytes { body(UnsafeRawBufferPointer(rebasing: $0[outHead...])) }
    }
}

