import Glibc

/// A minimal HTTP responder for Prometheus scrapes on 127.0.0.1: every request
/// gets the current metrics text (one request per connection).
public enum MetricsServer {
    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    public static func serve(port: UInt16, render: () -> String) throws {
        let s = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
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
            throw Failure(description: "cannot listen on 127.0.0.1:\(port): \(String(cString: strerror(errno)))")
        }
        print("serving metrics on http://127.0.0.1:\(port)/metrics")
        while true {
            let c = accept(s, nil, nil)
            guard c >= 0 else { continue }
            var buf = [UInt8](repeating: 0, count: 4096)
            _ = read(c, &buf, buf.count)  // the request line; every path gets the metrics
            let body = render()
            let head = "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n"
            _ = (head + body).withCString { send(c, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
            close(c)
        }
    }
}
