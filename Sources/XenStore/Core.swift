// The request dispatcher: one xs_wire message in, its reply (and any watch events)
// queued on connections. Transport-independent and single-threaded.
import Logging

public final class XenStoreCore {
    public let store = XSStore()
    var watches = XSWatchIndex()
    var connections: [Int: XSConnection] = [:]
    var domains: [DomID: XSDomain] = [:]
    var nextSerial = 1
    var nextTxID: UInt32 = 1
    /// Connections with output queued by someone else's request (watch events).
    var dirtyList: [XSConnection] = []

    public var defaultQuotas: XSQuotas
    /// Per-domain quota overrides.
    public var domainQuotas: [DomID: XSQuotas] = [:]
    public var ringProvider: XenstoreRingProvider?
    weak var ringHost: XSRingHost?
    public var logger: Logger

    /// The guest whose request is being processed (nil: dom0 or none).
    var cause: XSConnection?

    public init(quotas: XSQuotas = .default, logger: Logger = Logger(label: "xenstored")) {
        self.defaultQuotas = quotas
        self.logger = logger
    }

    public var watchCount: Int { watches.count }
    public var connectionCount: Int { connections.count }

    func log(_ level: Logger.Level, _ msg: @autoclosure () -> String) {
        logger.log(level: level, "\(msg())")
    }

    public func quotas(for domid: DomID) -> XSQuotas { domainQuotas[domid] ?? defaultQuotas }

    /// A new client acting as `domid`. Socket clients are dom0 and privileged.
    public func newConnection(domid: DomID, privileged: Bool) -> XSConnection {
        let c = XSConnection(serial: nextSerial, domid: domid, privileged: privileged, quotas: quotas(for: domid))
        c.core = self
        nextSerial += 1
        connections[c.serial] = c
        return c
    }

    /// Tears down a connection's state (transactions, watches). Idempotent.
    public func closeConnection(_ c: XSConnection, reason: String) {
        guard !c.closed else { return }
        c.closed = true
        c.closeReason = reason
        c.transactions.removeAll()
        removeAllWatches(c)
        c.dropOutput()
        connections[c.serial] = nil
        if c.domid != 0 || !c.privileged { log(.info, "connection \(c.serial) (dom\(c.domid)) closed: \(reason)") }
        if let d = domains[c.domid], d.conn === c {
            // The domain stays introduced (C xenstored ignores a broken ring until release).
            d.conn = nil
            ringHost?.detachRing(c)
        }
    }

    @inline(__always)
    func markDirty(_ c: XSConnection) {
        if !c.dirty { c.dirty = true; dirtyList.append(c) }
    }

    /// Drains the list of connections with output queued from elsewhere.
    func takeDirty() -> [XSConnection] {
        if dirtyList.isEmpty { return [] }
        let l = dirtyList
        dirtyList.removeAll(keepingCapacity: true)
        for c in l { c.dirty = false }
        return l
    }

    /// Drops watch events an unprivileged connection left undelivered longer than its
    /// quota's timeout (C xenstored's check_event_timeout, 20 s). The connection stays;
    /// dom0's events never expire.
    func expireStalled(now: Double) {
        for c in connections.values where !c.privileged {
            let n = c.dropExpiredEvents(now: now)
            if n > 0 { log(.info, "connection \(c.serial) (dom\(c.domid)): dropped \(n) stale watch event(s)") }
        }
    }

    // MARK: dispatch

    /// Handles one request; its reply is queued on `c`.
    public func process(_ c: XSConnection, _ h: XSHeader, _ payload: UnsafeRawBufferPointer) {
        // Watch events this request causes are charged to a guest.
        cause = c.privileged ? nil : c
        defer { cause = nil }
        do throws(XSError) {
            try dispatch(c, h, payload)
        } catch {
            c.enqueue(.error, reqID: h.reqID, txID: h.txID, error.wirePayload)
        }
    }

    @inline(__always)
    func transaction(_ c: XSConnection, _ h: XSHeader) throws(XSError) -> XSTransaction? {
        if h.txID == 0 { return nil }
        guard let t = c.transactions[h.txID] else { throw .ENOENT }
        return t
    }

    @inline(__always)
    func path(_ c: XSConnection, _ f: UnsafeRawBufferPointer, special: Bool = false) throws(XSError) -> (path: String, relative: Bool) {
        try XSPath.canonicalize(f, domid: c.domid, allowSpecial: special,
                                localLimit: c.privileged ? nil : c.quotas.maxPathLength)
    }

    /// The single argument of a one-string request: exactly one NUL, at the end
    /// (C xenstored's onearg), else EINVAL.
    @inline(__always)
    func onearg(_ p: UnsafeRawBufferPointer) throws(XSError) -> UnsafeRawBufferPointer {
        guard let i = p.firstIndex(of: 0), i == p.count - 1 else { throw .EINVAL }
        return UnsafeRawBufferPointer(rebasing: p[0..<i])
    }

    /// The NUL-terminated strings of a payload; bytes after the last NUL are ignored
    /// (C xenstored's get_strings).
    func strings(_ p: UnsafeRawBufferPointer) -> [UnsafeRawBufferPointer] {
        var f = XSPayload.split(p)
        if let last = p.last, last != 0 { f.removeLast() }
        return f
    }

    /// DIRECTORY_PART's offset as C's atoi reads it, without its undefined overflow:
    /// leading blanks and a sign are skipped, reading stops at the first non-digit
    /// (junk reads as 0); a negative or overlong number is past any list (Int.max).
    func childOffset(_ f: UnsafeRawBufferPointer) -> Int {
        var i = 0
        while i < f.count, f[i] == 0x20 || (0x09...0x0D).contains(f[i]) { i += 1 }
        var negative = false
        if i < f.count, f[i] == UInt8(ascii: "-") || f[i] == UInt8(ascii: "+") { negative = f[i] == UInt8(ascii: "-"); i += 1 }
        var v = 0
        while i < f.count, f[i] >= UInt8(ascii: "0"), f[i] <= UInt8(ascii: "9") {
            let (m, o1) = v.multipliedReportingOverflow(by: 10)
            let (a, o2) = m.addingReportingOverflow(Int(f[i] - UInt8(ascii: "0")))
            if o1 || o2 { return Int.max }
            v = a
            i += 1
        }
        return negative && v != 0 ? Int.max : v
    }

    func record(_ change: XSChange?, _ tx: XSTransaction?) {
        guard let change else { return }
        if let tx { tx.announce(change) } else { fire(change) }
    }

    /// Checks in C xenstored's process_message order: unknown type (ENOSYS), then
    /// privilege (EACCES), then the transaction id (ENOENT; WATCH/UNWATCH ignore it).
    func dispatch(_ c: XSConnection, _ h: XSHeader, _ p: UnsafeRawBufferPointer) throws(XSError) {
        guard let type = XSType(rawValue: h.type), type != .watchEvent, type != .error else { throw .ENOSYS }
        if type.privilegedOnly && !c.privileged { throw .EACCES }
        let tx = type == .watch || type == .unwatch ? nil : try transaction(c, h)
        let r = h.reqID
        switch type {
        case .read:
            let (path, _) = try self.path(c, onearg(p))
            if tx == nil, let n = store.nodes[path] {
                // Hot path: no transaction, node present; no copies beyond the reply.
                guard c.caller.access(n.perms).contains(.read) else { throw .EACCES }
                n.value.withUnsafeBytes { c.enqueue(.read, reqID: r, txID: 0, $0) }
                return
            }
            let v = try store.read(path, c.caller, tx)
            c.enqueue(.read, reqID: r, txID: h.txID, v)

        case .write:
            guard let nul = p.firstIndex(of: 0) else { throw .EINVAL }
            let (path, _) = try self.path(c, UnsafeRawBufferPointer(rebasing: p[0..<nul]))
            let value = Array(UnsafeRawBufferPointer(rebasing: p[(nul + 1)...]))
            record(try store.write(path, value, c.caller, tx), tx)
            c.enqueueOK(.write, reqID: r, txID: h.txID)

        case .mkdir:
            let (path, _) = try self.path(c, onearg(p))
            record(try store.mkdir(path, c.caller, tx), tx)
            c.enqueueOK(.mkdir, reqID: r, txID: h.txID)

        case .rm:
            let (path, _) = try self.path(c, onearg(p))
            for change in try store.rm(path, c.caller, tx) { record(change, tx) }
            c.enqueueOK(.rm, reqID: r, txID: h.txID)

        case .directory:
            let (path, _) = try self.path(c, onearg(p))
            let n = try store.directory(path, c.caller, tx)
            let blob = n.childrenBlob()
            if blob.count > c.quotas.maxPayload { throw .E2BIG }
            c.enqueue(.directory, reqID: r, txID: h.txID, blob)

        case .directoryPart:
            // Exactly two NULs (xenstore_count_strings): path and offset.
            let f = strings(p)
            guard f.count == 2 else { throw .EINVAL }
            let (path, _) = try self.path(c, f[0])
            let n = try store.directory(path, c.caller, tx)
            let off = childOffset(f[1])
            let blob = n.childrenBlob()
            var reply = Array("\(n.generation)".utf8) + [0]
            if off >= blob.count {
                // At or past the end: the generation and an empty list.
                reply.append(0)
                c.enqueue(.directoryPart, reqID: r, txID: h.txID, reply)
                return
            }
            let room = c.quotas.maxPayload - reply.count - 1
            // Whole names only; a final extra NUL marks the end of the list.
            var end = off
            var i = off
            while i < blob.count {
                var j = i
                while blob[j] != 0 { j += 1 }
                if j + 1 - off > room { break }
                end = j + 1
                i = j + 1
            }
            if end == off && off < blob.count { throw .E2BIG }
            reply.append(contentsOf: blob[off..<end])
            if end == blob.count { reply.append(0) }
            c.enqueue(.directoryPart, reqID: r, txID: h.txID, reply)

        case .getPerms:
            let (path, _) = try self.path(c, onearg(p), special: true)
            c.enqueue(.getPerms, reqID: r, txID: h.txID, try store.getPerms(path, c.caller, tx).wire)

        case .setPerms:
            let f = strings(p)
            guard f.count >= 2 else { throw .EINVAL }
            // The permission count is checked before anything else (do_set_perms).
            if !c.privileged && f.count - 1 > c.quotas.maxPerms { throw .ENOSPC }
            let (path, _) = try self.path(c, f[0], special: true)
            var entries: [XSPerm] = []
            for x in f[1...] {
                guard let e = XSPerm(Substring(String(xsBytes: x))) else { throw .EINVAL }
                entries.append(e)
            }
            guard let perms = XSPermissions(entries: entries) else { throw .EINVAL }
            record(try store.setPerms(path, perms, c.caller, tx), tx)
            c.enqueueOK(.setPerms, reqID: r, txID: h.txID)

        case .watch:
            let f = strings(p)
            guard f.count == 2 else { throw .EINVAL }
            let (path, relative) = try self.path(c, f[0], special: true)
            let token = Array(f[1])
            try addWatch(c, path: path, token: token, relative: relative)
            c.enqueueOK(.watch, reqID: r, txID: h.txID)
            // Fired once up front, after the reply (C xenstored does the same).
            if let w = c.watches.last { queueEvent(w, path: path) }

        case .unwatch:
            let f = strings(p)
            guard f.count == 2 else { throw .EINVAL }
            let (path, _) = try self.path(c, f[0], special: true)
            try removeWatch(c, path: path, token: Array(f[1]))
            c.enqueueOK(.unwatch, reqID: r, txID: h.txID)

        case .resetWatches:
            removeAllWatches(c)
            c.transactions.removeAll()
            c.enqueueOK(.resetWatches, reqID: r, txID: h.txID)

        case .transactionStart:
            if tx != nil { throw .EBUSY }
            if !c.privileged && c.transactions.count >= c.quotas.maxTransactions { throw .ENOSPC }
            var id = nextTxID
            while id == 0 || c.transactions[id] != nil { id &+= 1 }
            nextTxID = id &+ 1
            c.transactions[id] = store.begin(id: id, for: c.caller)
            c.enqueue(.transactionStart, reqID: r, txID: 0, Array("\(id)".utf8) + [0])

        case .transactionEnd:
            let arg = try onearg(p)
            guard arg.count == 1, arg[0] == UInt8(ascii: "T") || arg[0] == UInt8(ascii: "F") else { throw .EINVAL }
            guard let t = tx else { throw .ENOENT }
            c.transactions[h.txID] = nil
            if arg[0] == UInt8(ascii: "T") {
                for ch in try store.commit(t, maxNodes: c.privileged ? nil : c.quotas.maxNodes) { fire(ch) }
            }
            c.enqueueOK(.transactionEnd, reqID: r, txID: h.txID)

        case .introduce:
            let f = strings(p)
            guard f.count >= 3 else { throw .EINVAL }
            let domid = try parseDomid(f[0])
            let mfn = try parseUInt(f[1])
            let port = try parseUInt(f[2])
            guard port <= UInt64(UInt32.max) else { throw .EINVAL }
            try introduce(domid: domid, mfn: mfn, port: UInt32(port))
            c.enqueueOK(.introduce, reqID: r, txID: h.txID)

        case .release:
            let domid = try parseDomid(onearg(p))
            if domid == 0 { throw .EINVAL }
            try releaseDomain(domid)
            c.enqueueOK(.release, reqID: r, txID: h.txID)

        case .resume:
            // C do_resume (onearg_domain): dom0 is EINVAL; the domain runs
            // again, so its next shutdown fires @releaseDomain again.
            let domid = try parseDomid(onearg(p))
            if domid == 0 { throw .EINVAL }
            guard let d = domains[domid] else { throw .ENOENT }
            d.shutdown = false
            c.enqueueOK(.resume, reqID: r, txID: h.txID)

        case .isDomainIntroduced:
            let domid = try parseDomid(onearg(p))
            let yes = isIntroduced(domid)
            c.enqueue(.isDomainIntroduced, reqID: r, txID: h.txID, [yes ? UInt8(ascii: "T") : UInt8(ascii: "F"), 0])

        case .getDomainPath:
            let domid = try parseDomid(onearg(p))
            c.enqueue(.getDomainPath, reqID: r, txID: h.txID, Array(XSPath.domainPath(domid).utf8) + [0])

        case .setTarget:
            let f = strings(p)
            guard f.count >= 2 else { throw .EINVAL }
            let domid = try parseDomid(f[0])
            let target = try parseDomid(f[1])
            guard let d = domains[domid], domains[target] != nil else { throw .ENOENT }
            d.conn?.target = target
            c.enqueueOK(.setTarget, reqID: r, txID: h.txID)

        case .control:
            let f = strings(p)
            guard let cmd = f.first else { throw .EINVAL }
            let args = f.dropFirst().map { String(xsBytes: $0) }
            let reply = try control(String(xsBytes: cmd), args)
            c.enqueue(.control, reqID: r, txID: h.txID, Array(reply.utf8) + [0])

        case .watchEvent, .error:
            throw .ENOSYS
        }
    }

    /// XS_CONTROL commands (a subset of xenstore-control's): print, quota, help.
    func control(_ cmd: String, _ args: [String]) throws(XSError) -> String {
        switch cmd {
        case "print":
            log(.notice, "control print: \(args.joined(separator: " "))")
            return "OK"
        case "help":
            return "print <string>\nquota\nquota <domid>\nhelp\n"
        case "quota":
            if let a = args.first {
                guard let d = DomID(a), d < 0x7FF0 else { throw .EINVAL }
                let n = store.ownedCount(d, nil)
                return "Domain \(d): nodes \(n), watches \(domainWatchCount(d)), transactions \(connections.values.filter { $0.domid == d }.reduce(0) { $0 + $1.transactions.count })\n"
            }
            let q = defaultQuotas
            return "nodes \(q.maxNodes)\nnode-size \(q.maxNodeSize)\nwatches \(q.maxWatches)\ntransactions \(q.maxTransactions)\noutstanding \(q.maxOutstanding)\npermissions \(q.maxPerms)\npath-max \(q.maxPathLength)\n"
        default:
            throw .EINVAL
        }
    }
}
