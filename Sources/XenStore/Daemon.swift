// The daemon's event loop: one thread, one poll(2) set over the listening socket, every
// client socket, every guest ring's event descriptor and a wake-up eventfd for
// requests from other threads (the hypervisor reporting a domain's death).
import CXen
import Glibc
import Logging
import Synchronization
import XenHV

/// Thread-safe handle to a running daemon.
public final class XenStoreDaemonHandle: Sendable {
    let wakeFD: Int32
    let queue = Mutex<[@Sendable (XenStoreCore) -> Void]>([])
    let stopFlag = Atomic<Bool>(false)

    init(wakeFD: Int32) { self.wakeFD = wakeFD }

    /// Runs `body` on the daemon thread between events.
    public func perform(_ body: @escaping @Sendable (XenStoreCore) -> Void) {
        queue.withLock { $0.append(body) }
        kick()
    }

    /// The hypervisor core reports a domain's death: release it (mirrors VIRQ_DOM_EXC
    /// handling in C xenstored). Unknown domains are ignored.
    public func releaseDomain(_ domid: DomID) {
        perform { core in try? core.releaseDomain(domid) }
    }

    /// Introduces a domain without going through a socket client.
    public func introduceDomain(_ domid: DomID, mfn: UInt64, port: UInt32) {
        perform { core in try? core.introduce(domid: domid, mfn: mfn, port: port) }
    }

    public func stop() {
        stopFlag.store(true, ordering: .sequentiallyConsistent)
        kick()
    }

    func kick() {
        var one: UInt64 = 1
        _ = withUnsafeBytes(of: &one) { write(wakeFD, $0.baseAddress, 8) }
    }
}

public final class XenStoreDaemon: XSRingHost {
    public let core: XenStoreCore
    public let handle: XenStoreDaemonHandle
    let wakeFD: Int32
    /// poll(2) interest per descriptor; the pollfd array is rebuilt when it changes.
    var interest: [Int32: Int16] = [:]
    var pollSetChanged = true
    var listenFD: Int32 = -1
    public private(set) var socketPath: String?

    enum Endpoint {
        case socket(SocketEndpoint)
        case ring(RingEndpoint)
    }
    /// By file descriptor (poll results) and by connection serial.
    var byFD: [Int32: Endpoint] = [:]
    var bySerial: [Int: Endpoint] = [:]
    var ringFDs: [Int: Int32] = [:]
    var pendingRelease: [XenstoreRingPort] = []

    public init(core: XenStoreCore) throws(XSTransportError) {
        self.core = core
        wakeFD = cxen_eventfd(0, O_CLOEXEC | O_NONBLOCK)
        guard wakeFD >= 0 else { throw .errno("eventfd") }
        handle = XenStoreDaemonHandle(wakeFD: wakeFD)
        core.ringHost = self
        add(wakeFD, events: Self.POLLIN)
    }

    deinit {
        for (fd, e) in byFD { if case .socket = e { close(fd) } }
        if listenFD >= 0 { close(listenFD) }
        if let p = socketPath { unlink(p) }
        for p in pendingRelease { p.release() }
        close(wakeFD)
    }

    /// Listens on a Unix socket (creating its directory if needed).
    public func listen(path: String) throws(XSTransportError) {
        let dir = path.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        if !dir.isEmpty { mkdirs(dir) }
        listenFD = try makeListener(path: path)
        socketPath = path
        add(listenFD, events: Self.POLLIN)
    }

    func mkdirs(_ dir: String) {
        var cur = ""
        for comp in dir.split(separator: "/") {
            cur += "/" + comp
            mkdir(cur, 0o755)
        }
    }

    static let POLLIN = Int16(Glibc.POLLIN)
    static let POLLOUT = Int16(Glibc.POLLOUT)

    func add(_ fd: Int32, events: Int16) {
        interest[fd] = events
        pollSetChanged = true
    }

    func modify(_ fd: Int32, events: Int16) {
        if interest[fd] != events { interest[fd] = events; pollSetChanged = true }
    }

    func remove(_ fd: Int32) {
        interest[fd] = nil
        pollSetChanged = true
    }

    // MARK: XSRingHost

    func attachRing(_ conn: XSConnection, _ port: XenstoreRingPort) {
        let r = RingEndpoint(conn: conn, port: port)
        add(port.eventFD, events: Self.POLLIN)
        byFD[port.eventFD] = .ring(r)
        bySerial[conn.serial] = .ring(r)
        // The guest may have queued requests before we attached.
        serviceRing(r)
    }

    func takeRing(_ conn: XSConnection) -> XenstoreRingPort? {
        guard case .ring(let r)? = bySerial.removeValue(forKey: conn.serial) else { return nil }
        r.dead = true
        remove(r.port.eventFD)
        byFD[r.port.eventFD] = nil
        return r.port
    }

    func detachRing(_ conn: XSConnection) {
        // Released after the current event, when nothing touches the page any more.
        if let port = takeRing(conn) { pendingRelease.append(port) }
    }

    // MARK: loop

    /// Runs until `handle.stop()`.
    public func run() {
        DetachedThread.setName("xenstored")
        var pfds: [pollfd] = []
        var lastExpiry = monotonicSeconds()
        while !handle.stopFlag.load(ordering: .sequentiallyConsistent) {
            if pollSetChanged {
                pfds = interest.map { pollfd(fd: $0.key, events: $0.value, revents: 0) }
                pollSetChanged = false
            }
            var timeout = !busy.isEmpty ? 0 : muted.isEmpty ? 1000 : muteTimeout()
            timeout = acceptRest.pollTimeout(timeout, now: monotonicNanoseconds())
            let n = pfds.withUnsafeMutableBufferPointer { poll($0.baseAddress, nfds_t($0.count), timeout) }
            if n < 0 {
                if errno == EINTR { continue }
                core.log(.critical, "poll: \(String(cString: strerror(errno)))")
                return
            }
            if n > 0 {
                for i in pfds.indices where pfds[i].revents != 0 {
                    let fd = pfds[i].fd
                    let ev = pfds[i].revents
                    pfds[i].revents = 0
                    if fd == wakeFD { drainWake(); continue }
                    if fd == listenFD { acceptAll(); continue }
                    switch byFD[fd] {
                    case .socket(let s)?: serviceSocket(s, events: ev)
                    case .ring(let r)?:
                        // Never a blocking read: a port's wake-up set is drained with a
                        // zero-timeout epoll_wait (a test's stand-in eventfd with RWF_NOWAIT).
                        _ = cxen_port_drain(fd)
                        let before = (r.reqCons, r.rspProd)
                        serviceRing(r)
                        throttleStorm(r, moved: before != (r.reqCons, r.rspProd))
                    case nil: break
                    }
                }
            }
            serveBusy()
            unmuteExpired()
            if acceptRest.until != 0 && !acceptRest.resting(now: monotonicNanoseconds()) {
                add(listenFD, events: Self.POLLIN)
            }
            afterEvents()
            let now = monotonicSeconds()
            if now - lastExpiry >= 1 { core.expireStalled(now: now); lastExpiry = now; afterEvents() }
        }
    }

    /// Rings whose last turn ended at its budget: served once per round, like every
    /// other connection, until they run dry.
    var busy: [RingEndpoint] = []

    func serveBusy() {
        guard !busy.isEmpty else { return }
        let l = busy
        busy.removeAll(keepingCapacity: true)
        for r in l {
            r.queuedBusy = false
            serviceRing(r)
        }
    }

    /// Rings whose event channel is muted for a storm of empty kicks.
    var muted: [RingEndpoint] = []

    /// XSA-332: a guest that kicks its event channel in a tight loop with no
    /// work must not eat a core. A storm takes the channel out of the poll set
    /// for the mute ``KickStormGuard`` sets, as Linux's backends delay the
    /// EOI; the ring is serviced again when the mute ends, so no request is lost.
    func throttleStorm(_ r: RingEndpoint, moved: Bool) {
        guard r.storm.turn(kicked: true, foundWork: moved, now: monotonicNanoseconds()),
              !r.dead, byFD[r.port.eventFD] != nil else { return }
        remove(r.port.eventFD)
        muted.append(r)
    }

    /// Until the first mute ends, for poll(2).
    func muteTimeout() -> Int32 {
        let now = monotonicNanoseconds()
        let end = muted.lazy.map(\.storm.mutedUntil).min() ?? now
        return min(1000, PollTimeout.until(end, now: now))
    }

    func unmuteExpired() {
        guard !muted.isEmpty else { return }
        let now = monotonicNanoseconds()
        var due: [RingEndpoint] = []
        muted.removeAll { r in
            guard r.storm.muted(now: now) == nil else { return false }
            due.append(r)
            return true
        }
        for r in due where !r.dead && byFD[r.port.eventFD] != nil {
            add(r.port.eventFD, events: Self.POLLIN)
            serviceRing(r)
        }
    }

    func drainWake() {
        var v: UInt64 = 0
        _ = read(wakeFD, &v, 8)
        let work = handle.queue.withLock { q -> [@Sendable (XenStoreCore) -> Void] in let w = q; q.removeAll(); return w }
        for w in work { w(core) }
    }

    /// Delivers output queued by other connections' requests.
    func afterEvents() {
        var rounds = 0
        repeat {
            for c in core.takeDirty() where !c.closed {
                switch bySerial[c.serial] {
                case .socket(let s)?: flushSocket(s)
                case .ring(let r)?: serviceRing(r)
                case nil: break
                }
            }
            rounds += 1
        } while !core.dirtyList.isEmpty && rounds < 8
        if !pendingRelease.isEmpty {
            let l = pendingRelease
            pendingRelease.removeAll()
            for p in l { p.release() }
        }
    }

    /// The listener out of the poll set while accept(2) finds no descriptor left.
    var acceptRest = AcceptRest()

    func acceptAll() {
        while true {
            let fd = accept(listenFD, nil, nil)
            if fd < 0 {
                let e = errno
                if case .outOfDescriptors(let first) = acceptRest.acceptFailed(errno: e, now: monotonicNanoseconds()) {
                    if first { core.log(.warning, "accept: no descriptor left (\(String(cString: strerror(e)))); new connections wait") }
                    remove(listenFD)
                }
                return
            }
            if acceptRest.accepted() { core.log(.info, "accepting connections again") }
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            let conn = core.newConnection(domid: 0, privileged: true)
            let s = SocketEndpoint(fd: fd, conn: conn)
            add(fd, events: Self.POLLIN)
            byFD[fd] = .socket(s)
            bySerial[conn.serial] = .socket(s)
        }
    }

    func serviceSocket(_ s: SocketEndpoint, events: Int16) {
        if events & Self.POLLOUT != 0 { flushSocket(s) }
        if s.dead { return }
        if events & (Self.POLLIN | Int16(POLLHUP) | Int16(POLLERR)) != 0 && !s.readPaused {
            switch s.readAvailable() {
            case .ok: break
            case .eof:
                // Answer what was sent before the hang-up, then go.
                _ = s.processInput(core)
                _ = s.flush()
                closeSocket(s); return
            case .fatal(let why): core.log(.debug, "socket read: \(why)"); closeSocket(s); return
            }
            if let err = s.processInput(core) {
                core.log(.warning, "closing client \(s.conn.serial): \(err)")
                closeSocket(s); return
            }
            // Paused for backpressure: no longer polled for input (with a
            // flush already blocked, flushSocket would not update the set).
            if s.readPaused { updateInterest(s) }
        }
        flushSocket(s)
    }

    func flushSocket(_ s: SocketEndpoint) {
        if s.dead { return }
        switch s.flush() {
        case .fatal: closeSocket(s); return
        case .blocked:
            if !s.wantWrite { s.wantWrite = true; updateInterest(s) }
        case .done:
            if s.wantWrite { s.wantWrite = false; updateInterest(s) }
        }
        // Output drained below the high-water mark: resume parsing what is buffered.
        if s.readPaused && s.conn.pendingBytes <= min(socketOutputHighWater, s.conn.quotas.maxOutputBytes / 2) {
            if let err = s.processInput(core) {
                core.log(.warning, "closing client \(s.conn.serial): \(err)")
                closeSocket(s); return
            }
            updateInterest(s)
            if s.conn.pendingBytes > 0 { flushSocket(s) }
        }
    }

    func updateInterest(_ s: SocketEndpoint) {
        var ev: Int16 = 0
        if !s.readPaused { ev |= Self.POLLIN }
        if s.wantWrite { ev |= Self.POLLOUT }
        modify(s.fd, events: ev)
    }

    func closeSocket(_ s: SocketEndpoint) {
        if s.dead { return }
        s.dead = true
        remove(s.fd)
        byFD[s.fd] = nil
        bySerial[s.conn.serial] = nil
        close(s.fd)
        core.closeConnection(s.conn, reason: "socket closed")
    }

    func serviceRing(_ r: RingEndpoint) {
        if r.dead { return }
        switch r.service(core) {
        case .ok:
            if r.moreWork && !r.queuedBusy && !r.dead {
                r.queuedBusy = true
                busy.append(r)
            }
        case .corrupt(let code, let why):
            core.log(.warning, "dom\(r.conn.domid) ring: \(why); closing its connection")
            r.markError(code)
            core.closeConnection(r.conn, reason: why)
        }
    }
}
