// The XenBus client: xs_wire requests over any transport, replies matched by request
// id, watch events delivered as async sequences or callbacks. Mirrors libxenstore's
// xs_* calls (tools/libs/store/xs.c) in behaviour.
import Foundation
import Glibc
import func XenHV.monotonicSeconds
import XenStore

public struct XenBusWatchEvent: Sendable, Equatable {
    public var path: String
    public var token: String
}

/// A registered watch. Iterate it for events, or pass a callback when registering.
public final class XenBusWatch: AsyncSequence, Sendable {
    public typealias Element = XenBusWatchEvent
    public let path: String
    public let token: String
    let stream: AsyncStream<XenBusWatchEvent>
    let continuation: AsyncStream<XenBusWatchEvent>.Continuation
    let callback: (@Sendable (XenBusWatchEvent) -> Void)?

    init(path: String, token: String, callback: (@Sendable (XenBusWatchEvent) -> Void)?) {
        self.path = path; self.token = token; self.callback = callback
        // A slow consumer keeps the newest events only: memory stays bounded.
        (stream, continuation) = AsyncStream.makeStream(bufferingPolicy: .bufferingNewest(4096))
    }

    func deliver(_ e: XenBusWatchEvent) {
        if let callback { callback(e) } else { continuation.yield(e) }
    }

    public func makeAsyncIterator() -> AsyncStream<XenBusWatchEvent>.AsyncIterator { stream.makeAsyncIterator() }
}

public final class XenBusClient: @unchecked Sendable {
    let transport: XenBusTransport
    let cond = Condition()
    // Guarded by `cond`:
    var nextReqID: UInt32 = 1
    var pending: [UInt32: Reply?] = [:]
    var watches: [String: XenBusWatch] = [:]
    var closed = false
    var nextToken = 1
    let sendLock = Lock()
    var reader: Thread?

    struct Reply { var type: UInt32; var txID: UInt32; var payload: [UInt8] }

    /// Default per-request timeout (seconds); nil waits forever.
    public var timeout: Double? = 30

    public init(transport: XenBusTransport) {
        self.transport = transport
        // The reader keeps the client alive until the connection ends: call close()
        // (like xs_close) when done.
        let t = Thread { self.readLoop() }
        t.name = "xenbus-reader"
        reader = t
        t.start()
    }

    /// Connects to xenstored's socket (dom0 tools and backends).
    public static func connect(socketPath: String = XenBusSocketTransport.defaultPath) throws(XenBusError) -> XenBusClient {
        XenBusClient(transport: try XenBusSocketTransport(path: socketPath))
    }

    /// Talks to xenstored over a guest's ring (frontends).
    public static func guest(_ port: XenBusRingPort) -> XenBusClient {
        XenBusClient(transport: XenBusRingTransport(port: port))
    }

    public func close() {
        cond.lock()
        let was = closed
        closed = true
        let ws = Array(watches.values)
        watches.removeAll()
        cond.broadcast()
        cond.unlock()
        if !was {
            transport.close()
            for w in ws { w.continuation.finish() }
        }
    }

    public var isClosed: Bool { cond.lock(); defer { cond.unlock() }; return closed }

    // MARK: reader

    func readLoop() {
        var buf = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 8192)
        while true {
            let n: Int
            do {
                n = try chunk.withUnsafeMutableBytes { (b) throws(XenBusError) in try transport.receive(into: b) }
            } catch {
                break
            }
            buf.append(contentsOf: chunk[0..<n])
            var head = 0
            while buf.count - head >= XSHeader.size {
                let h = buf.withUnsafeBytes { XSHeader(from: $0.baseAddress! + head) }
                guard h.len <= 65536 else { head = buf.count; close(); break }
                let total = XSHeader.size + Int(h.len)
                if buf.count - head < total { break }
                let payload = Array(buf[(head + XSHeader.size)..<(head + total)])
                head += total
                if h.type == XSType.watchEvent.rawValue {
                    dispatchEvent(payload)
                } else {
                    cond.lock()
                    if pending.index(forKey: h.reqID) != nil {
                        pending[h.reqID] = .some(Reply(type: h.type, txID: h.txID, payload: payload))
                        cond.broadcast()
                    }
                    cond.unlock()
                }
            }
            if head > 0 { buf.removeSubrange(0..<head) }
        }
        close()
        // Break the client -> thread -> client cycle: once the reader is done, the
        // client (and the transport's descriptor) goes when its users drop it.
        cond.lock()
        reader = nil
        cond.unlock()
    }

    func dispatchEvent(_ payload: [UInt8]) {
        let f = payload.split(separator: 0, omittingEmptySubsequences: false)
        guard f.count >= 2 else { return }
        let e = XenBusWatchEvent(path: String(decoding: f[0], as: UTF8.self), token: String(decoding: f[1], as: UTF8.self))
        cond.lock()
        let w = watches[e.token]
        cond.unlock()
        w?.deliver(e)
    }

    // MARK: requests

    /// Sends one request and waits for its reply; XS_ERROR becomes `.xs(errno)`.
    public func request(_ type: XSType, _ payload: [UInt8], tx: UInt32 = 0) throws(XenBusError) -> [UInt8] {
        guard payload.count <= 4096 else { throw .xs(.E2BIG) }
        let id = try newRequestID(awaited: true)
        do {
            try send(type, payload, id: id, tx: tx)
        } catch {
            cond.lock(); pending[id] = nil; cond.unlock()
            throw error
        }
        let deadline = timeout.map { monotonicSeconds() + $0 }
        cond.lock()
        defer { cond.unlock() }
        while true {
            if case .some(.some(let r)) = pending[id] {
                pending[id] = nil
                if r.type == XSType.error.rawValue {
                    let name = String(decoding: r.payload.prefix { $0 != 0 }, as: UTF8.self)
                    throw .xs(XSError(rawValue: name) ?? .EINVAL)
                }
                guard r.type == type.rawValue else { throw .protocolViolation("reply type \(r.type) to \(type)") }
                return r.payload
            }
            if closed { pending[id] = nil; throw .closed }
            if !cond.wait(until: deadline), let d = deadline, monotonicSeconds() >= d {
                pending[id] = nil
                throw .timeout
            }
        }
    }

    /// A request id no request in flight has; `awaited` registers it for its reply.
    private func newRequestID(awaited: Bool) throws(XenBusError) -> UInt32 {
        cond.lock()
        defer { cond.unlock() }
        if closed { throw .closed }
        var id = nextReqID
        while pending.index(forKey: id) != nil { id &+= 1 }
        nextReqID = id &+ 1
        if awaited { pending[id] = .some(nil) }
        return id
    }

    private func send(_ type: XSType, _ payload: [UInt8], id: UInt32, tx: UInt32) throws(XenBusError) {
        var msg: [UInt8] = []
        msg.reserveCapacity(XSHeader.size + payload.count)
        XSHeader(type, reqID: id, txID: tx, len: UInt32(payload.count)).append(to: &msg)
        msg.append(contentsOf: payload)
        let sent: Result<Void, XenBusError> = sendLock.withLock {
            msg.withUnsafeBytes { b in
                do throws(XenBusError) { try transport.send(b); return .success(()) } catch { return .failure(error) }
            }
        }
        try sent.get()
    }

    /// Sends a request whose reply nobody waits for (the reader drops it).
    func post(_ type: XSType, _ payload: [UInt8]) {
        guard let id = try? newRequestID(awaited: false) else { return }
        try? send(type, payload, id: id, tx: 0)
    }

    static func strings(_ s: [String]) -> [UInt8] { XSPayload.strings(s) }

    func ok(_ type: XSType, _ payload: [UInt8], tx: UInt32) throws(XenBusError) {
        _ = try request(type, payload, tx: tx)
    }

    // MARK: the xs_* operations

    public func readBytes(_ path: String, tx: UInt32 = 0) throws(XenBusError) -> [UInt8] {
        try request(.read, Self.strings([path]), tx: tx)
    }
    public func read(_ path: String, tx: UInt32 = 0) throws(XenBusError) -> String {
        String(decoding: try readBytes(path, tx: tx), as: UTF8.self)
    }
    /// nil if the node does not exist.
    public func readIfExists(_ path: String, tx: UInt32 = 0) throws(XenBusError) -> String? {
        do { return try read(path, tx: tx) } catch .xs(.ENOENT) { return nil }
    }
    public func write(_ path: String, _ value: String, tx: UInt32 = 0) throws(XenBusError) {
        try write(path, bytes: Array(value.utf8), tx: tx)
    }
    public func write(_ path: String, bytes: [UInt8], tx: UInt32 = 0) throws(XenBusError) {
        try ok(.write, Array(path.utf8) + [0] + bytes, tx: tx)
    }
    public func mkdir(_ path: String, tx: UInt32 = 0) throws(XenBusError) {
        try ok(.mkdir, Self.strings([path]), tx: tx)
    }
    public func rm(_ path: String, tx: UInt32 = 0) throws(XenBusError) {
        try ok(.rm, Self.strings([path]), tx: tx)
    }
    public func exists(_ path: String, tx: UInt32 = 0) throws(XenBusError) -> Bool {
        do { _ = try readBytes(path, tx: tx); return true } catch .xs(.ENOENT) { return false }
    }
    /// Children names (falls back to DIRECTORY_PART for large directories, like xs_directory).
    public func directory(_ path: String, tx: UInt32 = 0) throws(XenBusError) -> [String] {
        do {
            return Self.split(try request(.directory, Self.strings([path]), tx: tx))
        } catch .xs(.E2BIG) {
            var all: [UInt8] = []
            var gen: [UInt8]? = nil
            var attempts = 0
            while attempts < 100 {
                attempts += 1
                let r = try request(.directoryPart, Self.strings([path, "\(all.count)"]), tx: tx)
                guard let nul = r.firstIndex(of: 0) else { throw .protocolViolation("directory part") }
                let g = Array(r[..<nul])
                if let gen, gen != g { all.removeAll(); continue }  // changed meanwhile: restart
                gen = g
                let rest = r[(nul + 1)...]
                all += rest
                if rest.count <= 1 || (rest.count >= 2 && rest[rest.endIndex - 2] == 0) {
                    if all.last == 0 && all.count >= 2 && all[all.count - 2] == 0 { all.removeLast() }
                    return Self.split(all)
                }
            }
            throw .xs(.EAGAIN)
        }
    }
    public func getPermissions(_ path: String, tx: UInt32 = 0) throws(XenBusError) -> [XSPerm] {
        try Self.split(try request(.getPerms, Self.strings([path]), tx: tx)).map { (s) throws(XenBusError) -> XSPerm in
            guard let p = XSPerm(Substring(s)) else { throw .protocolViolation("permission \(s)") }
            return p
        }
    }
    public func setPermissions(_ path: String, _ perms: [XSPerm], tx: UInt32 = 0) throws(XenBusError) {
        try ok(.setPerms, Self.strings([path] + perms.map(\.string)), tx: tx)
    }
    public func getDomainPath(_ domid: DomID) throws(XenBusError) -> String {
        Self.split(try request(.getDomainPath, Self.strings(["\(domid)"]))).first ?? ""
    }
    public func isDomainIntroduced(_ domid: DomID) throws(XenBusError) -> Bool {
        Self.split(try request(.isDomainIntroduced, Self.strings(["\(domid)"]))).first != "F"
    }
    /// XS_INTRODUCE (toolstack): the daemon resolves (mfn, port) to the guest's ring.
    public func introduce(domid: DomID, mfn: UInt64, port: UInt32) throws(XenBusError) {
        try ok(.introduce, Self.strings(["\(domid)", "\(mfn)", "\(port)"]), tx: 0)
    }
    public func release(domid: DomID) throws(XenBusError) {
        try ok(.release, Self.strings(["\(domid)"]), tx: 0)
    }
    public func resume(domid: DomID) throws(XenBusError) {
        try ok(.resume, Self.strings(["\(domid)"]), tx: 0)
    }
    public func setTarget(domid: DomID, target: DomID) throws(XenBusError) {
        try ok(.setTarget, Self.strings(["\(domid)", "\(target)"]), tx: 0)
    }
    public func resetWatches() throws(XenBusError) {
        try ok(.resetWatches, [], tx: 0)
        cond.lock()
        let ws = Array(watches.values)
        watches.removeAll()
        cond.unlock()
        for w in ws { w.continuation.finish() }
    }
    public func control(_ command: String, _ args: [String] = []) throws(XenBusError) -> String {
        String(decoding: try request(.control, Self.strings([command] + args)).prefix { $0 != 0 }, as: UTF8.self)
    }

    static func split(_ b: [UInt8]) -> [String] {
        var b = b[...]
        if b.last == 0 { b = b.dropLast() }
        if b.isEmpty { return [] }
        return b.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
    }

    // MARK: watches

    /// Registers a watch. The first event (the registration event) arrives at once.
    /// Without a callback, iterate the returned watch (`for await e in watch`).
    public func watch(_ path: String, token: String? = nil,
                      callback: (@Sendable (XenBusWatchEvent) -> Void)? = nil) throws(XenBusError) -> XenBusWatch {
        cond.lock()
        let tok = token ?? "xb\(nextToken)"
        nextToken += 1
        let w = XenBusWatch(path: path, token: tok, callback: callback)
        if watches[tok] != nil { cond.unlock(); throw .xs(.EEXIST) }
        watches[tok] = w
        cond.unlock()
        do {
            try ok(.watch, Self.strings([path, tok]), tx: 0)
        } catch {
            cond.lock(); watches[tok] = nil; cond.unlock()
            // Unanswered is not refused: xenstored may yet register it, and
            // would then count it against our watch quota for good.
            if error == .timeout { post(.unwatch, Self.strings([path, tok])) }
            throw error
        }
        return w
    }

    public func unwatch(_ w: XenBusWatch) throws(XenBusError) {
        cond.lock(); watches[w.token] = nil; cond.unlock()
        w.continuation.finish()
        try ok(.unwatch, Self.strings([w.path, w.token]), tx: 0)
    }

    // MARK: transactions

    public func transactionStart() throws(XenBusError) -> UInt32 {
        let r = Self.split(try request(.transactionStart, [0]))
        guard let s = r.first, let id = UInt32(s), id != 0 else { throw .protocolViolation("transaction id") }
        return id
    }

    /// Ends a transaction; committing may throw `.xs(.EAGAIN)` on conflict.
    public func transactionEnd(_ tx: UInt32, commit: Bool) throws(XenBusError) {
        try ok(.transactionEnd, Self.strings([commit ? "T" : "F"]), tx: tx)
    }

    /// Runs `body` in a transaction and commits, retrying the whole body when the
    /// commit reports EAGAIN (as every libxenstore user does by hand). An error thrown
    /// by the body aborts the transaction.
    public func transaction<T>(maxAttempts: Int = 16, _ body: (XenBusTransaction) throws -> T) throws -> T {
        var attempt = 0
        while true {
            attempt += 1
            let id = try transactionStart()
            let t = XenBusTransaction(client: self, id: id)
            let result: T
            do {
                result = try body(t)
            } catch {
                try? transactionEnd(id, commit: false)
                throw error
            }
            let end: XenBusError?
            do throws(XenBusError) {
                try transactionEnd(id, commit: true)
                end = nil
            } catch {
                end = error
            }
            guard let end else { return result }
            if end == .xs(.EAGAIN) && attempt < maxAttempts { continue }
            throw end
        }
    }
}

/// Operations bound to one transaction.
public struct XenBusTransaction: Sendable {
    public let client: XenBusClient
    public let id: UInt32
    public func read(_ path: String) throws(XenBusError) -> String { try client.read(path, tx: id) }
    public func readIfExists(_ path: String) throws(XenBusError) -> String? { try client.readIfExists(path, tx: id) }
    public func write(_ path: String, _ value: String) throws(XenBusError) { try client.write(path, value, tx: id) }
    public func mkdir(_ path: String) throws(XenBusError) { try client.mkdir(path, tx: id) }
    public func rm(_ path: String) throws(XenBusError) { try client.rm(path, tx: id) }
    public func directory(_ path: String) throws(XenBusError) -> [String] { try client.directory(path, tx: id) }
    public func setPermissions(_ path: String, _ perms: [XSPerm]) throws(XenBusError) {
        try client.setPermissions(path, perms, tx: id)
    }
}
