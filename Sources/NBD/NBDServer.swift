import Dispatch
import Glibc
import Logging
import Synchronization
import XenHV

/// An NBD server for one export (newstyle fixed negotiation, NBD_OPT_GO /
/// INFO / LIST / EXPORT_NAME, simple replies), on a Unix socket or a loopback
/// TCP port. Requests are pipelined: each is handed to the ``BlockDevice`` as
/// it arrives and answered when the device completes it, in any order.
///
/// Everything a client sends is checked: magic numbers, option lengths,
/// request ranges (with overflow-safe arithmetic) and payload sizes; a client
/// that breaks framing is disconnected, a bad request gets its errno.
///
/// What one client can hold is bounded, so it cannot stall the others or the
/// device: at most ``maxConnections`` connections; ``handshakeSeconds`` to
/// choose the export; at most ``maxRequestsInFlight`` requests and
/// ``maxBytesInFlight`` bytes of buffers per connection (as qemu-nbd, which
/// takes 16 requests), past which its requests wait on its socket; and its
/// replies are sent by a thread of its own, never by the device's completion
/// path, so a client that stops reading them stalls only itself.
public final class NBDServer: @unchecked Sendable {
    // Sound: the config and `listenFD` (set before the accept thread starts)
    // are immutable; `stopped` is locked and `connections` atomic.
    public let exportName: String
    public let device: any BlockDevice
    let logger: Logger
    private var listenFD: CInt = -1
    /// Set by ``stop()`` as it shuts the listening socket down, under the
    /// lock: the accept thread closes the socket once it sees it, and only then.
    private let stopped = Mutex<Bool>(false)
    private var isStopped: Bool { stopped.withLock { $0 } }
    private var unixPath: String?
    let connections = Atomic<Int>(0)

    public static let maxConnections = 16
    /// Seconds a client has to choose the export (10; tests shorten it).
    public let handshakeSeconds: Int
    static let maxRequestsInFlight = 16
    static let maxBytesInFlight = 64 << 20

    public init(exportName: String, device: any BlockDevice, logger: Logger = Logger(label: "nbd"), handshakeSeconds: Int = 10) {
        self.exportName = exportName
        self.device = device
        self.logger = logger
        self.handshakeSeconds = handshakeSeconds
    }

    /// Listens on a Unix socket (replacing a stale one) and serves in the
    /// background. The socket is bound under a temporary name and renamed
    /// into place once it listens, so whoever sees `path` can connect to it.
    public func listen(unixPath path: String) throws {
        let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { throw NBDError.system("socket", errno) }
        guard path.utf8.count < MemoryLayout.size(ofValue: sockaddr_un().sun_path) else {
            close(s); throw NBDError.system("socket path", ENAMETOOLONG)
        }
        let bound = path.utf8.count + 1 < MemoryLayout.size(ofValue: sockaddr_un().sun_path) ? path + "~" : path
        var addr: sockaddr_un
        do { addr = try unixAddress(bound) } catch { close(s); throw error }
        unlink(bound)
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard r == 0, Glibc.listen(s, 16) == 0 else { let e = errno; close(s); unlink(bound); throw NBDError.system("bind \(path)", e) }
        guard bound == path || rename(bound, path) == 0 else {
            let e = errno; close(s); unlink(bound); throw NBDError.system("rename \(bound) to \(path)", e)
        }
        listenFD = s
        unixPath = path
        guard startAccepting() else { unlink(path); throw NBDError.system("pthread_create (accept thread)", EAGAIN) }
    }

    /// Listens on 127.0.0.1:`port` (0 picks one) and returns the port.
    @discardableResult
    public func listen(tcpPort port: UInt16) throws -> UInt16 {
        let s = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { throw NBDError.system("socket", errno) }
        var one: Int32 = 1
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        addr.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let r = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { p -> Int32 in
                guard bind(s, p, len) == 0 else { return -1 }
                return getsockname(s, p, &len)
            }
        }
        guard r == 0, Glibc.listen(s, 16) == 0 else { let e = errno; close(s); throw NBDError.system("bind 127.0.0.1:\(port)", e) }
        listenFD = s
        guard startAccepting() else { throw NBDError.system("pthread_create (accept thread)", EAGAIN) }
        return UInt16(bigEndian: addr.sin_port)
    }

    /// Stops accepting; connections already open finish on their own. The
    /// listening socket is shut down here and closed by the accept thread once
    /// it has left accept(2), so its number cannot be reused under it.
    public func stop() {
        let first = stopped.withLock { done -> Bool in
            guard !done else { return false }
            if listenFD >= 0 { shutdown(listenFD, Int32(SHUT_RDWR)) }
            done = true
            return true
        }
        guard first else { return }
        if let p = unixPath { unlink(p) }
    }

    deinit { stop() }

    /// False if the accept thread could not start (the socket is closed).
    private func startAccepting() -> Bool {
        let fd = listenFD
        let started = DetachedThread.start(name: "nbd-accept") { [self] in
            defer { close(fd) }
            while !isStopped {
                let c = accept(fd, nil, nil)
                if c < 0 {
                    if isStopped { return }
                    // Out of descriptors, memory or buffers: let the open
                    // connections finish some work, then accept again.
                    if errno != EINTR && errno != ECONNABORTED { idle(milliseconds: 100) }
                    continue
                }
                _ = fcntl(c, F_SETFD, FD_CLOEXEC)
                guard connections.wrappingAdd(1, ordering: .relaxed).newValue <= Self.maxConnections else {
                    logger.warning("NBD: refusing a connection past \(Self.maxConnections)")
                    connections.wrappingSubtract(1, ordering: .relaxed)
                    close(c)
                    continue
                }
                var one: Int32 = 1
                setsockopt(c, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                let conn = NBDConnection(fd: c, server: self)
                guard DetachedThread.start(name: "nbd-conn", { conn.serve() }) else {
                    connections.wrappingSubtract(1, ordering: .relaxed)
                    close(c)
                    idle(milliseconds: 100)
                    continue
                }
            }
        }
        if !started {
            close(fd)
            listenFD = -1
        }
        return started
    }
}

public enum NBDError: Error, CustomStringConvertible {
    case system(String, Int32)
    /// The peer broke the protocol (bad magic, unexpected handle).
    case protocolViolation(String)
    /// The server answered a request with this NBD error (EIO, EPERM, ...).
    case replyError(UInt32)
    public var description: String {
        switch self {
        case let .system(what, e): "\(what): \(String(cString: strerror(e)))"
        case let .protocolViolation(what): "NBD: \(what)"
        case let .replyError(e): "NBD reply error \(e)"
        }
    }
}

/// `sockaddr_un` for `path`, or ENAMETOOLONG.
func unixAddress(_ path: String) throws -> sockaddr_un {
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { throw NBDError.system("socket path \(path)", ENAMETOOLONG) }
    withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: bytes); $0[bytes.count] = 0 }
    return addr
}

/// One client connection: negotiation, then the transmission phase, with a
/// reader thread (this one: requests in, handed to the device) and a writer
/// thread (replies out, in the order the device completed them).
final class NBDConnection: @unchecked Sendable {
    // Sound: the reader thread owns parsing and, until transmission starts,
    // the socket's sending side; then only the writer thread sends. `budget`,
    // `pending` and `broken` synchronise themselves.
    let fd: CInt
    let server: NBDServer
    private let broken = Atomic<Bool>(false)
    /// Requests admitted and not yet answered, and the bytes of their buffers.
    private let budget = Mutex<(requests: Int, bytes: Int)>((0, 0))
    private let freed = DispatchSemaphore(value: 0)
    /// Replies for the writer thread; `end` stops it.
    private let pending = Mutex<[Reply]>([])
    private let ready = DispatchSemaphore(value: 0)
    private let writerDone = DispatchSemaphore(value: 0)

    /// One simple reply; a read's data buffer goes with it and is freed once sent.
    struct Reply: @unchecked Sendable {
        // Sound: the buffer belongs to this one reply.
        var handle: UInt64 = 0
        var error: UInt32 = 0
        var buffer: IOBuffer? = nil
        var sendData = false
        var bytes = 0
        var end = false
    }

    init(fd: CInt, server: NBDServer) {
        self.fd = fd
        self.server = server
    }

    func serve() {
        defer {
            close(fd)
            server.connections.wrappingSubtract(1, ordering: .relaxed)
        }
        // The whole handshake is bounded: each read and write of it may take
        // only what is left of the deadline (a fixed timeout per call would
        // let a byte every few seconds, or options without end, hold a slot).
        // No timer: pvguest keeps off libdispatch's worker pool, whose
        // monitor reads /proc/<tid>/stat, which a guest's PID namespace
        // does not match (it crashes the process).
        handshakeDeadline = monotonicSeconds() + Double(server.handshakeSeconds)
        let flags = negotiate()
        handshakeDeadline = nil
        guard let flags else { return }
        setTimeouts(seconds: 0)
        guard DetachedThread.start(name: "nbd-reply", { [self] in writeReplies() }) else { return }
        transmission(flags: flags)
        // Every admitted request is answered (or dropped with a broken
        // socket) before the writer stops and the descriptor is closed.
        while budget.withLock({ $0.requests }) > 0 { freed.wait() }
        enqueue(Reply(end: true))
        writerDone.wait()
    }

    /// SO_RCVTIMEO and SO_SNDTIMEO (0: none): the handshake is bounded, the
    /// transmission phase is not (a client may idle between requests).
    private func setTimeouts(seconds: Double) {
        var tv = timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - seconds.rounded(.down)) * 1e6))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// The end of the handshake (monotonic seconds) while it runs; only the
    /// reader thread touches it, before the writer thread exists.
    private var handshakeDeadline: Double?

    /// Before a handshake read or write: the socket's timeouts set to what is
    /// left of the deadline; false once it has passed.
    private func withinHandshake() -> Bool {
        guard let d = handshakeDeadline else { return true }
        let left = d - monotonicSeconds()
        guard left > 0 else { return false }
        setTimeouts(seconds: max(left, 0.001))
        return true
    }

    // MARK: I/O helpers

    func readExact(_ p: UnsafeMutableRawPointer, _ n: Int) -> Bool {
        var got = 0
        while got < n {
            guard withinHandshake() else { return false }
            let r = read(fd, p + got, n - got)
            if r < 0 && errno == EINTR { continue }
            guard r > 0 else { return false }
            got += r
        }
        return true
    }
    func readBytes(_ n: Int) -> [UInt8]? {
        var b = [UInt8](repeating: 0, count: n)
        guard n == 0 || b.withUnsafeMutableBytes({ readExact($0.baseAddress!, n) }) else { return nil }
        return b
    }
    func writeAll(_ p: UnsafeRawPointer, _ n: Int) -> Bool {
        var sent = 0
        while sent < n {
            guard withinHandshake() else { return false }
            let r = send(fd, p + sent, n - sent, Int32(MSG_NOSIGNAL))
            if r < 0 && errno == EINTR { continue }
            guard r > 0 else { return false }
            sent += r
        }
        return true
    }
    func writeBytes(_ b: [UInt8]) -> Bool { b.withUnsafeBytes { writeAll($0.baseAddress!, $0.count) } }

    // MARK: Negotiation

    /// Returns the transmission flags once the client chose our export.
    func negotiate() -> UInt16? {
        let dev = server.device
        var tflags = NBDProto.hasFlags | NBDProto.sendFlush | NBDProto.sendFUA | NBDProto.canMultiConn
        if dev.isReadOnly { tflags |= NBDProto.readOnly }
        if dev.canTrim && !dev.isReadOnly { tflags |= NBDProto.sendTrim }
        if !dev.isReadOnly { tflags |= NBDProto.sendWriteZeroes }

        var hello = BE()
        hello.u64(NBDProto.initMagic); hello.u64(NBDProto.optMagic)
        hello.u16(NBDProto.flagFixedNewstyle | NBDProto.flagNoZeroes)
        guard writeBytes(hello.bytes), let cf = readBytes(4) else { return nil }
        let clientFlags = BE.u32(cf, 0)
        guard clientFlags & ~(NBDProto.clientFixedNewstyle | NBDProto.clientNoZeroes) == 0 else { return nil }
        let noZeroes = clientFlags & NBDProto.clientNoZeroes != 0

        while true {
            guard let h = readBytes(16), BE.u64(h, 0) == NBDProto.optMagic else { return nil }
            let opt = BE.u32(h, 8), len = BE.u32(h, 12)
            guard len <= 65536, let data = readBytes(Int(len)) else { return nil }
            switch opt {
            case NBDProto.optExportName:
                guard data.isEmpty || String(decoding: data, as: UTF8.self) == server.exportName else { return nil }
                var r = BE()
                r.u64(dev.size); r.u16(tflags)
                if !noZeroes { r.bytes += [UInt8](repeating: 0, count: 124) }
                return writeBytes(r.bytes) ? tflags : nil
            case NBDProto.optAbort:
                _ = reply(opt, NBDProto.repAck, [])
                return nil
            case NBDProto.optList:
                guard data.isEmpty else { guard reply(opt, NBDProto.repErrInvalid, []) else { return nil }; continue }
                var e = BE()
                let name = Array(server.exportName.utf8)
                e.u32(UInt32(name.count)); e.bytes += name
                guard reply(opt, NBDProto.repServer, e.bytes), reply(opt, NBDProto.repAck, []) else { return nil }
            case NBDProto.optInfo, NBDProto.optGo:
                // u32 name length, name, u16 count, count x u16 info requests.
                guard data.count >= 6 else { guard reply(opt, NBDProto.repErrInvalid, []) else { return nil }; continue }
                let nameLen = Int(BE.u32(data, 0))
                guard nameLen <= data.count - 6 else { guard reply(opt, NBDProto.repErrInvalid, []) else { return nil }; continue }
                let nInfo = Int(BE.u16(data, 4 + nameLen))
                guard data.count == 6 + nameLen + 2 * nInfo else { guard reply(opt, NBDProto.repErrInvalid, []) else { return nil }; continue }
                let name = String(decoding: data[4..<4 + nameLen], as: UTF8.self)
                guard name.isEmpty || name == server.exportName else {
                    guard reply(opt, NBDProto.repErrUnknown, []) else { return nil }
                    continue
                }
                var info = BE()
                info.u16(NBDProto.infoExport); info.u64(dev.size); info.u16(tflags)
                var bs = BE()
                bs.u16(NBDProto.infoBlockSize); bs.u32(dev.blockSize); bs.u32(max(4096, dev.blockSize)); bs.u32(NBDProto.maxPayload)
                guard reply(opt, NBDProto.repInfo, info.bytes), reply(opt, NBDProto.repInfo, bs.bytes),
                      reply(opt, NBDProto.repAck, []) else { return nil }
                if opt == NBDProto.optGo { return tflags }
            default:
                guard reply(opt, NBDProto.repErrUnsup, []) else { return nil }
            }
        }
    }

    func reply(_ opt: UInt32, _ type: UInt32, _ data: [UInt8]) -> Bool {
        var r = BE()
        r.u64(NBDProto.replyMagic); r.u32(opt); r.u32(type); r.u32(UInt32(data.count))
        r.bytes += data
        return writeBytes(r.bytes)
    }

    // MARK: Transmission

    func transmission(flags: UInt16) {
        let dev = server.device
        let size = dev.size
        var hdr = [UInt8](repeating: 0, count: 28)
        while !broken.load(ordering: .acquiring) {
            guard hdr.withUnsafeMutableBytes({ readExact($0.baseAddress!, 28) }) else { return }
            guard BE.u32(hdr, 0) == NBDProto.requestMagic else {
                server.logger.warning("NBD client sent a bad request magic; disconnecting")
                return
            }
            let cmdFlags = BE.u16(hdr, 4), type = BE.u16(hdr, 6)
            let handle = BE.u64(hdr, 8), offset = BE.u64(hdr, 16), length = BE.u32(hdr, 24)
            let (end, overflow) = offset.addingReportingOverflow(UInt64(length))
            let inRange = !overflow && end <= size
            // A write's payload follows whatever we answer; one we cannot take breaks framing.
            if type == NBDProto.cmdWrite && length > NBDProto.maxPayload { return }
            let buffered = (type == NBDProto.cmdRead && length <= NBDProto.maxPayload && inRange) || type == NBDProto.cmdWrite
            let bytes = buffered ? Int(length) : 0
            admit(bytes)

            switch type {
            case NBDProto.cmdRead:
                guard length <= NBDProto.maxPayload, inRange else { answer(handle, NBDProto.EINVAL, bytes: bytes); continue }
                guard length > 0 else { answer(handle, 0, bytes: bytes); continue }
                let io = IOBuffer(count: Int(length))
                dev.read(at: offset, into: io.raw) { [self] err in
                    answer(handle, err.map { UInt32($0) } ?? 0, data: err == nil ? io : nil, free: io, bytes: bytes)
                }
            case NBDProto.cmdWrite:
                let io = IOBuffer(count: Int(length))
                guard length == 0 || readExact(io.raw.baseAddress!, Int(length)) else {
                    io.raw.deallocate(); release(bytes: bytes); return
                }
                if dev.isReadOnly { answer(handle, NBDProto.EPERM, free: io, bytes: bytes); continue }
                guard inRange else { answer(handle, NBDProto.ENOSPC, free: io, bytes: bytes); continue }
                guard length > 0 else { answer(handle, 0, free: io, bytes: bytes); continue }
                dev.write(at: offset, from: UnsafeRawBufferPointer(io.raw), fua: cmdFlags & NBDProto.cmdFlagFUA != 0) { [self] err in
                    answer(handle, err.map { UInt32($0) } ?? 0, free: io, bytes: bytes)
                }
            case NBDProto.cmdFlush:
                dev.flush { [self] err in answer(handle, err.map { UInt32($0) } ?? 0, bytes: bytes) }
            case NBDProto.cmdTrim:
                if dev.isReadOnly { answer(handle, NBDProto.EPERM, bytes: bytes); continue }
                guard inRange else { answer(handle, NBDProto.EINVAL, bytes: bytes); continue }
                guard length > 0 else { answer(handle, 0, bytes: bytes); continue }
                let fua = cmdFlags & NBDProto.cmdFlagFUA != 0
                dev.trim(at: offset, length: UInt64(length)) { [self] err in
                    // FUA: the reply waits until the discard is on stable storage, as a write's does.
                    guard fua, err == nil else { answer(handle, err.map { UInt32($0) } ?? 0, bytes: bytes); return }
                    dev.flush { [self] err in answer(handle, err.map { UInt32($0) } ?? 0, bytes: bytes) }
                }
            case NBDProto.cmdWriteZeroes:
                if dev.isReadOnly { answer(handle, NBDProto.EPERM, bytes: bytes); continue }
                guard inRange else { answer(handle, NBDProto.ENOSPC, bytes: bytes); continue }
                // Never offered (NBD_FLAG_SEND_FAST_ZERO): zeroing here is writing zeros.
                guard cmdFlags & NBDProto.cmdFlagFastZero == 0 else { answer(handle, NBDProto.EINVAL, bytes: bytes); continue }
                guard length > 0 else { answer(handle, 0, bytes: bytes); continue }
                dev.writeZeroes(at: offset, length: UInt64(length), fua: cmdFlags & NBDProto.cmdFlagFUA != 0) { [self] err in
                    answer(handle, err.map { UInt32($0) } ?? 0, bytes: bytes)
                }
            case NBDProto.cmdDisc:
                release(bytes: bytes)
                return
            default:
                answer(handle, NBDProto.EINVAL, bytes: bytes)
            }
        }
    }

    /// Waits until this connection may hold one more request of `bytes`
    /// bytes of buffers (always, when it holds none): a client that does not
    /// read its replies stops being read itself.
    private func admit(_ bytes: Int) {
        while true {
            let admitted = budget.withLock { b -> Bool in
                guard b.requests == 0
                    || (b.requests < NBDServer.maxRequestsInFlight && b.bytes + bytes <= NBDServer.maxBytesInFlight) else { return false }
                b.requests += 1
                b.bytes += bytes
                return true
            }
            if admitted { return }
            freed.wait()
        }
    }

    /// Gives back what admitted requests held: answered ones (a batch of
    /// the writer's at a time), or one that gets no reply (the client left).
    private func release(requests: Int = 1, bytes: Int) {
        budget.withLock { $0.requests -= requests; $0.bytes -= bytes }
        freed.signal()
    }

    /// Queues the reply to an admitted request (from any thread: the device's
    /// completion path only appends to a list).
    private func answer(_ handle: UInt64, _ error: UInt32, data: IOBuffer? = nil, free: IOBuffer? = nil, bytes: Int) {
        enqueue(Reply(handle: handle, error: error, buffer: free ?? data, sendData: data != nil, bytes: bytes))
    }

    /// The writer takes the whole list at each wake-up, so only the reply
    /// that finds it empty wakes it.
    private func enqueue(_ r: Reply) {
        let wasEmpty = pending.withLock { p -> Bool in
            defer { p.append(r) }
            return p.isEmpty
        }
        if wasEmpty { ready.signal() }
    }

    /// The writer thread: sends each batch of replies (headers and reads'
    /// data) whole, gathered into as few sendmsg calls as it takes, frees
    /// their buffers and gives their budget back. After a failed send the
    /// socket is shut down (the reader stops) and later replies are dropped.
    private func writeReplies() {
        // Headers and the gather list live as long as this thread; a chunk is
        // at most `chunk` replies (more than the budget lets wait at once).
        let chunk = 2 * NBDServer.maxRequestsInFlight
        let headers = UnsafeMutableRawPointer.allocate(byteCount: 16 * chunk, alignment: 8)
        let iov = UnsafeMutablePointer<iovec>.allocate(capacity: 2 * chunk)
        defer {
            headers.deallocate()
            iov.deallocate()
        }
        var batch: [Reply] = []
        while true {
            ready.wait()
            pending.withLock { swap(&$0, &batch) }
            let endAt = batch.firstIndex { $0.end }  // nothing is queued after the end
            let end = endAt != nil
            let replies = batch[..<(endAt ?? batch.endIndex)]
            var answered = 0, bytes = 0
            var first = replies.startIndex
            while first < replies.endIndex {
                let next = min(first + chunk, replies.endIndex)
                if !broken.load(ordering: .acquiring) {
                    var n = 0
                    for (k, r) in replies[first..<next].enumerated() {
                        let h = headers + 16 * k
                        h.storeBytes(of: NBDProto.simpleReplyMagic.bigEndian, as: UInt32.self)
                        h.storeBytes(of: r.error.bigEndian, toByteOffset: 4, as: UInt32.self)
                        h.storeBytes(of: r.handle.bigEndian, toByteOffset: 8, as: UInt64.self)
                        iov[n] = iovec(iov_base: h, iov_len: 16)
                        n += 1
                        if r.sendData, let b = r.buffer, !b.raw.isEmpty {
                            iov[n] = iovec(iov_base: b.raw.baseAddress, iov_len: b.raw.count)
                            n += 1
                        }
                    }
                    if !sendAll(iov, n) {
                        broken.store(true, ordering: .releasing)
                        shutdown(fd, Int32(SHUT_RDWR))
                    }
                }
                for r in replies[first..<next] {
                    r.buffer?.raw.deallocate()
                    bytes += r.bytes
                }
                answered += next - first
                first = next
            }
            if answered > 0 { release(requests: answered, bytes: bytes) }
            if end { writerDone.signal(); return }
            batch.removeAll(keepingCapacity: true)
        }
    }

    /// Sends the `count` entries of `iov` whole (sendmsg, resumed after a
    /// partial send; no SIGPIPE). `iov` is consumed.
    private func sendAll(_ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> Bool {
        var first = 0
        while first < count {
            var msg = msghdr()
            msg.msg_iov = iov + first
            msg.msg_iovlen = count - first
            let r = sendmsg(fd, &msg, Int32(MSG_NOSIGNAL))
            if r < 0 && errno == EINTR { continue }
            guard r > 0 else { return false }
            var left = r
            while first < count && left >= iov[first].iov_len {
                left -= iov[first].iov_len
                first += 1
            }
            if left > 0 {
                iov[first].iov_base = iov[first].iov_base! + left
                iov[first].iov_len -= left
            }
        }
        return true
    }
}

/// Big-endian encoding, as NBD puts everything on the wire.
struct BE {
    var bytes: [UInt8] = []
    mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.bigEndian) { bytes += $0 } }
    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.bigEndian) { bytes += $0 } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.bigEndian) { bytes += $0 } }
    static func u16(_ b: [UInt8], _ at: Int) -> UInt16 { UInt16(b[at]) << 8 | UInt16(b[at + 1]) }
    static func u32(_ b: [UInt8], _ at: Int) -> UInt32 { UInt32(u16(b, at)) << 16 | UInt32(u16(b, at + 2)) }
    static func u64(_ b: [UInt8], _ at: Int) -> UInt64 { UInt64(u32(b, at)) << 32 | UInt64(u32(b, at + 4)) }
}

/// A request's data buffer, owned by exactly one request from allocation to
/// the device's completion (hence safe to send across threads).
struct IOBuffer: @unchecked Sendable {
    let raw: UnsafeMutableRawBufferPointer
    init(count: Int) {
        let p = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1), alignment: 4096)
        raw = UnsafeMutableRawBufferPointer(start: p, count: count)
    }
}
