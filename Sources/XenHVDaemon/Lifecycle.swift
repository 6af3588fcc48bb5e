import CXen
import Glibc
import XenHV

extension HypervisorDaemon {
    /// `XEN_DOMCTL_createdomain` + the PV builder. Returns the domain and our
    /// end of its guest connection to hand to the toolstack.
    func createDomain(pages: UInt32, name: String, guestIDBase: UInt32 = 0) throws -> (Domain, CInt) {
        guard pages > SpecialPages.reserved, pages <= HVLimits.maxGuestPages else { throw XenErrno.EINVAL }
        guard guestIDBase == 0 || guestIDBase <= UInt32(Int32.max) - UInt32(HVLimits.firstReservedDomID) else { throw XenErrno.EINVAL }
        guard !name.isEmpty, name.utf8.count <= 64, !domains.values.contains(where: { $0.name == name }) else {
            throw name.isEmpty || name.utf8.count > 64 ? XenErrno.EINVAL : XenErrno.EEXIST
        }
        // Domain ids are not reused within one xenhv lifetime, so a stale handle
        // can never reach a newer domain.
        guard nextDomID < HVLimits.firstReservedDomID else { throw XenErrno.ENOSPC }
        let dom = try Domain(domid: nextDomID, name: name, pages: pages)
        // Only root can make the sets as another uid (without, they are made as ours).
        if guestIDBase != 0 && geteuid() == 0 { dom.processUID = guestIDBase + UInt32(dom.domid) }
        var sv: [CInt] = [-1, -1]
        do {
            dom.storePort = try allocate(in: dom, .unbound(remote: 0), owner: 0)
            dom.consolePort = try allocate(in: dom, .unbound(remote: 0), owner: 0)
            try dom.writeStartInfo()
            guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &sv) == 0 else {
                throw HypervisorError.system(call: "socketpair", errno: errno)
            }
            refuseDescriptors(on: sv[0])
        } catch {
            // The memfds go with the Domain; its ports' wake-up sets are ours to close.
            closeAllPorts(of: dom, wakePeer: false)
            throw error
        }
        nextDomID += 1
        domains[dom.domid] = dom
        let guest = Client(id: nextClientID, fd: sv[0], domid: dom.domid)
        nextClientID += 1
        clients[sv[0]] = guest
        dom.guestClient = guest.id
        logger.info("created domain", metadata: ["domid": "\(dom.domid)", "name": "\(name)", "pages": "\(pages)"])
        return (dom, sv[1])
    }

    /// `XEN_DOMCTL_destroydomain`: stops the guest process, closes every port
    /// (peers go unbound and are woken), hangs up the guest connection, and
    /// raises VIRQ_DOM_EXC. Pages a backend still has mapped stay valid until it
    /// unmaps them, as a dying domain's do on Xen.
    func destroy(_ dom: Domain) {
        dom.active.setState(.dying)
        dom.signalProcess(SIGKILL)
        dom.signalProcess(SIGCONT)
        dom.dropProcess()
        closeAllPorts(of: dom, wakePeer: true)
        if let c = clients.values.first(where: { $0.id == dom.guestClient }) {
            clients.removeValue(forKey: c.fd)
            Glibc.close(c.fd)
        }
        domains.removeValue(forKey: dom.domid)
        logger.info("destroyed domain", metadata: ["domid": "\(dom.domid)", "name": "\(dom.name)"])
        raiseDomExc()
    }

    /// Every port of `dom` that is in use, closed (evtchn_destroy).
    private func closeAllPorts(of dom: Domain, wakePeer: Bool) {
        for p in 1..<Int(HVLimits.eventChannelPorts) where dom.ports[p].state != .free {
            close(EventPort(p), in: dom, wakePeer: wakePeer)
        }
    }

    /// `domain_shutdown` (and `domain_crash`, reason SHUTDOWN_crash): records
    /// the reason once, marks the domain shut down or crashed and raises
    /// VIRQ_DOM_EXC so the toolstack applies the configured action. A domain
    /// already shut down keeps its first reason, as on Xen.
    func shutDown(_ dom: Domain, reason: ShutdownReason) {
        guard dom.state == .running || dom.state == .paused else { return }
        dom.shutdownReason = reason
        dom.active.setState(reason == .crash ? .crashed : .shutdown)
        logger.info("domain \(dom.domid) shut down", metadata: ["name": "\(dom.name)", "reason": "\(reason)"])
        raiseDomExc()
    }

    /// A connection went away. A guest's: its domain has crashed (the toolstack
    /// decides what follows). A dom0 process's: its ports close and every grant
    /// it held is released, so the granters can revoke again.
    func disconnect(_ c: Client) {
        clients.removeValue(forKey: c.fd)
        Glibc.close(c.fd)
        if c.domid != 0 {
            // A guest that shut down cleanly is expected to go away.
            if let dom = domains[c.domid], dom.state == .running || dom.state == .paused {
                logger.warning("domain \(c.domid) lost its guest process", metadata: ["name": "\(dom.name)"])
                shutDown(dom, reason: .crash)
            }
            return
        }
        if let dom0 = domains[0] {
            for p in 1..<Int(HVLimits.eventChannelPorts) where dom0.ports[p].owner == c.id && dom0.ports[p].state != .free {
                close(EventPort(p), in: dom0, wakePeer: true)
            }
        }
        if let mt = c.maptrack {
            let released = releaseGrants(of: c, maptrack: mt)
            if released > 0 {
                logger.info("released grants of a dead mapper", metadata: ["client": "\(c.id)", "entries": "\(released)"])
            }
        }
    }

    /// A grant entry of a live domain.
    struct GrantKey: Hashable { let domid: DomID; let ref: GrantRef }

    /// Repairs every grant entry a dead mapper touched: its maptrack entries and
    /// any entry whose lock it died holding. Each entry's pins are recounted,
    /// under its lock, from the live mappers' maptracks; busy bits no pin needs
    /// are cleared (Xen's gnttab_release_mappings, run by the hypervisor itself).
    func releaseGrants(of dead: Client, maptrack: SharedMemory) -> Int {
        var touched = Set<GrantKey>()
        let hw = Int(cxen_load_acquire_u32(maptrack.base!.assumingMemoryBound(to: UInt32.self)))
        for h in 0..<min(hw, Int(config.maptrackEntries)) {
            let e = entry(maptrack, h)
            if e & MaptrackLayout.inUse != 0 {
                touched.insert(GrantKey(domid: DomID(truncatingIfNeeded: e >> 32), ref: GrantRef(truncatingIfNeeded: e)))
            }
        }
        // Entries whose lock it died holding go first: a live mapper holding
        // another entry's lock (a copy pins several) may be waiting for one of
        // these, and would hold ours against us meanwhile.
        var gone: Set<UInt32> = [dead.id]
        let held = entriesLocked(by: gone)
        touched.subtract(held)
        var repaired = 0
        for key in held + Array(touched) where repair(key, gone: &gone) { repaired += 1 }
        return repaired
    }

    /// Entries of live domains whose lock one of `owners` holds.
    private func entriesLocked(by owners: Set<UInt32>) -> [GrantKey] {
        var out: [GrantKey] = []
        for dom in domains.values {
            let active = dom.active
            for ref in 0..<active.entries where owners.contains(active.lockOwner(ref)) {
                out.append(GrantKey(domid: dom.domid, ref: ref))
            }
        }
        return out
    }

    /// Mappers whose process has gone (their connection hung up) though this
    /// round has not served the hang-up yet.
    private func hungUpMappers(besides known: Set<UInt32>) -> Set<UInt32> {
        var out = Set<UInt32>()
        for c in clients.values where c.maptrack != nil && !known.contains(c.id) {
            var p = pollfd(fd: c.fd, events: 0, revents: 0)
            if Glibc.poll(&p, 1, 0) == 1 && p.revents & Int16(POLLHUP | POLLERR) != 0 { out.insert(c.id) }
        }
        return out
    }

    /// Recounts one entry's pins under its lock, taken over from a mapper in
    /// `gone` if one died holding it. While a live mapper holds it, xenhv looks
    /// now and then for mappers that died meanwhile: the live one may be
    /// waiting for a lock one of them holds, so their entries are repaired
    /// first (else both would wait for ever, and every domain with them).
    private func repair(_ key: GrantKey, gone: inout Set<UInt32>) -> Bool {
        guard let dom = domains[key.domid] else { return false }
        let active = dom.active
        guard key.ref < active.entries else { return false }
        var spins = 0
        while active.tryLock(key.ref, owner: Self.hypervisorLockOwner, stealingFrom: gone) == nil {
            spins += 1
            if spins % 256 == 0 {
                let more = hungUpMappers(besides: gone)
                if !more.isEmpty {
                    gone.formUnion(more)
                    for k in entriesLocked(by: more) { _ = repair(k, gone: &gone) }
                }
            }
            sched_yield()
        }
        var r: UInt32 = 0, w: UInt32 = 0
        for c in clients.values where !gone.contains(c.id) {
            guard let mt = c.maptrack else { continue }
            let n = Int(cxen_load_acquire_u32(mt.base!.assumingMemoryBound(to: UInt32.self)))
            for h in 0..<min(n, Int(config.maptrackEntries)) {
                let e = entry(mt, h)
                guard e & MaptrackLayout.inUse != 0, DomID(truncatingIfNeeded: e >> 32) == key.domid,
                      GrantRef(truncatingIfNeeded: e) == key.ref else { continue }
                if e & MaptrackLayout.writable != 0 { w += 1 } else { r += 1 }
            }
        }
        let pins = Pins(read: r, write: w)
        dom.entries.releaseBusy(key.ref, pins: pins)
        active.unlock(key.ref, pins: pins)
        return true
    }

    private func entry(_ mt: SharedMemory, _ h: Int) -> UInt64 {
        cxen_load_acquire_u64(
            (mt.base! + MaptrackLayout.headerSize + h * MaptrackLayout.entryStride).assumingMemoryBound(to: UInt64.self))
    }
}
