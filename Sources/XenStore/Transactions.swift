// Transactions (docs/misc/xenstore.txt TRANSACTION_START/END): a transaction sees the
// store as it was when it started plus its own changes; at commit, if any node it read
// or wrote has changed outside it meanwhile, the commit fails with EAGAIN.
//
// Snapshot without copying the store: while a transaction is open, the first global
// change to a path saves the previous version into that transaction's `preserved`
// map. A read inside the transaction looks at its own writes, then `preserved`, then
// the live store (which, for paths not in `preserved`, is unchanged since the start).
// A path present in `preserved` is exactly a path changed since the start, which is
// also the conflict test.

public final class XSTransaction {
    public let id: UInt32
    /// Node versions written inside the transaction (nil = removed).
    var writes: [String: XSNode?] = [:]
    /// Pre-change versions of nodes changed outside since the start (nil = absent).
    var preserved: [String: XSNode?] = [:]
    /// Paths read inside the transaction.
    var reads: Set<String> = []
    /// Changes to announce to watchers on commit.
    var changes: [XSChange] = []
    /// Per-domain node-count delta of the writes.
    var nodeDelta: [DomID: Int] = [:]

    init(id: UInt32) { self.id = id }

    var touchedCount: Int { writes.count + reads.count }

    func conflicts() -> Bool {
        for p in reads where preserved.index(forKey: p) != nil { return true }
        for p in writes.keys where preserved.index(forKey: p) != nil { return true }
        return false
    }
}
