// The node tree. Like C xenstored's tdb records, nodes live in a flat map keyed by
// absolute path; each node keeps its children's names in creation order.

public struct XSNode: Sendable, Equatable {
    public var value: [UInt8]
    public var perms: XSPermissions
    public var children: [String]
    /// Global modification counter value at the last change (DIRECTORY_PART's generation).
    public var generation: UInt64

    public init(value: [UInt8] = [], perms: XSPermissions, children: [String] = [], generation: UInt64 = 0) {
        self.value = value; self.perms = perms; self.children = children; self.generation = generation
    }

    /// Bytes charged against the node-size quota, as C xenstored's
    /// calc_node_acc_size: a 16-byte header, 8 bytes per permission, the value and
    /// the children's names.
    var chargedSize: Int { XSNode.chargedSize(perms: perms.entries.count, value: value.count, children: childrenSize) }

    static func chargedSize(perms: Int, value: Int, children: Int) -> Int { 16 + 8 * perms + value + children }

    /// Bytes of the children's names, each NUL-terminated.
    var childrenSize: Int {
        var n = 0
        for c in children { n += c.utf8.count + 1 }
        return n
    }

    /// DIRECTORY reply: "a\0b\0".
    func childrenBlob() -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(childrenSize)
        for c in children { out.append(contentsOf: c.utf8); out.append(0) }
        return out
    }
}

/// A change to report to watchers (C xenstored's fire_watches arguments): the node
/// path; `exact` when only watches set on exactly that path fire (a node removed
/// below the removed root, C's watch_exact), else watches on it and its ancestors;
/// and what watch_permitted judges by: the node's permissions, its old ones for a
/// SET_PERMS, and its parent's when the parent is gone by the time it fires.
public struct XSChange: Sendable {
    public var path: String
    public var exact: Bool
    public var perms: XSPermissions
    public var oldPerms: XSPermissions? = nil
    public var parentPerms: XSPermissions? = nil
}

/// Who is asking: the caller's domain, privilege and quotas.
public struct XSCaller: Sendable {
    public var domid: DomID
    public var privileged: Bool
    public var target: DomID?
    public var quotas: XSQuotas

    public init(domid: DomID, privileged: Bool, target: DomID? = nil, quotas: XSQuotas = .default) {
        self.domid = domid; self.privileged = privileged; self.target = target; self.quotas = quotas
    }

    @inline(__always)
    func access(_ p: XSPermissions) -> XSAccess {
        p.access(for: domid, privileged: privileged, target: target)
    }
}
