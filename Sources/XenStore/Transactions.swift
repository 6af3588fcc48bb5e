// Transactions (docs/misc/xenstore.txt TRANSACTION_START/END), as C xenstored's
// transaction.c does them: the first access to a node inside a transaction records
// the node's generation and takes the transaction's own copy of it; later accesses
// use that copy, and writes change only the copy. At commit, every accessed node must
// still have the generation recorded at its first access, else EAGAIN; then the
// modified copies replace the live nodes.
//
// A transaction holds data only for the nodes it accessed, at most
// `maxTransactionNodes` of them and `maxTransactionBytes` of paths and node copies
// for an unprivileged caller (a copy it only read is charged too: once the live node
// is rewritten outside, the transaction holds the old one alone). An access past
// that budget is refused with ENOSPC and marks the transaction failed, so its commit
// answers ENOMEM and applies nothing (C: access_node sets trans->fail;
// do_transaction_end returns ENOMEM).

public final class XSTransaction {
    public let id: UInt32

    struct Access {
        /// Generation of the live node at the first access (nil: absent).
        var generation: UInt64?
        /// The transaction's view of the node (nil: absent).
        var node: XSNode?
        var modified: Bool
    }
    /// Every node accessed inside the transaction, missing ones included.
    var accessed: [String: Access] = [:]
    /// Changes to announce to watchers on commit: one per path, in first-change order.
    var changes: [XSChange] = []
    var changeIndex: [String: Int] = [:]
    /// Per-domain node-count delta of the writes.
    var nodeDelta: [DomID: Int] = [:]
    /// An access was refused; the commit fails.
    var failed = false
    /// What the transaction holds: each accessed path, and its copy of each
    /// node, as C charges a node (bounded by ``XSQuotas/maxTransactionBytes``).
    var bytes = 0
    /// ``bytes``' bound: the quota of an unprivileged caller; nil for a
    /// privileged one, whose transactions are not counted at all.
    let byteLimit: Int?
    /// Bytes counted for a recorded access besides its path.
    static let entryOverhead = 64

    init(id: UInt32, byteLimit: Int? = nil) {
        self.id = id
        self.byteLimit = byteLimit
    }

    /// Records a change to announce, one per path: a non-exact change replaces an
    /// exact one, not the other way round (C: queue_watches).
    func announce(_ change: XSChange) {
        if let i = changeIndex[change.path] {
            changes[i].exact = changes[i].exact && change.exact
            changes[i].perms = change.perms
            changes[i].oldPerms = changes[i].oldPerms ?? change.oldPerms
            changes[i].parentPerms = change.parentPerms
        } else {
            changeIndex[change.path] = changes.count
            changes.append(change)
        }
    }
}
