// Domains (tools/xenstored/domain.c): INTRODUCE attaches a guest's ring, RELEASE (or
// the hypervisor reporting the domain's death) detaches it and cleans up after it.
import Glibc

/// A guest's xenstore ring as the hypervisor hands it over: the 4096-byte page holding
/// `struct xenstore_domain_interface`, a descriptor that becomes readable when the
/// guest notifies (the port's wake-up set: drained with cxen_port_drain, never a
/// blocking read), and a way to notify the guest.
public struct XenstoreRingPort: @unchecked Sendable {
    /// Start of the shared page. Must stay mapped until `release` is called.
    public var page: UnsafeMutableRawPointer
    /// Readable when the guest kicked its event channel.
    public var eventFD: Int32
    /// Kicks the guest's event channel.
    public var notify: @Sendable () -> Void
    /// Called once when the domain is released (unmap, close descriptors).
    public var release: @Sendable () -> Void

    public init(page: UnsafeMutableRawPointer, eventFD: Int32,
                notify: @escaping @Sendable () -> Void,
                release: @escaping @Sendable () -> Void = {}) {
        self.page = page; self.eventFD = eventFD; self.notify = notify; self.release = release
    }
}

/// Resolves INTRODUCE's (domid, mfn, event-channel port) to the guest's ring. The
/// hypervisor core plugs in here; tests pass a closure over memfd pages and eventfds.
/// Throwing makes INTRODUCE fail with EINVAL.
public typealias XenstoreRingProvider = (_ domid: DomID, _ mfn: UInt64, _ port: UInt32) throws -> XenstoreRingPort

/// Attaches/detaches ring connections to the event loop (implemented by the daemon).
protocol XSRingHost: AnyObject {
    func attachRing(_ conn: XSConnection, _ port: XenstoreRingPort)
    func detachRing(_ conn: XSConnection)
    /// Detaches the connection's ring without releasing it and hands it
    /// back (a domain introduced again on the same port keeps its binding).
    func takeRing(_ conn: XSConnection) -> XenstoreRingPort?
}

final class XSDomain {
    let domid: DomID
    let mfn: UInt64
    var port: UInt32
    var conn: XSConnection?
    /// The hypervisor reported it shut down (C: domain->shutdown).
    var shutdown = false
    init(domid: DomID, mfn: UInt64, port: UInt32) { self.domid = domid; self.mfn = mfn; self.port = port }
}

extension XenStoreCore {
    func parseDomid(_ f: UnsafeRawBufferPointer) throws(XSError) -> DomID {
        guard !f.isEmpty, f.count <= 5 else { throw .EINVAL }
        var v: UInt32 = 0
        for c in f {
            guard c >= UInt8(ascii: "0"), c <= UInt8(ascii: "9") else { throw .EINVAL }
            v = v * 10 + UInt32(c - UInt8(ascii: "0"))
        }
        guard v < 0x7FF0 else { throw .EINVAL }  // DOMID_FIRST_RESERVED
        return v
    }

    func parseUInt(_ f: UnsafeRawBufferPointer) throws(XSError) -> UInt64 {
        guard !f.isEmpty, f.count <= 20 else { throw .EINVAL }
        var v: UInt64 = 0
        for c in f {
            guard c >= UInt8(ascii: "0"), c <= UInt8(ascii: "9") else { throw .EINVAL }
            let (m, o1) = v.multipliedReportingOverflow(by: 10)
            let (s, o2) = m.addingReportingOverflow(UInt64(c - UInt8(ascii: "0")))
            if o1 || o2 { throw .EINVAL }
            v = s
        }
        return v
    }

    /// INTRODUCE: resolves the ring through the provider and starts serving it.
    /// A domain introduced again is C xenstored's way of recreating its
    /// xenbus event channel (introduce_domain, then domain_conn_reset): see
    /// ``reintroduce(_:port:)``. Port 0 is refused, as C's `port <= 0`.
    public func introduce(domid: DomID, mfn: UInt64, port: UInt32) throws(XSError) {
        if domid == 0 || port == 0 { throw .EINVAL }
        if let d = domains[domid] {
            try reintroduce(d, port: port)
            return
        }
        guard let provider = ringProvider, let host = ringHost else { throw .EINVAL }
        let ring: XenstoreRingPort
        do { ring = try provider(domid, mfn, port) } catch { throw .EINVAL }
        let d = XSDomain(domid: domid, mfn: mfn, port: port)
        let conn = newConnection(domid: domid, privileged: false)
        d.conn = conn
        domains[domid] = d
        host.attachRing(conn, ring)
        log(.info, "introduced domain \(domid) (mfn \(mfn), port \(port))")
        fireSpecial("@introduceDomain")
    }

    /// The domain's ring is bound to `port` (on the same port: the binding it
    /// has, as C's unbind and bind again end up) and its connection starts over,
    /// as C's domain_conn_reset: its watches, transactions and buffered
    /// messages are dropped and the ring's four indices zeroed; a guest that
    /// set XENSTORE_RECONNECT is told XENSTORE_CONNECTED and kicked. The
    /// target set with SET_TARGET stays. As in C, the mfn is not looked at
    /// again (the ring stays on the page first introduced) and no
    /// @introduceDomain fires. Unlike C, a port that cannot be bound leaves
    /// the old binding and connection as they were (EINVAL); C would
    /// carry on with no port.
    func reintroduce(_ d: XSDomain, port: UInt32) throws(XSError) {
        guard let provider = ringProvider, let host = ringHost else { throw .EINVAL }
        let ring: XenstoreRingPort
        if port == d.port, let c = d.conn, let kept = host.takeRing(c) {
            ring = kept
        } else {
            do { ring = try provider(d.domid, d.mfn, port) } catch { throw .EINVAL }
        }
        let target = d.conn?.target
        if let old = d.conn { closeConnection(old, reason: "domain introduced again") }  // detaches the old ring
        let reconnecting = RingEndpoint.reset(ring.page)
        d.port = port
        let conn = newConnection(domid: d.domid, privileged: false)
        conn.target = target
        d.conn = conn
        host.attachRing(conn, ring)
        if reconnecting { ring.notify() }
        log(.info, "domain \(d.domid) introduced again (port \(port)): its connection starts over")
    }

    /// Forgets a domain: drops its connection, watches and transactions, removes every
    /// node it owns (with its subtree) wherever it is, and fires @releaseDomain. Nodes
    /// dom0 owns, in the domain's home too, stay for the toolstack to remove (C
    /// xenstored's destroy_domain / domain_tree_remove, without --keep-orphans).
    /// Called for XS_RELEASE and when the hypervisor reports the domain's death.
    /// Throws ENOENT for a domain never introduced.
    public func releaseDomain(_ domid: DomID) throws(XSError) {
        guard let d = domains[domid] else { throw .ENOENT }
        if let c = d.conn { closeConnection(c, reason: "domain released") }  // detaches the ring
        domains[domid] = nil
        removeOwnedNodes(domid)
        log(.info, "released domain \(domid)")
        fireSpecial("@releaseDomain")
    }

    /// The hypervisor reports these domains shut down (XEN_DOMINF_shutdown: powered
    /// off, rebooting, crashed) but not dying. As C xenstored's check_domain, the
    /// first report of a domain fires @releaseDomain (once for the whole batch), as
    /// xenstore.txt documents; the domain stays introduced until it dies or is
    /// released. Unknown domains are ignored.
    public func domainsShutDown(_ ids: [DomID]) {
        var notify = false
        for id in ids {
            if let d = domains[id], !d.shutdown {
                d.shutdown = true
                notify = true
            }
        }
        if notify { fireSpecial("@releaseDomain") }
    }

    /// Walks the tree from the root and removes each node `domid` owns with its
    /// subtree (whose other nodes are not visited). Dom0 removes them, so watchers
    /// hear about each removal like any other change.
    ///
    /// Entries that grant the domain access to nodes others own go too (C's
    /// domain_adjust_node_perms, XSA-322): a later domain given the same id
    /// must not inherit them.
    func removeOwnedNodes(_ domid: DomID) {
        let dom0 = XSCaller(domid: 0, privileged: true)
        var stack = ["/"]
        while let p = stack.popLast() {
            guard let n = store.nodes[p] else { continue }
            if n.perms.owner == domid && p != "/" {
                if let changes = try? store.rm(p, dom0) { changes.forEach(fire) }
                continue
            }
            var perms = n.perms
            if perms.removeGrants(to: domid) { _ = try? store.setPerms(p, perms, dom0) }
            for c in n.children.reversed() { stack.append(XSPath.child(p, c)) }
        }
        // A special node dom0 gave the domain goes back to dom0 (it cannot be
        // removed), and what dom0 granted it there goes too.
        for s in XSStore.specialNodes {
            guard let old = store.nodes[s]?.perms else { continue }
            var perms = old
            if perms.owner == domid { perms.owner = 0 }
            _ = perms.removeGrants(to: domid)
            if perms != old { _ = try? store.setPerms(s, perms, dom0) }
        }
    }

    public func isIntroduced(_ domid: DomID) -> Bool { domid == 0 || domains[domid] != nil }
}
