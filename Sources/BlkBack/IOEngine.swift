import CLibAIO
import XenHV
import CXen
import Glibc

/// A libaio context whose completions are signalled on an eventfd, so the
/// queue's event loop can poll it next to its event channel.
///
/// Owns `capacity` iocbs, one per request slot: a slot's iocb is filled in
/// place (no allocation), queued in the batch, and submitted with the other
/// requests the ring had (``submitChunk`` per `io_submit`). Completions are
/// reaped from the kernel's mapped completion ring after the eventfd fires.
final class IOEngine {
    // Not Sendable: used only by its queue's thread.
    private var context: io_context_t? = nil
    /// The context id, which is the address of its completion ring mapping.
    var contextAddress: UInt? { context.map { UInt(bitPattern: $0) } }
    /// Completion eventfd (`IOCB_FLAG_RESFD`).
    let eventFD: CInt
    let capacity: Int
    private let iocbs: UnsafeMutablePointer<iocb>
    private let batch: UnsafeMutablePointer<UnsafeMutablePointer<iocb>?>
    private(set) var batchCount = 0
    private let events: UnsafeMutablePointer<io_event>
    /// iocbs submitted and not yet reaped.
    private(set) var inFlight = 0
    /// Reap from the mapped completion ring (falls back to io_getevents if its format is unknown).
    private var userReap = true
    /// iocbs per `io_submit`. The kernel plugs a whole io_submit call
    /// (blk_start_plug for more than two iocbs) and dispatches nothing to the
    /// device until every iocb of it went through the file system, so one call
    /// for a ring's 32 requests leaves the device idle meanwhile and adds that
    /// time to every request's latency. Chunks of four still share a plug and
    /// a device kick, yet let the device start early: 4 KiB random reads at
    /// QD32 went from 0.66-0.86 of fio's IOPS to 0.89-1.0 (scripts/bench-blkback).
    static let submitChunk = 4

    init(capacity: Int) throws(BlkBackError) {
        self.capacity = capacity
        let efd = cxen_eventfd(0, Int32(EFD_NONBLOCK) | Int32(EFD_CLOEXEC))
        guard efd >= 0 else { throw .system(call: "eventfd", errno: errno) }
        eventFD = efd
        var ctx: io_context_t? = nil
        let r = io_setup(Int32(capacity), &ctx)
        guard r == 0 else {
            Glibc.close(efd)
            throw .system(call: "io_setup", errno: -r)
        }
        context = ctx
        iocbs = .allocate(capacity: capacity)
        iocbs.initialize(repeating: iocb(), count: capacity)
        batch = .allocate(capacity: capacity)
        batch.initialize(repeating: nil, count: capacity)
        events = .allocate(capacity: capacity)
        events.initialize(repeating: io_event(), count: capacity)
    }

    private var closed = false

    /// Destroys the context and closes the eventfd (after ``drain(_:)``);
    /// the engine serves nothing more.
    func close() {
        guard !closed else { return }
        closed = true
        if let ctx = context { io_destroy(ctx) }
        context = nil
        Glibc.close(eventFD)
    }

    deinit {
        close()
        iocbs.deallocate()
        batch.deallocate()
        events.deallocate()
    }

    /// Queues a vectored read or write for slot `slot` (the slot's number comes
    /// back in its completion). `iov` must stay valid until the completion is
    /// reaped: it points into the slot's own iovec array.
    @inline(__always)
    func queueVector(slot: Int, write: Bool, fd: CInt, iov: UnsafeMutablePointer<iovec>, count: Int,
                     offset: UInt64, dsync: Bool) {
        let cb = iocbs + slot
        clibaio_prep(cb, write ? CLIBAIO_CMD_PWRITEV : CLIBAIO_CMD_PREADV, fd, UnsafeMutableRawPointer(iov),
                     UInt(count), Int64(bitPattern: offset), dsync ? CLIBAIO_RWF_DSYNC : 0, eventFD, UInt64(slot))
        batch[batchCount] = cb
        batchCount += 1
    }

    /// Fails the first `count` queued iocbs as an `io_submit` refusing them
    /// would (tests: the kernel refuses an iocb only for reasons a test cannot
    /// arrange, such as a security module's veto or a file without
    /// read_iter). Returns how many it failed.
    func refuseQueued(_ count: Int, errno: Int32, _ refused: (_ slot: Int, _ errno: Int32) -> Void) -> Int {
        let n = Swift.min(count, batchCount)
        for i in 0..<n { refused(Int(UInt(bitPattern: batch[i]!.pointee.data)), errno) }
        for i in n..<batchCount { batch[i - n] = batch[i] }
        batchCount -= n
        return n
    }

    /// Submits everything queued, in `io_submit` calls of ``submitChunk`` iocbs
    /// (looping also if the kernel took part of one). Returns the slots the kernel refused and the
    /// errno, so their requests can be answered with an error.
    @inline(__always)
    func submit(refused: (_ slot: Int, _ errno: Int32) -> Void, completed: (_ slot: Int, _ result: Int) -> Void) {
        guard let ctx = context else { return }
        var done = 0
        while done < batchCount {
            let r = io_submit(ctx, Swift.min(batchCount - done, Self.submitChunk), batch + done)
            if r > 0 {
                done += Int(r)
                inFlight += Int(r)
                continue
            }
            if r == -EINTR { continue }
            if r == -EAGAIN && inFlight > 0 {
                // The context's request slots are all taken until completions
                // are reaped (the kernel refills them from the ring's head).
                reapReady(minimum: 1, completed)
                continue
            }
            // The first iocb of the remainder was refused (e.g. EINVAL for an
            // O_DIRECT misalignment we did not predict): fail it, go on.
            let cb = batch[done]!
            refused(Int(UInt(bitPattern: cb.pointee.data)), r == 0 ? EIO : -r)
            done += 1
        }
        batchCount = 0
    }

    /// Reads the eventfd and reaps every completion that is ready, without
    /// blocking, calling `body(slot, result)` (result: bytes or -errno).
    @inline(__always)
    func reap(_ body: (_ slot: Int, _ result: Int) -> Void) {
        var counter: UInt64 = 0
        _ = read(eventFD, &counter, 8)
        reapReady(minimum: 0, body)
    }

    /// Whether the kernel's completion ring holds a completion (no syscall).
    @inline(__always) var hasCompletions: Bool {
        guard inFlight > 0, let ctx = context else { return false }
        return clibaio_ready(ctx) != 0
    }

    /// Waits for every in-flight iocb (detach: nothing may still point into
    /// guest pages when they are unmapped).
    func drain(_ body: (_ slot: Int, _ result: Int) -> Void) {
        while inFlight > 0 { reapReady(minimum: 1, body) }
        var counter: UInt64 = 0
        _ = read(eventFD, &counter, 8)
    }

    private func reapReady(minimum: Int, _ body: (_ slot: Int, _ result: Int) -> Void) {
        guard let ctx = context else { return }
        while inFlight > 0 {
            var n: Int32
            if minimum == 0, userReap {
                // Straight from the kernel's completion ring: no syscall.
                n = clibaio_user_reap(ctx, events, Int32(capacity))
                if n < 0 { userReap = false; continue }
            } else {
                var zero = timespec(tv_sec: 0, tv_nsec: 0)
                n = minimum > 0
                    ? io_getevents(ctx, minimum, capacity, events, nil)
                    : io_getevents(ctx, 0, capacity, events, &zero)
            }
            if n == -EINTR { continue }
            guard n > 0 else { return }
            inFlight -= Int(n)
            for i in 0..<Int(n) {
                let e = events + i
                body(Int(clibaio_event_data(e)), clibaio_event_res(e))
            }
            if minimum > 0 || Int(n) < capacity { return }
        }
    }
}

/// Errors of the backend itself (not of a guest request).
public enum BlkBackError: Error, CustomStringConvertible, Sendable {
    case system(call: String, errno: Int32)
    case grantMap(GrantRef, Int16)
    case badConfiguration(String)
    case notConnected
    /// The queues of the frontend's previous connection still finish their I/O.
    case pendingIO

    public var description: String {
        switch self {
        case let .system(call, e): return "\(call): \(String(cString: strerror(e))) (errno \(e))"
        case let .grantMap(ref, st): return "mapping grant \(ref) failed with status \(st)"
        case let .badConfiguration(s): return "bad configuration: \(s)"
        case .notConnected: return "device is not connected"
        case .pendingIO: return "pending I/O of the previous connection"
        }
    }
}
