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

    // Output: bytes not yet delivered, with the end offset of every queued message so
    // the number of undelivered messages (outstanding replies + events) is known.
    var out: [UInt8] = []
    var outHead = 0
    var msgEnds: [Int] = []
    var msgEndsHead = 0
    /// Monotonic time (seconds) when the oldest undelivered watch event was queued.
    var oldestEvent: Double? = nil
    /// Set when the transport gave up on this connection.
    public internal(set) var closed = false
    var closeReason: String? = nil
    /// Set by the core when output was queued outside the transport's own processing.
    var dirty = false

    init(serial: Int, domid: DomID, privileged: Bool, quotas: XSQuotas) {
        self.serial = serial; self.domid = domid; self.privileged = privileged; self.quotas = quotas
    }

    var caller: XSCaller { XSCaller(domid: domid, privileged: privileged, target: target, quotas: quotas) }

    public var pendingBytes: Int { out.count - outHead }
    public var pendingMessages: Int { msgEnds.count - msgEndsHead }

    @inline(__always)
    func enqueue(_ type: XSType, reqID: UInt32, txID: UInt32, _ body: UnsafeRawBufferPointer) {
        XSHeader(type, reqID: reqID, txID: txID, len: UInt32(body.count))
            .append(to: &out)
        out.append(contentsOf: body)
        msgEnds.append(out.count)
    }

    @inline(__always)
    func enqueue(_ type: XSType, reqID: UInt32, txID: UInt32, _ body: [UInt8]) {
        body.withUnsafeBytes { enqueue(type, reqID: reqID, txID: txID, $0) }
    }

    @inline(__always)
    func enqueueOK(_ type: XSType, reqID: UInt32, txID: UInt32) {
        XSHeader(type, reqID: reqID, txID: txID, len: 3).append(to: &out)
        out.append(UInt8(ascii: "O")); out.append(UInt8(ascii: "K")); out.append(0)
        msgEnds.append(out.count)
    }

    /// Marks `n` bytes as delivered by the transport.
    func consumed(_ n: Int) {
        outHead += n
        // A reader that makes progress is not stalled: restart the event clock.
        if n > 0 && oldestEvent != nil { oldestEvent = monotonicSeconds() }
        while msgEndsHead < msgEnds.count && msgEnds[msgEndsHead] <= outHead { msgEndsHead += 1 }
        if outHead == out.count {
            out.removeAll(keepingCapacity: out.capacity <= 65536)
            outHead = 0
            msgEnds.removeAll(keepingCapacity: msgEnds.capacity <= 4096)
            msgEndsHead = 0
            oldestEvent = nil
        } else if outHead > 65536 && outHead * 2 > out.count {
            out.removeSubrange(0..<outHead)
            for i in msgEndsHead..<msgEnds.count { msgEnds[i] -= outHead }
            msgEnds.removeSubrange(0..<msgEndsHead)
            msgEndsHead = 0
            outHead = 0
        }
    }

    /// Unsent output, for the transport to write.
    func withPending<R>(_ body: (UnsafeRawBufferPointer) -> R) -> R {
        out.withUnsafeBytes { body(UnsafeRawBufferPointer(rebasing: $0[outHead...])) }
    }
}

@inline(__always)
func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}
