import Dispatch
import Glibc
import Logging
import Synchronization

/// An NBD server for one export (newstyle fixed negotiation, NBD_OPT_GO /
/// INFO / LIST / EXPORT_NAME, simple replies), on a Unix socket or a loopback
/// TCP port. Requests are pipelined: each is handed to the ``BlockDevice`` as
/// it arrives and answered when the device completes it, in any order.
///
/// Everything a client sends is checked: magic numbers, option lengths,
/// request ranges (with overflow-safe arithmetic) and payload sizes; a client
/// that breaks framing is disconnected, a bad request gets its errno.
public final class NBDServer: @unchecked Sendable {
    // Sound: `listenFD` and the config are immutable; `stopping` is atomic.
    public let exportName: String
    public let device: any BlockDevice
    let logger: Logger
    private var listenFD: CInt = -1
    private let stopping = Atomic<Bool>(false)
    private var unixPath: String?

    public init(exportName: String, device: any BlockDevice, logger: Logger = Logger(label: "nbd")) {
        self.exportName = exportName
        self.device = device
        self.logger = logger
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
        startAccepting()
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
        startAccepting()
        return UInt16(bigEndian: addr.sin_port)
    }

    /// Stops accepting; connections already open finish on their own.
    public func stop() {
        guard !stopping.exchange(true, ordering: .acquiringAndReleasing) else { return }
        shutdown(listenFD, Int32(SHUT_RDWR))
        close(listenFD)
        if let p = unixPath { unlink(p) }
    }

    deinit { stop() }

    private func startAccepting() {
        let fd = listenFD
        Thread.detach(name: "nbd-accept") { [self] in
            while !stopping.load(ordering: .acquiring) {
                let c = accept(fd, nil, nil)
                if c < 0 {
                    if errno == EINTR { continue }
                    return
                }
                _ = fcntl(c, F_SETFD, FD_CLOEXEC)
                var one: Int32 = 1
                setsockopt(c, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                let conn = NBDConnection(fd: c, server: self)
                Thread.detach(name: "nbd-conn") { conn.serve() }
            }
        }
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

/// A detached pthread (Foundation's Thread is not needed for this).
enum Thread {
    static func detach(name: String, _ body: @escaping @Sendable () -> Void) {
        final class Box: @unchecked Sendable { let body: @Sendable () -> Void; init(_ b: @escaping @Sendable () -> Void) { body = b } }
        var attr = pthread_attr_t()
        pthread_attr_init(&attr)
        pthread_attr_setdetachstate(&attr, Int32(PTHREAD_CREATE_DETACHED))
        var tid = pthread_t()
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        pthread_create(&tid, &attr, { arg in
            let b = Unmanaged<AnyObject>.fromOpaque(arg!).takeRetainedValue() as! Box
            b.body()
            return nil
        }, box)
        pthread_attr_destroy(&attr)
    }
}

/// One client connection: negotiation, then the transmission phase.
final class NBDConnection: @unchecked Sendable {
    // Sound: the reader thread owns parsing; replies are serialised by `sendLock`;
    // `inFlight` is a DispatchGroup.
    let fd: CInt
    let server: NBDServer
    let sendLock = Mutex<Void>(())
    let inFlight = DispatchGroup()
    private let broken = Atomic<Bool>(false)

    init(fd: CInt, server: NBDServer) {
        self.fd = fd
        self.server = server
    }

    func serve() {
        defer {
            inFlight.wait()
            close(fd)
        }
        guard let flags = negotiate() else { return }
        transmission(flags: flags)
    }

    // MARK: I/O helpers

    func readExact(_ p: UnsafeMutableRawPointer, _ n: Int) -> Bool {
        var got = 0
        while got < n {
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
                bs.u16(NBDProto.infoBlockSize); bs.u32(512); bs.u32(4096); bs.u32(NBDProto.maxPayload)
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

            switch type {
            case NBDProto.cmdRead:
                guard length <= NBDProto.maxPayload, inRange else { simpleReply(handle, NBDProto.EINVAL); continue }
                let io = IOBuffer(count: Int(length))
                inFlight.enter()
                dev.read(at: offset, into: io.raw) { [self] err in
                    simpleReply(handle, err.map { UInt32($0) } ?? 0, payload: err == nil ? UnsafeRawBufferPointer(io.raw) : nil)
                    io.raw.deallocate()
                    inFlight.leave()
                }
            case NBDProto.cmdWrite:
                // The payload follows whatever we answer; one we cannot take breaks framing.
                guard length <= NBDProto.maxPayload else { return }
                let io = IOBuffer(count: Int(length))
                guard length == 0 || readExact(io.raw.baseAddress!, Int(length)) else { io.raw.deallocate(); return }
                if dev.isReadOnly { io.raw.deallocate(); simpleReply(handle, NBDProto.EPERM); continue }
                guard inRange else { io.raw.deallocate(); simpleReply(handle, NBDProto.ENOSPC); continue }
                inFlight.enter()
                dev.write(at: offset, from: UnsafeRawBufferPointer(io.raw), fua: cmdFlags & NBDProto.cmdFlagFUA != 0) { [self] err in
                    simpleReply(handle, err.map { UInt32($0) } ?? 0)
                    io.raw.deallocate()
                    inFlight.leave()
                }
            case NBDProto.cmdFlush:
                inFlight.enter()
                dev.flush { [self] err in
                    simpleReply(handle, err.map { UInt32($0) } ?? 0)
                    inFlight.leave()
                }
            case NBDProto.cmdTrim:
                if dev.isReadOnly { simpleReply(handle, NBDProto.EPERM); continue }
                guard inRange else { simpleReply(handle, NBDProto.EINVAL); continue }
                inFlight.enter()
                dev.trim(at: offset, length: UInt64(length)) { [self] err in
                    simpleReply(handle, err.map { UInt32($0) } ?? 0)
                    inFlight.leave()
                }
            case NBDProto.cmdDisc:
                return
            default:
                simpleReply(handle, NBDProto.EINVAL)
            }
        }
    }

    /// One simple reply (header + optional read data), atomically on the socket.
    func simpleReply(_ handle: UInt64, _ error: UInt32, payload: UnsafeRawBufferPointer? = nil) {
        var h = BE()
        h.u32(NBDProto.simpleReplyMagic); h.u32(error); h.u64(handle)
        sendLock.withLock { _ in
            let ok = writeBytes(h.bytes) && (payload.map { $0.isEmpty || writeAll($0.baseAddress!, $0.count) } ?? true)
            if !ok {
                broken.store(true, ordering: .releasing)
                shutdown(fd, Int32(SHUT_RDWR))
            }
        }
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
