import Glibc

/// A minimal NBD client (fixed newstyle, NBD_OPT_EXPORT_NAME, simple replies)
/// over a Unix socket, for tests and load tools that want to see every
/// acknowledgement themselves. Requests may be pipelined with `send` and
/// `reply`; `write`, `read` and `flush` are the one-at-a-time forms.
/// The counterpart of nbd's doc/proto.md client side, as libnbd speaks it.
public final class NBDClient {
    /// NBD command types (NBD_CMD_*).
    public enum Command: UInt16 { case read = 0, write = 1, disconnect = 2, flush = 3, trim = 4, writeZeroes = 6 }

    public let fd: CInt
    /// The export's size in bytes, from the handshake.
    public let size: UInt64
    private var nextHandle: UInt64 = 1 << 48

    /// Connects and negotiates the default export; every later read waits at
    /// most `timeoutSeconds`, so a server that never answers fails, not hangs.
    public init(socket path: String, timeoutSeconds: Int = 20) throws {
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw NBDError.system("socket", errno) }
        var addr: sockaddr_un
        do { addr = try unixAddress(path) } catch { close(fd); throw error }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { let e = errno; close(fd); throw NBDError.system("connect \(path)", e) }
        var tv = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        do {
            let hello = try Self.readExactly(fd, 18)
            guard Self.u64(hello, 0) == NBDProto.initMagic, Self.u64(hello, 8) == NBDProto.optMagic else {
                throw NBDError.protocolViolation("not an NBD newstyle server")
            }
            var opt: [UInt8] = []
            Self.put32(&opt, NBDProto.clientFixedNewstyle | NBDProto.clientNoZeroes)
            Self.put64(&opt, NBDProto.optMagic)
            Self.put32(&opt, NBDProto.optExportName)  // empty name: the default export
            Self.put32(&opt, 0)
            try Self.writeAll(fd, opt)
            size = Self.u64(try Self.readExactly(fd, 10), 0)
        } catch {
            close(fd)
            throw error
        }
        self.fd = fd
    }

    deinit { close(fd) }

    /// Sends one request (pipelined: the reply comes through `reply`).
    /// `flags`: NBD_CMD_FLAG_* (1: FUA).
    public func send(type: UInt16, flags: UInt16 = 0, handle: UInt64, offset: UInt64, length: UInt32, data: [UInt8] = []) throws {
        var h: [UInt8] = []
        h.reserveCapacity(28 + data.count)
        Self.put32(&h, NBDProto.requestMagic)
        h += [UInt8(flags >> 8), UInt8(flags & 0xFF), UInt8(type >> 8), UInt8(type & 0xFF)]
        Self.put64(&h, handle)
        Self.put64(&h, offset)
        Self.put32(&h, length)
        try Self.writeAll(fd, h + data)
    }

    /// One simple reply: (handle, error); `readLength(handle)` says how many data bytes follow.
    public func reply(readLength: (UInt64) -> Int = { _ in 0 }) throws -> (handle: UInt64, error: UInt32, data: [UInt8]) {
        let r = try Self.readExactly(fd, 16)
        guard Self.u32(r, 0) == NBDProto.simpleReplyMagic else { throw NBDError.protocolViolation("bad reply magic") }
        let handle = Self.u64(r, 8), err = Self.u32(r, 4)
        let n = err == 0 ? readLength(handle) : 0
        return (handle, err, n > 0 ? try Self.readExactly(fd, n) : [])
    }

    /// Writes `data` at `offset` and waits for the acknowledgement.
    public func write(_ data: [UInt8], at offset: UInt64) throws {
        try roundTrip(.write, offset: offset, length: UInt32(data.count), data: data)
    }

    /// Reads `length` bytes at `offset`.
    public func read(at offset: UInt64, length: Int) throws -> [UInt8] {
        try roundTrip(.read, offset: offset, length: UInt32(length))
    }

    /// NBD_CMD_FLUSH: returns once everything acknowledged before is durable.
    public func flush() throws {
        try roundTrip(.flush, offset: 0, length: 0)
    }

    @discardableResult
    private func roundTrip(_ c: Command, offset: UInt64, length: UInt32, data: [UInt8] = []) throws -> [UInt8] {
        nextHandle += 1
        let h = nextHandle
        try send(type: c.rawValue, handle: h, offset: offset, length: length, data: data)
        let r = try reply { _ in c == .read ? Int(length) : 0 }
        guard r.handle == h else { throw NBDError.protocolViolation("reply for handle \(r.handle), expected \(h)") }
        guard r.error == 0 else { throw NBDError.replyError(r.error) }
        return r.data
    }

    static func writeAll(_ fd: CInt, _ b: [UInt8]) throws {
        var off = 0
        while off < b.count {
            let n = b[off...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw NBDError.system("write (NBD request)", errno) }
            off += n
        }
    }

    static func readExactly(_ fd: CInt, _ count: Int) throws -> [UInt8] {
        var b = [UInt8](repeating: 0, count: count)
        var off = 0
        while off < count {
            let n = b[off...].withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw NBDError.system("read (NBD reply)", n == 0 ? EPIPE : errno) }
            off += n
        }
        return b
    }

    static func u32(_ b: [UInt8], _ o: Int) -> UInt32 { b[o..<o + 4].reduce(0) { $0 << 8 | UInt32($1) } }
    static func u64(_ b: [UInt8], _ o: Int) -> UInt64 { b[o..<o + 8].reduce(0) { $0 << 8 | UInt64($1) } }
    static func put32(_ b: inout [UInt8], _ v: UInt32) { for s in stride(from: 24, through: 0, by: -8) { b.append(UInt8(truncatingIfNeeded: v >> UInt32(s))) } }
    static func put64(_ b: inout [UInt8], _ v: UInt64) { for s in stride(from: 56, through: 0, by: -8) { b.append(UInt8(truncatingIfNeeded: v >> UInt64(s))) } }
}
