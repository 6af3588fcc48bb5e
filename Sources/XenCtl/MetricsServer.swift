import Glibc
import XenHV

/// A minimal HTTP responder for Prometheus scrapes on 127.0.0.1: every request
/// gets the current metrics text (one request per connection).
///
/// One connection at a time, each bounded in time: a client that sends no
/// request within ``requestSeconds`` or does not take the answer within
/// ``answerSeconds`` is dropped, so an idle or stalled local client cannot
/// hold the scrapes of everyone else.
public enum MetricsServer {
    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    static let requestSeconds: Int32 = 1
    static let answerSeconds = 2

    public static func serve(port: UInt16, render: () -> String) throws {
        let s = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { throw Failure(description: "socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        addr.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard r == 0, listen(s, 16) == 0 else {
            let e = errno
            close(s)
            throw Failure(description: "cannot listen on 127.0.0.1:\(port): \(String(cString: strerror(e)))")
        }
        print("serving metrics on http://127.0.0.1:\(port)/metrics")
        fflush(nil)
        while true {
            let c = accept(s, nil, nil)
            guard c >= 0 else {
                // Out of descriptors (or memory): let the ones in use go first.
                if errno != EINTR && errno != ECONNABORTED { idle(milliseconds: 100) }
                continue
            }
            _ = fcntl(c, F_SETFD, FD_CLOEXEC)
            answer(c, render: render)
            close(c)
        }
    }

    /// Reads the request's head (to its blank line, within ``requestSeconds``
    /// and 16 KiB; every path gets the metrics) and sends the answer, giving
    /// up after ``answerSeconds``. A head read whole means no unread bytes
    /// are left at the close, which would reset the connection under the answer.
    static func answer(_ c: CInt, render: () -> String) {
        let deadline = monotonicSeconds() + Double(requestSeconds)
        var head: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        func complete() -> Bool { head.firstRange(of: [13, 10, 13, 10]) != nil || head.firstRange(of: [10, 10]) != nil }
        while !complete() {
            let left = deadline - monotonicSeconds()
            guard left > 0, head.count < 16384 else { return }
            var p = pollfd(fd: c, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, Int32(left * 1000) + 1) == 1 else { return }
            let n = read(c, &buf, buf.count)
            guard n > 0 else { return }
            head += buf[0..<n]
        }
        var limit = timeval(tv_sec: answerSeconds, tv_usec: 0)
        setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        let body = render()
        let reply = Array(("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: \(body.utf8.count)\r\n"
                           + "Connection: close\r\n\r\n" + body).utf8)
        var sent = 0
        while sent < reply.count {
            let n = reply.withUnsafeBytes { send(c, $0.baseAddress! + sent, reply.count - sent, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return }  // gone, or SO_SNDTIMEO ran out
            sent += n
        }
    }
}
