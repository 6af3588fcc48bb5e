// xenstore-bench: throughput and latency of the real xenstored over its Unix socket,
// against a bare Unix-socket request/response server measured in the same run.
import ArgumentParser
import Foundation
import Glibc
import XenStore

// MARK: - a minimal blocking xs_wire client (no allocation per request)

final class WireConn: @unchecked Sendable {
    let fd: Int32
    var out = [UInt8](repeating: 0, count: 16 + 4096)
    var inBuf = [UInt8](repeating: 0, count: 16 + 65536)
    var reqID: UInt32 = 1

    init(path: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { b in for (i, c) in path.utf8.enumerated() { b[i] = c } }
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard r == 0 else { close(fd); throw ValidationError("connect \(path): \(String(cString: strerror(errno)))") }
    }
    deinit { close(fd) }

    /// Fills `out` with a message and returns its length.
    func build(_ type: XSType, _ payload: [UInt8], tx: UInt32 = 0) -> Int {
        var m: [UInt8] = []
        XSHeader(type, reqID: reqID, txID: tx, len: UInt32(payload.count)).append(to: &m)
        m += payload
        reqID &+= 1
        out.replaceSubrange(0..<m.count, with: m)
        return m.count
    }

    func sendAll(_ p: UnsafeRawPointer, _ n: Int) {
        var off = 0
        while off < n {
            let w = send(fd, p + off, n - off, Int32(MSG_NOSIGNAL))
            if w <= 0 { if errno == EINTR { continue }; fatalError("send: \(String(cString: strerror(errno)))") }
            off += w
        }
    }

    func recvAll(_ p: UnsafeMutableRawPointer, _ n: Int) {
        var off = 0
        while off < n {
            let r = recv(fd, p + off, n - off, 0)
            if r <= 0 { if r < 0 && errno == EINTR { continue }; fatalError("recv: connection closed") }
            off += r
        }
    }

    /// Reads one message; returns (type, payload length); payload in inBuf[16...].
    @discardableResult
    func receive() -> (UInt32, Int) {
        inBuf.withUnsafeMutableBytes { b in
            recvAll(b.baseAddress!, 16)
            let h = XSHeader(from: b.baseAddress!)
            if h.len > 0 { recvAll(b.baseAddress! + 16, Int(h.len)) }
            return (h.type, Int(h.len))
        }
    }

    /// Sends a prebuilt message of `n` bytes from `out` and waits for its reply.
    @inline(__always)
    func roundTrip(_ n: Int) -> UInt32 {
        out.withUnsafeBytes { sendAll($0.baseAddress!, n) }
        return receive().0
    }

    func request(_ type: XSType, _ payload: [UInt8], tx: UInt32 = 0) -> (UInt32, [UInt8]) {
        let n = build(type, payload, tx: tx)
        out.withUnsafeBytes { sendAll($0.baseAddress!, n) }
        while true {
            let (t, len) = receive()
            if t == XSType.watchEvent.rawValue { continue }
            return (t, Array(inBuf[16..<(16 + len)]))
        }
    }

    /// Sends many messages back to back, then reads `replies` messages.
    func pipeline(_ msgs: [[UInt8]], replies: Int) {
        var batch: [UInt8] = []
        var sent = 0
        var received = 0
        for m in msgs {
            batch += m
            sent += 1
            if batch.count > 32768 {
                batch.withUnsafeBytes { sendAll($0.baseAddress!, $0.count) }
                batch.removeAll(keepingCapacity: true)
                // Keep at most ~1000 replies in flight so neither side blocks.
                while sent - received > 1000 && received < replies { receive(); received += 1 }
            }
        }
        batch.withUnsafeBytes { if $0.count > 0 { sendAll($0.baseAddress!, $0.count) } }
        while received < replies { receive(); received += 1 }
    }
}

func msg(_ type: XSType, _ payload: [UInt8], reqID: UInt32 = 1) -> [UInt8] {
    var m: [UInt8] = []
    XSHeader(type, reqID: reqID, txID: 0, len: UInt32(payload.count)).append(to: &m)
    return m + payload
}

func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

// MARK: - the bare baseline server

/// Single-threaded poll(2) server: for every complete request (16-byte header +
/// payload) answers a header + `replyLen` bytes. What xenstored does, minus the store.
func runEchoServer(path: String, replyLen: Int) -> Never {
    let lfd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &addr.sun_path) { b in for (i, c) in path.utf8.enumerated() { b[i] = c } }
    unlink(path)
    _ = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(lfd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    listen(lfd, 128)
    print("echo ready"); fflush(nil)
    var fds = [pollfd(fd: lfd, events: Int16(POLLIN), revents: 0)]
    var bufs: [Int32: [UInt8]] = [:]
    var reply = [UInt8](repeating: 0x61, count: 16 + replyLen)
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        _ = poll(&fds, nfds_t(fds.count), -1)
        var closed: [Int32] = []
        for i in fds.indices where fds[i].revents != 0 {
            let fd = fds[i].fd
            if fd == lfd {
                let c = accept(lfd, nil, nil)
                if c >= 0 { fds.append(pollfd(fd: c, events: Int16(POLLIN), revents: 0)); bufs[c] = [] }
                continue
            }
            let n = read(fd, &chunk, chunk.count)
            if n <= 0 { closed.append(fd); continue }
            bufs[fd]!.append(contentsOf: chunk[0..<n])
            var head = 0
            var outBatch: [UInt8] = []
            let b = bufs[fd]!
            while b.count - head >= 16 {
                let h = b.withUnsafeBytes { XSHeader(from: $0.baseAddress! + head) }
                if b.count - head < 16 + Int(h.len) { break }
                var rh: [UInt8] = []
                XSHeader(type: h.type, reqID: h.reqID, txID: h.txID, len: UInt32(replyLen)).append(to: &rh)
                reply.replaceSubrange(0..<16, with: rh)
                outBatch += reply
                head += 16 + Int(h.len)
            }
            bufs[fd]!.removeSubrange(0..<head)
            outBatch.withUnsafeBytes { p in
                var off = 0
                while off < p.count { let w = send(fd, p.baseAddress! + off, p.count - off, Int32(MSG_NOSIGNAL)); if w <= 0 { break }; off += w }
            }
        }
        if !closed.isEmpty {
            for c in closed { close(c); bufs[c] = nil }
            fds.removeAll { closed.contains($0.fd) }
        }
    }
}

// MARK: - child processes

final class Child {
    let process = Process()
    let dir: String
    let socketPath: String
    init(executable: String, args: (String) -> [String], ready: String) throws {
        var t = Array("/tmp/xs-bench-XXXXXX".utf8CString)
        dir = String(cString: mkdtemp(&t)!)
        socketPath = dir + "/socket"
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = args(socketPath)
        let pipe = Pipe()
        process.standardOutput = pipe
        try process.run()
        var got = Data()
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            let d = pipe.fileHandleForReading.availableData
            if d.isEmpty { break }
            got += d
            if String(decoding: got, as: UTF8.self).contains(ready) { return }
        }
        stop()
        throw ValidationError("\(executable) did not become ready")
    }
    var pid: Int32 { process.processIdentifier }
    func rssKiB() -> Int {
        guard let s = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return -1 }
        for l in s.split(separator: "\n") where l.hasPrefix("VmRSS:") {
            return Int(l.split(separator: " ", omittingEmptySubsequences: true)[1]) ?? -1
        }
        return -1
    }
    func stop() {
        if process.isRunning { process.terminate(); process.waitUntilExit() }
        unlink(socketPath); rmdir(dir)
    }
}

// MARK: - measurement helpers

struct Rate { var opsPerSec: Double; var meanMicros: Double }

/// Runs `clients` threads, each doing `op` in a loop for `duration` seconds.
func measure(clients: Int, duration: Double, path: String,
             prepare: @escaping @Sendable (WireConn, Int) -> Void,
             op: @escaping @Sendable (WireConn, Int) -> Void) -> Rate {
    final class Box: @unchecked Sendable { var counts: [Int]; init(_ n: Int) { counts = Array(repeating: 0, count: n) } }
    let box = Box(clients)
    let conns = (0..<clients).map { _ in try! WireConn(path: path) }
    for (i, c) in conns.enumerated() { prepare(c, i) }
    let group = DispatchGroup()
    let start = DispatchSemaphore(value: 0)
    for i in 0..<clients {
        let c = conns[i]
        group.enter()
        Thread {
            start.wait()
            let end = now() + duration
            var n = 0
            while true {
                for _ in 0..<64 { op(c, i); n += 1 }
                if now() >= end { break }
            }
            box.counts[i] = n
            group.leave()
        }.start()
    }
    let t0 = now()
    for _ in 0..<clients { start.signal() }
    group.wait()
    let elapsed = now() - t0
    let total = box.counts.reduce(0, +)
    return Rate(opsPerSec: Double(total) / elapsed, meanMicros: elapsed * 1e6 * Double(clients) / Double(total))
}

func fmt(_ v: Double, _ digits: Int = 0) -> String { String(format: "%.\(digits)f", v) }

@main
struct XenstoreBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "xenstore-bench",
        abstract: "Benchmarks xenstored over its socket against a bare Unix-socket baseline.")

    @Option(help: "Seconds per throughput measurement.") var duration: Double = 2
    @Option(help: "Path of the xenstored executable (default: next to this one).") var xenstored: String?
    @Option(help: "Watches registered for the latency test.") var watches = 10_000
    @Option(help: "Nodes for the memory test.") var nodes = 100_000
    @Flag(help: "Internal: run the baseline echo server.") var echoServer = false
    @Option(help: "Internal: echo server socket.") var socket: String?
    @Option(help: "Internal: echo reply length.") var replyLen = 64

    func run() throws {
        if echoServer { runEchoServer(path: socket!, replyLen: replyLen) }
        signal(SIGPIPE, SIG_IGN)
        let me = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
        let dir = me.deletingLastPathComponent().path
        let xsd = xenstored ?? dir + "/xenstored"
        let value = [UInt8](repeating: 0x76, count: 64)
        let keyCount = 1000

        print("xenstore-bench: \(duration) s per measurement, \(ProcessInfo.processInfo.activeProcessorCount) CPUs")
        // Baseline: bare socket, 16-byte header + same payload, 64-byte reply.
        let echo = try Child(executable: me.path, args: { ["--echo-server", "--socket", $0, "--reply-len", "64"] }, ready: "echo ready")
        defer { echo.stop() }
        let readPayload = Array("/bench/k123".utf8) + [0]
        let base1 = measure(clients: 1, duration: duration, path: echo.socketPath, prepare: { _, _ in }) { c, _ in
            _ = c.build(.read, readPayload); _ = c.roundTrip(16 + readPayload.count)
        }
        let base16 = measure(clients: 16, duration: duration, path: echo.socketPath, prepare: { _, _ in }) { c, _ in
            _ = c.build(.read, readPayload); _ = c.roundTrip(16 + readPayload.count)
        }

        let d = try Child(executable: xsd, args: { ["--socket", $0, "--log-level", "error"] }, ready: "xenstored ready")
        defer { d.stop() }
        let setup = try WireConn(path: d.socketPath)
        setup.pipeline((0..<keyCount).map { msg(.write, Array("/bench/k\($0)".utf8) + [0] + value) }, replies: keyCount)
        for i in 0..<10 { _ = setup.request(.write, Array("/bench/dir/child-\(i)".utf8) + [0] + value) }

        // Each op: one request/response; message built outside the timed loop where possible.
        let prebuiltRead: @Sendable (WireConn, Int) -> Void = { c, _ in
            precondition(c.roundTrip(16 + 12) == XSType.read.rawValue)
        }
        let readPrep: @Sendable (WireConn, Int) -> Void = { c, i in
            _ = c.build(.read, Array("/bench/k\(100 + i)".utf8) + [0])  // 12-byte payload
        }
        let r1 = measure(clients: 1, duration: duration, path: d.socketPath, prepare: readPrep, op: prebuiltRead)
        let r16 = measure(clients: 16, duration: duration, path: d.socketPath, prepare: readPrep, op: prebuiltRead)

        let writeOp: @Sendable (WireConn, Int) -> Void = { c, i in
            let n = c.build(.write, Array("/bench/w\(i)".utf8) + [0] + value)
            precondition(c.roundTrip(n) == XSType.write.rawValue)
        }
        let w1 = measure(clients: 1, duration: duration, path: d.socketPath, prepare: { _, _ in }, op: writeOp)
        let w16 = measure(clients: 16, duration: duration, path: d.socketPath, prepare: { _, _ in }, op: writeOp)

        let dirPrep: @Sendable (WireConn, Int) -> Void = { c, _ in _ = c.build(.directory, Array("/bench/dir".utf8) + [0]) }
        let dirOp: @Sendable (WireConn, Int) -> Void = { c, _ in
            precondition(c.roundTrip(16 + 11) == XSType.directory.rawValue)
        }
        let l1 = measure(clients: 1, duration: duration, path: d.socketPath, prepare: dirPrep, op: dirOp)
        let l16 = measure(clients: 16, duration: duration, path: d.socketPath, prepare: dirPrep, op: dirOp)

        // Transaction: start, read, write, commit (EAGAIN counts as done work too).
        let txOp: @Sendable (WireConn, Int) -> Void = { c, i in
            let (_, idb) = c.request(.transactionStart, [0])
            let tx = UInt32(String(decoding: idb.prefix { $0 != 0 }, as: UTF8.self))!
            _ = c.request(.read, Array("/bench/t\(i)".utf8) + [0], tx: tx)
            _ = c.request(.write, Array("/bench/t\(i)".utf8) + [0] + value, tx: tx)
            _ = c.request(.transactionEnd, [UInt8(ascii: "T"), 0], tx: tx)
        }
        let t1 = measure(clients: 1, duration: duration, path: d.socketPath, prepare: { _, _ in }, op: txOp)
        let t16 = measure(clients: 16, duration: duration, path: d.socketPath, prepare: { _, _ in }, op: txOp)

        // Watch-event latency with many watches registered.
        let watcher = try WireConn(path: d.socketPath)
        var wmsgs: [[UInt8]] = []
        for i in 0..<watches { wmsgs.append(msg(.watch, XSPayload.strings(["/watch/w\(i)", "tok\(i)"]))) }
        watcher.pipeline(wmsgs, replies: 2 * watches)  // OK + registration event each
        let writer = try WireConn(path: d.socketPath)
        var lat: [Double] = []
        for i in 0..<2000 {
            let n = writer.build(.write, Array("/watch/w\(i * 7 % watches)".utf8) + [0] + value)
            let t0 = now()
            writer.out.withUnsafeBytes { writer.sendAll($0.baseAddress!, n) }
            let (type, _) = watcher.receive()
            let t1 = now()
            precondition(type == XSType.watchEvent.rawValue)
            writer.receive()
            lat.append((t1 - t0) * 1e6)
        }
        lat.sort()
        let baseLat = base1.meanMicros
        let rssWatches = d.rssKiB()

        // Memory: a fresh daemon with `nodes` 64-byte values and `watches` watches.
        let m = try Child(executable: xsd, args: { ["--socket", $0, "--log-level", "error"] }, ready: "xenstored ready")
        defer { m.stop() }
        let rssEmpty = m.rssKiB()
        let mc = try WireConn(path: m.socketPath)
        mc.pipeline((0..<nodes).map { msg(.write, Array("/mem/d\($0 / 1000)/n\($0 % 1000)".utf8) + [0] + value) }, replies: nodes)
        let mw = try WireConn(path: m.socketPath)
        mw.pipeline((0..<watches).map { msg(.watch, XSPayload.strings(["/mem/d\($0 % 100)/n\($0 / 100)", "t\($0)"])) }, replies: 2 * watches)
        let rssFull = m.rssKiB()

        func row(_ name: String, _ a: Rate, _ b: Rate) -> String {
            "| \(name) | \(fmt(a.opsPerSec)) | \(fmt(a.meanMicros, 1)) | \(fmt(b.opsPerSec)) | \(fmt(b.meanMicros, 1)) |"
        }
        print("")
        print("| operation | 1 client ops/s | 1 client mean µs | 16 clients ops/s (total) | 16 clients mean µs |")
        print("|---|---|---|---|---|")
        print(row("bare socket request/response (baseline)", base1, base16))
        print(row("read (64-byte value)", r1, r16))
        print(row("write (64-byte value)", w1, w16))
        print(row("directory (10 children)", l1, l16))
        print(row("transaction (start+read+write+commit)", t1, t16))
        print("")
        print("read round trip vs bare socket, 1 client: \(fmt(r1.meanMicros / base1.meanMicros, 2))x (goal <= 1.5x)")
        print("reads/s with 16 clients: \(fmt(r16.opsPerSec)) (goal >= 150000); bare socket: \(fmt(base16.opsPerSec))")
        print("watch event latency with \(watches) watches: median \(fmt(lat[lat.count / 2], 1)) µs, p99 \(fmt(lat[lat.count * 99 / 100], 1)) µs (bare round trip \(fmt(baseLat, 1)) µs)")
        print("resident memory: empty \(rssEmpty / 1024) MiB; \(nodes) nodes of 64 bytes + \(watches) watches: \(fmt(Double(rssFull) / 1024, 1)) MiB (goal < 100 MiB); benchmark daemon after runs: \(rssWatches / 1024) MiB")
    }
}
