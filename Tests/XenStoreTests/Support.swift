// Shared test helpers: an in-process client of the store core, and helpers to start
// the real xenstored executable and run real clients against it.
import CXen
import Foundation
import Glibc
import Testing
import XenTestKit
@testable import XenStore

/// Drives the core directly as one connection and decodes its replies.
final class CoreClient {
    let core: XenStoreCore
    let conn: XSConnection
    var reqID: UInt32 = 1

    init(_ core: XenStoreCore, conn: XSConnection) {
        self.core = core
        self.conn = conn
    }

    convenience init(_ core: XenStoreCore, domid: DomID = 0, privileged: Bool? = nil) {
        self.init(core, conn: core.newConnection(domid: domid, privileged: privileged ?? (domid == 0)))
    }

    struct Msg: Equatable, CustomStringConvertible {
        var type: UInt32
        var reqID: UInt32
        var txID: UInt32
        var payload: [UInt8]
        var string: String { String(decoding: payload, as: UTF8.self) }
        var fields: [String] {
            var p = payload
            if p.last == 0 { p.removeLast() }
            return p.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
        }
        var error: String? { type == XSType.error.rawValue ? fields.first : nil }
        var description: String { "type \(type) req \(reqID) tx \(txID) \(fields)" }
    }

    /// Every message queued on this connection, in order (and marks them delivered).
    func drain() -> [Msg] {
        var out: [Msg] = []
        let bytes = conn.withPending { Array($0) }
        conn.consumed(bytes.count)
        var i = 0
        while i + 16 <= bytes.count {
            let h = bytes.withUnsafeBytes { XSHeader(from: $0.baseAddress! + i) }
            let p = Array(bytes[(i + 16)..<(i + 16 + Int(h.len))])
            out.append(Msg(type: h.type, reqID: h.reqID, txID: h.txID, payload: p))
            i += 16 + Int(h.len)
        }
        return out
    }

    /// Sends one request, returns its reply; watch events stay queued in `events`.
    var events: [(path: String, token: String)] = []

    @discardableResult
    func send(_ type: XSType, _ payload: [UInt8], tx: UInt32 = 0) -> Msg {
        let id = reqID; reqID += 1
        let h = XSHeader(type, reqID: id, txID: tx, len: UInt32(payload.count))
        payload.withUnsafeBytes { core.process(conn, h, $0) }
        var reply: Msg? = nil
        for m in drain() {
            if m.type == XSType.watchEvent.rawValue {
                let f = m.fields
                events.append((f[0], f.count > 1 ? f[1] : ""))
            } else {
                #expect(m.reqID == id, "reply echoes the request id")
                reply = m
            }
        }
        // Events for this connection caused by its own request are queued after the reply.
        return reply!
    }

    func fields(_ s: [String]) -> [UInt8] { XSPayload.strings(s) }

    @discardableResult
    func write(_ path: String, _ value: String, tx: UInt32 = 0) -> String? {
        send(.write, Array(path.utf8) + [0] + Array(value.utf8), tx: tx).error
    }
    func read(_ path: String, tx: UInt32 = 0) -> Result<String, XSError> {
        let m = send(.read, fields([path]), tx: tx)
        if let e = m.error { return .failure(XSError(rawValue: e)!) }
        return .success(m.string)
    }
    func readError(_ path: String, tx: UInt32 = 0) -> String? { send(.read, fields([path]), tx: tx).error }
    @discardableResult
    func mkdir(_ path: String, tx: UInt32 = 0) -> String? { send(.mkdir, fields([path]), tx: tx).error }
    @discardableResult
    func rm(_ path: String, tx: UInt32 = 0) -> String? { send(.rm, fields([path]), tx: tx).error }
    func ls(_ path: String, tx: UInt32 = 0) -> [String]? {
        let m = send(.directory, fields([path]), tx: tx)
        if m.error != nil { return nil }
        return m.payload.isEmpty ? [] : m.fields
    }
    @discardableResult
    func setPerms(_ path: String, _ perms: [String]) -> String? { send(.setPerms, fields([path] + perms)).error }
    func getPerms(_ path: String) -> [String]? {
        let m = send(.getPerms, fields([path]))
        return m.error == nil ? m.fields : nil
    }
    @discardableResult
    func watch(_ path: String, _ token: String) -> String? { send(.watch, fields([path, token])).error }
    func txStart() -> UInt32 { UInt32(send(.transactionStart, [0]).fields[0])! }
    func txEnd(_ tx: UInt32, commit: Bool) -> String? { send(.transactionEnd, fields([commit ? "T" : "F"]), tx: tx).error }

    /// Collects events queued by others' requests.
    func pollEvents() -> [(path: String, token: String)] {
        for m in drain() where m.type == XSType.watchEvent.rawValue {
            let f = m.fields
            events.append((f[0], f[1]))
        }
        let e = events
        events.removeAll()
        return e
    }
}

// MARK: - the real daemon as a child process

enum Build {
    /// Directory holding the built executables: $XEN_BUILD_DIR, else <package>/.build/debug.
    static var productsDir: String {
        if let d = ProcessInfo.processInfo.environment["XEN_BUILD_DIR"] { return d }
        let here = URL(fileURLWithPath: #filePath)  // Tests/XenStoreTests/Support.swift
        return here.deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent(".build/debug").path
    }
}

/// A running xenstored with its own temporary socket; killed and cleaned up on deinit.
final class DaemonProcess {
    let dir: String
    let socketPath: String
    let process = Process()
    let stdoutPipe = Pipe()
    let stderrPipe = Pipe()

    init(extraArgs: [String] = []) throws {
        var template = Array("/tmp/xs-test-XXXXXX".utf8CString)
        guard let d = mkdtemp(&template) else { throw POSIXError(.EIO) }
        dir = String(cString: d)
        socketPath = dir + "/socket"
        process.executableURL = URL(fileURLWithPath: Build.productsDir + "/xenstored")
        process.arguments = ["--socket", socketPath, "--log-level", "warning"] + extraArgs
        process.standardOutput = stdoutPipe
        process.standardError = stderrPipe
        do {
            try process.run()
            try waitReady()
        } catch {
            cleanup()
            throw error
        }
    }

    /// Waits for the "xenstored ready" line (bounded).
    func waitReady() throws {
        let fd = stdoutPipe.fileHandleForReading.fileDescriptor
        var got: [UInt8] = []
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, 200) > 0 {
                var b = [UInt8](repeating: 0, count: 256)
                let n = read(fd, &b, 256)
                if n <= 0 { break }
                got += b[0..<n]
                if String(decoding: got, as: UTF8.self).contains("xenstored ready") { return }
            }
            if !process.isRunning { break }
        }
        throw DaemonError.notReady(String(decoding: got, as: UTF8.self) + stderrText())
    }

    func stderrText() -> String {
        let fd = stderrPipe.fileHandleForReading.fileDescriptor
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        var b = [UInt8](repeating: 0, count: 65536)
        let n = read(fd, &b, b.count)
        return n > 0 ? String(decoding: b[0..<n], as: UTF8.self) : ""
    }

    var isRunning: Bool { process.isRunning }

    func cleanup() {
        if process.isRunning {
            process.terminate()
            let deadline = Date().addingTimeInterval(3)
            while process.isRunning && Date() < deadline { usleep(10_000) }
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
        }
        unlink(socketPath)
        rmdir(dir)
    }

    deinit { cleanup() }

    enum DaemonError: Error { case notReady(String) }

    /// Runs a real client with XENSTORED_PATH pointing at this daemon.
    func run(_ tool: String, _ args: [String], timeout: Double = 20) -> (status: Int32, out: String, err: String) {
        runTool(tool, args, env: ["XENSTORED_PATH": socketPath], timeout: timeout)
    }

    /// Runs Debian's python3 (which sees python3-pyxs) on a script.
    func python(_ script: String) -> (status: Int32, out: String, err: String) {
        run("/usr/bin/python3", ["-c", script], timeout: 30)
    }
}

func runTool(_ tool: String, _ args: [String], env: [String: String], timeout: Double = 20) -> (status: Int32, out: String, err: String) {
    let r = CommandResult.run(tool, args, environment: env, timeout: timeout)
    return (r.status, r.out, r.err)
}

/// A raw xs_wire client over a Unix socket, for pipelining and protocol-abuse tests.
final class RawSocketClient {
    let fd: Int32
    init(path: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { b in
            for (i, c) in path.utf8.enumerated() { b[i] = c }
        }
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if r != 0 { close(fd); throw POSIXError(.ECONNREFUSED) }
        var tv = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }
    deinit { close(fd) }

    func sendRaw(_ bytes: [UInt8]) {
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }  // e.g. SIGCHLD from another test's child
            if n <= 0 { return }
            off += n
        }
    }

    static func message(_ type: XSType, _ payload: [UInt8], reqID: UInt32, tx: UInt32 = 0) -> [UInt8] {
        var out: [UInt8] = []
        XSHeader(type, reqID: reqID, txID: tx, len: UInt32(payload.count)).append(to: &out)
        return out + payload
    }

    func readExact(_ n: Int) -> [UInt8]? {
        var buf = [UInt8](repeating: 0, count: n)
        var got = 0
        while got < n {
            let r = buf[got...].withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress, $0.count, 0) }
            if r < 0 && errno == EINTR { continue }
            if r <= 0 { return nil }
            got += r
        }
        return buf
    }

    /// Next message, or nil on EOF/timeout.
    func receive() -> CoreClient.Msg? {
        guard let hb = readExact(16) else { return nil }
        let h = hb.withUnsafeBytes { XSHeader(from: $0.baseAddress!) }
        guard let p = h.len == 0 ? [] : readExact(Int(h.len)) else { return nil }
        return CoreClient.Msg(type: h.type, reqID: h.reqID, txID: h.txID, payload: p)
    }
}
