// Quotas as data (C xenstored's defaults; docs/misc/xenstore.txt and xenstored -h).
// They bind unprivileged domains only, as in C xenstored; dom0 is exempt.

public struct XSQuotas: Sendable, Equatable {
    /// Nodes a domain may own (C: quota_nb_entry_per_domain, -E). Over: ENOSPC.
    public var maxNodes = 1000
    /// Bytes in one node as C counts them: a 16-byte header, 8 bytes per permission,
    /// the value and its children's names (C: -S). Over: ENOSPC.
    public var maxNodeSize = 2048
    /// Watches per domain (C: -W). Over: E2BIG.
    public var maxWatches = 128
    /// Open transactions per connection (C: -t). Over: ENOSPC.
    public var maxTransactions = 10
    /// Distinct nodes one transaction may access, missing ones included (C:
    /// quota_trans_nodes). Over: ENOSPC, and the transaction's commit fails (ENOMEM).
    public var maxTransactionNodes = 1024
    /// Bytes one transaction may hold for an unprivileged caller: the paths it
    /// accessed and its copies of the nodes, read or changed (C charges transaction copies to the
    /// domain's memory quota, 2.5 MB hard, -M); ten transactions so hold at most
    /// about as much. Over: ENOSPC, and the commit fails (ENOMEM).
    public var maxTransactionBytes = 256 * 1024
    /// Requests whose replies are not yet delivered (C: -Q). Over: we stop reading
    /// the connection until the client consumes replies (backpressure, no error).
    public var maxOutstanding = 20
    /// Watch events a guest's requests caused that wait undelivered in dom0
    /// connections' output (C: a request stays outstanding, -Q, until its watch
    /// events are delivered). At it, the guest's requests wait on its ring
    /// until they drain (no error).
    public var maxCausedEvents = 256
    /// Message payload (XENSTORE_PAYLOAD_MAX). Over: the connection is closed.
    public var maxPayload = 4096
    /// Path length below /local/domain/<n>/ (XENSTORE_REL_PATH_MAX). Over: EINVAL.
    public var maxPathLength = 2048
    /// Permission entries on one node (C: quota_nb_perms_per_node). Over: ENOSPC.
    public var maxPerms = 5
    /// Bytes of undelivered output (replies and watch events) an unprivileged
    /// connection may hold: watch events past it are dropped, as C xenstored drops
    /// events over a domain's memory quota. No connection is closed for its backlog.
    public var maxOutputBytes = 1 << 20
    /// Seconds an unprivileged connection's watch event may wait undelivered (C:
    /// 20 s) before it is dropped; 0 disables. Dom0's events never expire.
    public var watchEventTimeout: Double = 20

    public init() {}
    public static let `default` = XSQuotas()
}
