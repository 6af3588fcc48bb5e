// The store core: node lookups and the mutating operations, with permission checks
// and node quotas, for the live tree or inside a transaction. Mirrors
// tools/xenstored/core.c (get_node, create_node, do_write, do_mkdir, do_rm,
// do_set_perms) in semantics, not in code.

public final class XSStore {
    var nodes: [String: XSNode] = [:]
    /// Nodes owned per domain (for the node quota).
    var owned: [DomID: Int] = [:]
    var generation: UInt64 = 1

    public init() {
        // The tree C xenstored starts with (setup_structure): /, /tool, /tool/xenstored,
        // and the special nodes, outside the tree, whose permissions decide who hears
        // their watch events.
        let rootPerms = XSPermissions(owner: 0)
        nodes["/"] = XSNode(perms: rootPerms, children: ["tool"])
        nodes["/tool"] = XSNode(perms: rootPerms, children: ["xenstored"])
        nodes["/tool/xenstored"] = XSNode(perms: rootPerms)
        for s in XSStore.specialNodes { nodes[s] = XSNode(perms: rootPerms) }
        owned[0] = 5
    }

    public var nodeCount: Int { nodes.count }

    static let specialNodes = ["@introduceDomain", "@releaseDomain"]

    // MARK: views

    /// The node at `path` as the caller sees it. Inside a transaction the first access
    /// records the node (present or not) and takes the transaction's copy, charged
    /// in full: once the live node is rewritten the copy is the transaction's alone
    /// (C writes it to the transaction's database and charges the domain). An
    /// unprivileged caller's access past the transaction's node or byte budget is
    /// ENOSPC and fails the transaction (C: access_node), nothing is recorded.
    @inline(__always)
    func node(_ path: String, _ tx: XSTransaction?, _ c: XSCaller) throws(XSError) -> XSNode? {
        guard let tx else { return nodes[path] }
        if let a = tx.accessed[path] { return a.node }
        let n = nodes[path]
        let cost = tx.byteLimit == nil ? 0 : path.utf8.count + XSTransaction.entryOverhead + (n?.chargedSize ?? 0)
        if !c.privileged && (tx.accessed.count >= c.quotas.maxTransactionNodes || tx.bytes + cost > tx.byteLimit ?? .max) {
            tx.failed = true
            throw .ENOSPC
        }
        tx.accessed[path] = XSTransaction.Access(generation: n?.generation, node: n, modified: false)
        tx.bytes += cost
        return n
    }

    @inline(__always)
    func put(_ path: String, _ n: XSNode?, _ tx: XSTransaction?) {
        guard let tx else { nodes[path] = n; return }
        // Every path written was looked up through node() first, so it is recorded.
        let counted = tx.byteLimit != nil
        if var a = tx.accessed[path] {
            if counted { tx.bytes -= a.node?.chargedSize ?? 0 }  // charged when read, or when last put
            a.node = n
            a.modified = true
            tx.accessed[path] = a
        } else {
            tx.accessed[path] = XSTransaction.Access(generation: nodes[path]?.generation, node: n, modified: true)
            if counted { tx.bytes += path.utf8.count + XSTransaction.entryOverhead }
        }
        if counted { tx.bytes += n?.chargedSize ?? 0 }
    }

    @inline(__always)
    func nextGeneration() -> UInt64 { generation &+= 1; return generation }

    func ownedCount(_ d: DomID, _ tx: XSTransaction?) -> Int {
        (owned[d] ?? 0) + (tx?.nodeDelta[d] ?? 0)
    }

    func adjustOwned(_ d: DomID, _ delta: Int, _ tx: XSTransaction?) {
        if let tx { tx.nodeDelta[d, default: 0] += delta } else { owned[d, default: 0] += delta }
    }

    // MARK: lookup with C xenstored's error rules

    /// Gets a node the caller may access with `need`. A missing node gives ENOENT if the
    /// closest existing ancestor grants any of `need`, else EACCES (errno_from_parents),
    /// so a guest cannot probe trees it cannot read.
    public func get(_ path: String, need: XSAccess, _ c: XSCaller, _ tx: XSTransaction?) throws(XSError) -> XSNode {
        if let n = try node(path, tx, c) {
            guard c.access(n.perms).isSuperset(of: need) else { throw .EACCES }
            return n
        }
        throw errorFromParents(path, need: need, c, tx)
    }

    /// The error for a missing node; ENOSPC when a transaction's budget runs out on
    /// the way up (C propagates it from ask_parents).
    func errorFromParents(_ path: String, need: XSAccess, _ c: XSCaller, _ tx: XSTransaction?) -> XSError {
        var p = XSPath.parent(path)
        do throws(XSError) {
            while let q = p {
                if let n = try node(q, tx, c) {
                    // C tests parent_perm & perm: any of the access asked for will do.
                    return c.access(n.perms).isDisjoint(with: need) ? .EACCES : .ENOENT
                }
                p = XSPath.parent(q)
            }
        } catch {
            return error
        }
        return .ENOENT
    }

    // MARK: operations

    public func read(_ path: String, _ c: XSCaller, _ tx: XSTransaction? = nil) throws(XSError) -> [UInt8] {
        try get(path, need: .read, c, tx).value
    }

    public func directory(_ path: String, _ c: XSCaller, _ tx: XSTransaction? = nil) throws(XSError) -> XSNode {
        try get(path, need: .read, c, tx)
    }

    public func getPerms(_ path: String, _ c: XSCaller, _ tx: XSTransaction? = nil) throws(XSError) -> XSPermissions {
        try get(path, need: .read, c, tx).perms
    }

    /// WRITE: sets a value, creating missing parents (which inherit their parent's
    /// permissions; an unprivileged creator becomes the owner).
    @discardableResult
    public func write(_ path: String, _ value: [UInt8], _ c: XSCaller, _ tx: XSTransaction? = nil) throws(XSError) -> XSChange {
        if var n = try node(path, tx, c) {
            guard c.access(n.perms).contains(.write) else { throw .EACCES }
            if !c.privileged && value.count + (n.chargedSize - n.value.count) > c.quotas.maxNodeSize {
                throw .ENOSPC
            }
            n.value = value
            n.generation = nextGeneration()
            let perms = n.perms
            put(path, n, tx)
            return XSChange(path: path, exact: false, perms: perms)
        }
        let perms = try create(path, value, c, tx)
        return XSChange(path: path, exact: false, perms: perms)
    }

    /// MKDIR: creates an empty node; an existing writable node is left alone.
    /// Returns nil when nothing changed.
    public func mkdir(_ path: String, _ c: XSCaller, _ tx: XSTransaction? = nil) throws(XSError) -> XSChange? {
        if let n = try node(path, tx, c) {
            guard c.access(n.perms).contains(.write) else { throw .EACCES }
            return nil
        }
        let perms = try create(path, [], c, tx)
        return XSChange(path: path, exact: false, perms: perms)
    }

    func create(_ path: String, _ value: [UInt8], _ c: XSCaller, _ tx: XSTransaction?) throws(XSError) -> XSPermissions {
        // Collect the missing chain up to the closest existing ancestor.
        var missing: [String] = [path]
        var anc = XSPath.parent(path)
        var ancestorNode: XSNode? = nil
        while let a = anc {
            if let n = try node(a, tx, c) { ancestorNode = n; break }
            missing.append(a)
            anc = XSPath.parent(a)
        }
        guard let ancestorPath = anc, var parent = ancestorNode else { throw .ENOENT }
        guard c.access(parent.perms).contains(.write) else { throw .EACCES }
        if !c.privileged {
            if XSNode.chargedSize(perms: parent.perms.entries.count, value: value.count, children: 0) > c.quotas.maxNodeSize {
                throw .ENOSPC
            }
            if ownedCount(c.domid, tx) + missing.count > c.quotas.maxNodes { throw .ENOSPC }
            let name = XSPath.basename(missing.last!)
            if parent.chargedSize + name.utf8.count + 1 > c.quotas.maxNodeSize { throw .ENOSPC }
            // Each new node between them holds one child's name (C: create_node
            // writes every new node through the node-size check).
            for i in missing.indices.dropFirst() {
                let child = XSPath.basename(missing[i - 1]).utf8.count + 1
                if XSNode.chargedSize(perms: parent.perms.entries.count, value: 0, children: child) > c.quotas.maxNodeSize {
                    throw .ENOSPC
                }
            }
        }
        var parentPath = ancestorPath
        var perms = parent.perms
        if !c.privileged { perms.owner = c.domid }
        let gen = nextGeneration()
        for p in missing.reversed() {
            parent.children.append(String(XSPath.basename(p)))
            parent.generation = gen
            put(parentPath, parent, tx)
            adjustOwned(perms.owner, 1, tx)
            parent = XSNode(value: p == path ? value : [], perms: perms, generation: gen)
            parentPath = p
        }
        put(path, parent, tx)
        return perms
    }

    /// RM: removes a node and its subtree. Removing a missing node whose parent exists
    /// succeeds (no changes); removing "/" is EINVAL. Returns one change per removed
    /// node, descendants first (exact) and the root last, as C's delnode_sub fires.
    public func rm(_ path: String, _ c: XSCaller, _ tx: XSTransaction? = nil) throws(XSError) -> [XSChange] {
        guard let n = try node(path, tx, c) else {
            let e = errorFromParents(path, need: .write, c, tx)
            if e == .ENOENT, let p = XSPath.parent(path), try node(p, tx, c) != nil { return [] }
            throw e
        }
        // Permission first: a guest removing "/" is EACCES, dom0 EINVAL (do_rm).
        guard c.access(n.perms).contains(.write) else { throw .EACCES }
        guard let parentPath = XSPath.parent(path), var parent = try node(parentPath, tx, c) else { throw .EINVAL }
        var changes: [XSChange] = []
        try removeSubtree(path, n, tx, c, &changes)
        let name = XSPath.basename(path)
        if let i = parent.children.firstIndex(where: { $0 == name }) { parent.children.remove(at: i) }
        parent.generation = nextGeneration()
        put(parentPath, parent, tx)
        changes.append(XSChange(path: path, exact: false, perms: n.perms))
        return changes
    }

    func removeSubtree(_ path: String, _ n: XSNode, _ tx: XSTransaction?, _ c: XSCaller,
                       _ changes: inout [XSChange]) throws(XSError) {
        for child in n.children {
            let cp = XSPath.child(path, child)
            if let cn = try node(cp, tx, c) {
                try removeSubtree(cp, cn, tx, c, &changes)
                changes.append(XSChange(path: cp, exact: true, perms: cn.perms, parentPerms: n.perms))
            }
        }
        adjustOwned(n.perms.owner, -1, tx)
        put(path, nil, tx)
    }

    /// SET_PERMS: only the owner (or a privileged caller) may; unprivileged callers may
    /// not give the node away (EPERM).
    public func setPerms(_ path: String, _ perms: XSPermissions, _ c: XSCaller, _ tx: XSTransaction? = nil) throws(XSError) -> XSChange {
        var n = try get(path, need: [.write, .owner], c, tx)
        if !c.privileged {
            if perms.entries.count > c.quotas.maxPerms { throw .ENOSPC }
            if perms.owner != n.perms.owner { throw .EPERM }
            if XSNode.chargedSize(perms: perms.entries.count, value: n.value.count, children: n.childrenSize) > c.quotas.maxNodeSize {
                throw .ENOSPC
            }
        }
        if perms.owner != n.perms.owner {
            adjustOwned(n.perms.owner, -1, tx)
            adjustOwned(perms.owner, 1, tx)
        }
        let oldPerms = n.perms
        n.perms = perms
        n.generation = nextGeneration()
        put(path, n, tx)
        return XSChange(path: path, exact: false, perms: perms, oldPerms: oldPerms)
    }

    // MARK: transactions

    /// A new transaction. It holds only what it accesses, so the store keeps no
    /// list of open ones, and ending one without a commit is dropping it.
    /// `c`'s transaction quota in bytes bounds it, unless `c` is privileged.
    public func begin(id: UInt32, for c: XSCaller) -> XSTransaction {
        XSTransaction(id: id, byteLimit: c.privileged ? nil : c.quotas.maxTransactionBytes)
    }

    /// Commits, or leaves the store untouched and throws: ENOMEM for a transaction an
    /// access was refused in, EAGAIN when a node it accessed changed since (C:
    /// do_transaction_end, finalize_transaction). Returns the changes to announce.
    /// Node sizes were checked as the transaction ran; the node counts are
    /// checked again here against `maxNodes` (nil for a privileged
    /// connection), with everything committed since the transaction began, as
    /// C's acc_fix_domains does: ENOSPC, or several transactions, each within
    /// the quota on its own, would together take a domain past it.
    public func commit(_ t: XSTransaction, maxNodes: Int? = nil) throws(XSError) -> [XSChange] {
        if t.failed { throw .ENOMEM }
        if let maxNodes {
            for (d, delta) in t.nodeDelta where delta > 0 && owned[d, default: 0] + delta > maxNodes { throw .ENOSPC }
        }
        for (path, a) in t.accessed where nodes[path]?.generation != a.generation { throw .EAGAIN }
        for (path, a) in t.accessed where a.modified {
            if var n = a.node {
                n.generation = nextGeneration()
                nodes[path] = n
            } else {
                nodes[path] = nil
            }
        }
        for (d, delta) in t.nodeDelta { owned[d, default: 0] += delta }
        return t.changes
    }
}
