// The Unix-socket transport for dom0 tools (libxenstore's XENSTORED_PATH socket):
// a byte stream of xsd_sockmsg header + payload, pipelined, replies in order.
import Glibc
import CXen

/// Output above this stops us reading more requests from a socket client until it
/// drains its replies (a pipelining client cannot make us buffer without bound).
let socketOutputHighWater = 256 * 1024

final class SocketEndpoint {
    let fd: Int32
    let conn: XSConnection
    /// Input buffer: bytes [head, tail) are received and not yet processed. Fixed size,
    /// larger than any legal message, so a full buffer always holds a complete one.
    static let capacity = 128 * 1024
    let buf = UnsafeMutableRawPointer.allocate(byteCount: SocketEndpoint.capacity, alignment: 16)
    var head = 0
    var tail = 0
    var wantWrite = false
    var readPaused = false
    var dead = false

    init(fd: Int32, conn: XSConnection) { self.fd = fd; self.conn = conn }
    deinit { buf.deallocate() }

    enum ReadResult { case ok, eof, fatal(String) }

    /// Reads what the socket has (up to the free space in the buffer).
    func readAvailable() -> ReadResult {
        if head == tail { head = 0; tail = 0 }
        if tail == Self.capacity && head > 0 {
            // Sound: both ranges lie inside our own allocation; memmove handles overlap.
            memmove(buf, buf + head, tail - head)
            tail -= head; head = 0
        }
        var total = 0
        while tail < Self.capacity {
            let room = Self.capacity - tail
            let n = Glibc.read(fd, buf + tail, room)
            if n > 0 {
                tail += n; total += n
                // A short read drained the socket: skip the read that would say EAGAIN.
                if n < room { return .ok }
                continue
            }
            if n == 0 { return total > 0 ? .ok : .eof }
            let e = errno
            if e == EINTR { continue }
            if e == EAGAIN || e == EWOULDBLOCK { return .ok }
            return .fatal(String(cString: strerror(e)))
        }
        return .ok
    }

    /// Processes every complete message buffered, stopping early when our output
    /// backs up. Returns an error string if the client broke the protocol.
    func processInput(_ core: XenStoreCore) -> String? {
        let maxPayload = conn.quotas.maxPayload
        while !conn.closed {
            if conn.pendingBytes > min(socketOutputHighWater, conn.quotas.maxOutputBytes / 2) {
                readPaused = true; return nil
            }
            let avail = tail - head
            if avail < XSHeader.size { break }
            let base = buf + head
            let h = XSHeader(from: base)
            if Int(h.len) > maxPayload { return "payload of \(h.len) bytes exceeds \(maxPayload)" }
            let total = XSHeader.size + Int(h.len)
            if avail < total { break }
            core.process(conn, h, UnsafeRawBufferPointer(start: base + XSHeader.size, count: Int(h.len)))
            head += total
        }
        readPaused = false
        if head == tail { head = 0; tail = 0 }
        return nil
    }

    /// True when the buffer holds a complete message not yet processed.
    var hasCompleteMessage: Bool {
        let avail = tail - head
        if avail < XSHeader.size { return false }
        return avail >= XSHeader.size + Int(XSHeader(from: buf + head).len)
    }

    enum FlushResult { case done, blocked, fatal }

    func flush() -> FlushResult {
        while conn.pendingBytes > 0 {
            let n = conn.withPending { b in send(fd, b.baseAddress, b.count, Int32(MSG_NOSIGNAL)) }
            if n > 0 { conn.consumed(n); continue }
            let e = errno
            if n < 0 && e == EINTR { continue }
            if n < 0 && (e == EAGAIN || e == EWOULDBLOCK) { return .blocked }
            return .fatal
        }
        return .done
    }
}

/// Creates, binds and listens on a Unix socket, replacing a stale socket file.
func makeListener(path: String) throws(XSTransportError) -> Int32 {
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    let maxLen = MemoryLayout.size(ofValue: addr.sun_path)
    guard path.utf8.count < maxLen else { throw .init("socket path too long: \(path)") }
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
    guard fd >= 0 else { throw .errno("socket") }
    withUnsafeMutableBytes(of: &addr.sun_path) { b in
        for (i, c) in path.utf8.enumerated() { b[i] = c }
        b[path.utf8.count] = 0
    }
    var st = stat()
    if lstat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFSOCK { unlink(path) }
    let r = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    guard r == 0 else { let e = XSTransportError.errno("bind \(path)"); close(fd); throw e }
    chmod(path, 0o600)
    guard listen(fd, 128) == 0 else { let e = XSTransportError.errno("listen"); close(fd); throw e }
    return fd
}

public struct XSTransportError: Error, CustomStringConvertible, Sendable {
    public let description: String
    init(_ s: String) { description = s }
    static func errno(_ what: String) -> XSTransportError {
        XSTransportError("\(what): \(String(cString: strerror(Glibc.errno)))")
    }
}
