// XenBus transports: the dom0 Unix socket and a guest's xenstore ring page.
import CXen
import Glibc
import Synchronization
import func XenHV.monotonicSeconds
import XenStore

public enum XenBusError: Error, Equatable, Sendable, CustomStringConvertible {
    /// xenstored answered XS_ERROR with this errno name.
    case xs(XSError)
    /// The connection is gone (daemon closed it, or `close()` was called).
    case closed
    /// A system call failed.
    case system(String, Int32)
    /// The daemon sent something that is not a valid reply.
    case protocolViolation(String)
    case timeout

    public var description: String {
        switch self {
        case .xs(let e): return e.rawValue
        case .closed: return "connection closed"
        case .system(let what, let e): return "\(what): \(String(cString: strerror(e)))"
        case .protocolViolation(let s): return "protocol violation: \(s)"
        case .timeout: return "timed out"
        }
    }
}

/// A byte pipe to xenstored. `send` may be called from any thread (serialised by the
/// client); `receive` is called only from the client's reader thread.
public protocol XenBusTransport: AnyObject, Sendable {
    func send(_ bytes: UnsafeRawBufferPointer) throws(XenBusError)
    /// Blocks until at least one byte arrives; returns the count, or throws `.closed`.
    func receive(into buf: UnsafeMutableRawBufferPointer) throws(XenBusError) -> Int
    func close()
}

/// The dom0 transport: libxenstore's socket (XENSTORED_PATH).
public final class XenBusSocketTransport: XenBusTransport, @unchecked Sendable {
    let fd: Int32
    let closedFlag = AtomicFlag()

    /// The socket path libxenstore would use: $XENSTORED_PATH, else
    /// $XEN_RUN_DIR/xenstored/socket, else /run/swiftxen/xenstored/socket.
    public static var defaultPath: String {
        if let p = getenv("XENSTORED_PATH") { return String(cString: p) }
        let run = getenv("XEN_RUN_DIR").map { String(cString: $0) } ?? "/run/swiftxen"
        return run + "/xenstored/socket"
    }

    public init(path: String = XenBusSocketTransport.defaultPath) throws(XenBusError) {
        let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { throw .system("socket", errno) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        guard path.utf8.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            Glibc.close(s); throw .system("socket path", ENAMETOOLONG)
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { b in
            for (i, c) in path.utf8.enumerated() { b[i] = c }
        }
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard r == 0 else { let e = errno; Glibc.close(s); throw .system("connect \(path)", e) }
        fd = s
    }

    public func send(_ bytes: UnsafeRawBufferPointer) throws(XenBusError) {
        var off = 0
        while off < bytes.count {
            let n = Glibc.send(fd, bytes.baseAddress! + off, bytes.count - off, Int32(MSG_NOSIGNAL))
            if n > 0 { off += n; continue }
            if n < 0 && errno == EINTR { continue }
            throw .closed
        }
    }

    public func receive(into buf: UnsafeMutableRawBufferPointer) throws(XenBusError) -> Int {
        while true {
            let n = recv(fd, buf.baseAddress, buf.count, 0)
            if n > 0 { return n }
            if n < 0 && errno == EINTR { continue }
            throw .closed
        }
    }

    /// Shuts the connection down (the reader wakes with `.closed`); the
    /// descriptor itself is closed only when the transport goes away, so its
    /// number cannot be reused while this transport might still use it: a
    /// reader that had not reached recv(2) yet would otherwise read from
    /// whatever connection got the number next (another client's replies).
    public func close() {
        if closedFlag.set() { shutdown(fd, Int32(SHUT_RDWR)) }
    }

    deinit { Glibc.close(fd) }
}

/// A guest's view of its xenstore ring: the shared page, a descriptor that becomes
/// readable when xenstored notifies us (an eventfd), and a way to notify xenstored.
public struct XenBusRingPort: @unchecked Sendable {
    public var page: UnsafeMutableRawPointer
    public var eventFD: Int32
    public var notify: @Sendable () -> Void
    public init(page: UnsafeMutableRawPointer, eventFD: Int32, notify: @escaping @Sendable () -> Void) {
        self.page = page; self.eventFD = eventFD; self.notify = notify
    }
}

/// The guest transport (the frontend half of docs/misc/xenstore-ring.txt): we produce
/// requests and consume responses, checking the daemon's indices like it checks ours.
public final class XenBusRingTransport: XenBusTransport, @unchecked Sendable {
    let port: XenBusRingPort
    let writeLock = Lock()
    let closedFlag = AtomicFlag()
    /// Set while `receive` may touch `port.eventFD`; close() waits for it to clear so
    /// the owner can close the descriptor as soon as close() returns.
    let receiving = Atomic<Bool>(false)
    /// Interrupts a receive blocked in poll(2).
    let wakeFD: Int32
    static let ringSize = UInt32(XENSTORE_RING_SIZE)
    /// How long a full request ring may go unconsumed before a send gives up
    /// (xenstored gone or wedged): the guest's callers then see `.timeout`
    /// instead of hanging, e.g. at exit.
    let stalledSendLimit: Double

    public init(port: XenBusRingPort, stalledSendLimit: Double = 30) {
        self.port = port
        self.stalledSendLimit = stalledSendLimit
        wakeFD = cxen_eventfd(0, O_CLOEXEC | O_NONBLOCK)
    }

    deinit { if wakeFD >= 0 { Glibc.close(wakeFD) } }

    func word(_ kp: KeyPath<xenstore_domain_interface, XENSTORE_RING_IDX>) -> UnsafeMutablePointer<UInt32> {
        // Sound: offsets of the C struct inside the 4096-byte page; accessed atomically.
        (port.page + MemoryLayout<xenstore_domain_interface>.offset(of: kp)!).assumingMemoryBound(to: UInt32.self)
    }

    public func send(_ bytes: UnsafeRawBufferPointer) throws(XenBusError) {
        try writeLock.withLock { () throws(XenBusError) in
            let reqOff = MemoryLayout<xenstore_domain_interface>.offset(of: \.req)!
            var off = 0
            var spins = 0
            var stalledSince = 0.0
            while off < bytes.count {
                if closedFlag.isSet { throw .closed }
                if cxen_load_acquire_u32(word(\.error)) != 0 { throw .closed }  // the daemon gave up on this ring
                let cons = cxen_load_acquire_u32(word(\.req_cons))
                let prod = cxen_load_relaxed_u32(word(\.req_prod))
                let used = prod &- cons
                guard used <= Self.ringSize else { throw .protocolViolation("request ring indices") }
                let space = Int(Self.ringSize - used)
                if space == 0 {
                    // The daemon frees space and notifies; our reader thread consumes that
                    // notification, so poll the index with a short back-off.
                    if spins == 0 { stalledSince = monotonicSeconds() }
                    if monotonicSeconds() - stalledSince > stalledSendLimit { throw .timeout }
                    port.notify()
                    spins += 1
                    usleep(spins < 100 ? 50 : 1000)
                    continue
                }
                spins = 0
                let n = min(space, bytes.count - off)
                var p = prod
                var done = 0
                while done < n {
                    let o = Int(p & (Self.ringSize - 1))
                    let k = min(n - done, Int(Self.ringSize) - o)
                    memcpy(port.page + reqOff + o, bytes.baseAddress! + off + done, k)
                    p &+= UInt32(k); done += k
                }
                cxen_wmb()
                cxen_store_release_u32(word(\.req_prod), p)
                off += n
                port.notify()
            }
        }
    }

    public func receive(into buf: UnsafeMutableRawBufferPointer) throws(XenBusError) -> Int {
        let rspOff = MemoryLayout<xenstore_domain_interface>.offset(of: \.rsp)!
        receiving.store(true, ordering: .sequentiallyConsistent)
        defer { receiving.store(false, ordering: .sequentiallyConsistent) }
        while true {
            if closedFlag.isSet { throw .closed }
            let errWord = cxen_load_acquire_u32(word(\.error))
            let prod = cxen_load_acquire_u32(word(\.rsp_prod))
            let cons = cxen_load_relaxed_u32(word(\.rsp_cons))
            let avail = prod &- cons
            guard avail <= Self.ringSize else { throw .protocolViolation("response ring indices") }
            if avail > 0 {
                cxen_rmb()
                let n = min(Int(avail), buf.count)
                var c = cons
                var done = 0
                while done < n {
                    let o = Int(c & (Self.ringSize - 1))
                    let k = min(n - done, Int(Self.ringSize) - o)
                    cxen_copy_from_shared(buf.baseAddress! + done, port.page + rspOff + o, k)
                    c &+= UInt32(k); done += k
                }
                cxen_mb()
                cxen_store_release_u32(word(\.rsp_cons), c)
                port.notify()
                return n
            }
            if errWord != 0 { throw .closed }  // the daemon gave up on this ring
            var pfds = [pollfd(fd: port.eventFD, events: Int16(POLLIN), revents: 0),
                        pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0)]
            _ = poll(&pfds, 2, 100)
            if closedFlag.isSet { throw .closed }
            // Our port's wake-up set, drained without ever blocking.
            if pfds[0].revents != 0 { _ = cxen_port_drain(port.eventFD) }
        }
    }

    /// Stops the transport. When this returns no thread touches the page or the
    /// event descriptor any more (unless called from the receiving thread itself).
    public func close() {
        guard closedFlag.set() else { return }
        var one: UInt64 = 1
        _ = withUnsafeBytes(of: &one) { write(wakeFD, $0.baseAddress, 8) }
        let deadline = monotonicSeconds() + 5
        while receiving.load(ordering: .sequentiallyConsistent) && monotonicSeconds() < deadline {
            usleep(200)
        }
    }
}

// MARK: - small synchronisation helpers

final class Lock: @unchecked Sendable {
    private var m = pthread_mutex_t()
    init() { pthread_mutex_init(&m, nil) }
    deinit { pthread_mutex_destroy(&m) }
    func lock() { pthread_mutex_lock(&m) }
    func unlock() { pthread_mutex_unlock(&m) }
    func withLock<R, E: Error>(_ body: () throws(E) -> R) throws(E) -> R {
        lock(); defer { unlock() }
        return try body()
    }
}

/// A mutex with a condition variable.
final class Condition: @unchecked Sendable {
    private var m = pthread_mutex_t()
    private var c = pthread_cond_t()
    init() {
        pthread_mutex_init(&m, nil)
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(&c, &attr)
        pthread_condattr_destroy(&attr)
    }
    deinit { pthread_cond_destroy(&c); pthread_mutex_destroy(&m) }
    func lock() { pthread_mutex_lock(&m) }
    func unlock() { pthread_mutex_unlock(&m) }
    func broadcast() { pthread_cond_broadcast(&c) }
    /// Waits until `deadline` (CLOCK_MONOTONIC seconds); false on timeout.
    func wait(until deadline: Double?) -> Bool {
        guard let deadline else { pthread_cond_wait(&c, &m); return true }
        var ts = timespec()
        ts.tv_sec = Int(deadline)
        ts.tv_nsec = Int((deadline - Double(Int(deadline))) * 1e9)
        return pthread_cond_timedwait(&c, &m, &ts) == 0
    }
}

final class AtomicFlag: Sendable {
    private let v = Atomic<Bool>(false)
    /// Sets the flag; true if this call set it.
    func set() -> Bool { !v.exchange(true, ordering: .sequentiallyConsistent) }
    var isSet: Bool { v.load(ordering: .sequentiallyConsistent) }
}

