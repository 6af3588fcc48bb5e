// Watches (docs/misc/xenstore.txt WATCH/UNWATCH/WATCH_EVENT): a watch on P fires for
// changes to P and anything below it, and once when registered. Removal of a subtree
// also fires the watches set exactly on each removed node below it. Watches are
// indexed by path so a change costs one lookup per ancestor, not a scan of every
// watch.

import CXen
import XenHV

final class XSWatch {
    unowned let conn: XSConnection
    let path: String
    /// The token's bytes as the client sent them (echoed unchanged, as C does).
    let token: [UInt8]
    /// Registered with a relative path: events report paths relative to the domain home.
    let relative: Bool

    init(conn: XSConnection, path: String, token: [UInt8], relative: Bool) {
        self.conn = conn; self.path = path; self.token = token; self.relative = relative
    }
}

struct XSWatchIndex {
    private(set) var byPath: [String: [XSWatch]] = [:]
    private(set) var count = 0

    mutating func add(_ w: XSWatch) {
        byPath[w.path, default: []].append(w)
        count += 1
    }

    mutating func remove(_ w: XSWatch) {
        guard var list = byPath[w.path], let i = list.firstIndex(where: { $0 === w }) else { return }
        list.remove(at: i)
        byPath[w.path] = list.isEmpty ? nil : list
        count -= 1
    }

    /// Calls `body(watch, reportedPath)` for every watch a change at `path` fires.
    func matches(_ change: XSChange, _ body: (XSWatch, String) -> Void) {
        let path = change.path
        if change.exact || path.utf8.first == UInt8(ascii: "@") {
            byPath[path]?.forEach { body($0, path) }
            return
        }
        // The node itself and its ancestors.
        var p: String? = path
        while let q = p {
            if let list = byPath[q] { for w in list { body(w, path) } }
            p = XSPath.parent(q)
        }
    }
}

extension XenStoreCore {
    /// Queues the WATCH_EVENT messages a change causes, to watchers that may read
    /// (C's watch_permitted) the node under its old permissions, or under its current
    /// ones, or its parent. A special (@) node's parent is "/".
    func fire(_ change: XSChange) {
        guard watches.count > 0 else { return }
        let special = change.path.utf8.first == UInt8(ascii: "@")
        let perms = change.perms
        var now: Double?  // for guests' events' expiry: read once, when first needed
        var parentPerms = change.parentPerms
        var parentLooked = parentPerms != nil
        watches.matches(change) { w, reported in
            let c = w.conn
            if c.closed { return }
            let caller = c.caller
            var ok = caller.access(perms).contains(.read)
                || change.oldPerms.map { caller.access($0).contains(.read) } ?? false
            if !ok {
                if !parentLooked {
                    let parent = special ? "/" : XSPath.parent(change.path)
                    parentPerms = parent.flatMap { store.nodes[$0]?.perms }
                    parentLooked = true
                }
                ok = parentPerms.map { caller.access($0).contains(.read) } ?? false
            }
            if !ok { return }
            if now == nil && !c.privileged { now = monotonicSeconds() }
            queueEvent(w, path: reported, now: now ?? 0)
        }
    }

    /// Fires the watches on special node `name` (@introduceDomain,
    /// @releaseDomain), which exists for good, under its permissions (dom0 may
    /// grant read: C's fire_special_watches reads the node).
    func fireSpecial(_ name: String) {
        guard let perms = store.nodes[name]?.perms else { return }
        fire(XSChange(path: name, exact: false, perms: perms))
    }

    /// Queues one WATCH_EVENT as C xenstored's send_event does: an event longer than
    /// XENSTORE_PAYLOAD_MAX or identical to one still pending is not sent; for an
    /// unprivileged watcher, nor is one past its output quota, and the event expires
    /// undelivered after the quota's timeout (`now` matters only then). No
    /// connection is closed for its backlog.
    func queueEvent(_ w: XSWatch, path: String, now: Double = monotonicSeconds()) {
        let c = w.conn
        let shown = w.relative ? XSPath.relativize(path, domid: c.domid) : path
        let len = shown.utf8.count + w.token.count + 2
        if len > Int(XENSTORE_PAYLOAD_MAX) { return }
        // Past the output quota: dropped before anything is built for it.
        if !c.privileged && c.pendingBytes + XSHeader.size + len > c.quotas.maxOutputBytes { return }
        var body: [UInt8] = []
        body.reserveCapacity(len)
        body.append(contentsOf: shown.utf8); body.append(0)
        body.append(contentsOf: w.token); body.append(0)
        // An event for dom0, which is never dropped, is charged to the guest
        // that caused it (an unprivileged watcher's are bounded by its own
        // quota and timeout, so no guest can hold another back by not reading).
        let queued = c.enqueueEvent(body, dedupe: shown.utf8.first != UInt8(ascii: "@"),
                                    expires: c.privileged || c.quotas.watchEventTimeout <= 0
                                        ? 0 : now + c.quotas.watchEventTimeout,
                                    cause: c.privileged ? cause : nil)
        if queued { markDirty(c) }
    }

    func addWatch(_ c: XSConnection, path: String, token: [UInt8], relative: Bool) throws(XSError) {
        // Anyone may watch @introduceDomain / @releaseDomain (do_watch); later events
        // reach only those who may read the node (fire).
        if c.watches.contains(where: { $0.path == path && $0.token == token }) { throw .EEXIST }
        if !c.privileged && domainWatchCount(c.domid) >= c.quotas.maxWatches { throw .E2BIG }
        let w = XSWatch(conn: c, path: path, token: token, relative: relative)
        c.watches.append(w)
        watches.add(w)
    }

    func removeWatch(_ c: XSConnection, path: String, token: [UInt8]) throws(XSError) {
        guard let i = c.watches.firstIndex(where: { $0.path == path && $0.token == token }) else { throw .ENOENT }
        watches.remove(c.watches[i])
        c.watches.remove(at: i)
    }

    func removeAllWatches(_ c: XSConnection) {
        for w in c.watches { watches.remove(w) }
        c.watches.removeAll()
    }

    func domainWatchCount(_ d: DomID) -> Int {
        var n = 0
        for c in connections.values where c.domid == d { n += c.watches.count }
        return n
    }
}
