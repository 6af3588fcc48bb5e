import CXen
import Glibc
import Synchronization
import SystemPackage

/// A connection to the xenhv daemon: the hypervisor core as seen from one
/// process. Dom0 services connect to xenhv's socket; a guest process inherits a
/// connection its toolstack got at domain creation, so its identity comes from
/// that descriptor, never from anything it claims.
///
/// Lifecycle calls (create/destroy, binding ports, growing the grant table) are
/// round trips; the fast paths run in-process on shared memory: ring access,
/// grant checks and pins, notifications.
public final class Hypervisor: @unchecked Sendable {
    // Sound: mutable state is behind `io` and `state` mutexes; the rest is immutable.
    public let domid: DomID
    /// Our id at xenhv (names us as the holder of grant-entry locks).
    let clientID: UInt32
    let sock: CInt
    private let io = Mutex<[UInt8]>([])
    /// Our domain's shared_info page.
    public let sharedInfo: SharedInfo
    /// Per-port binding generations of our domain (read-only view).
    let portGenerations: SharedMemory
    /// Dom0 only: our maptrack.
    let maptrack: SharedMemory?
    /// Guest only: our pseudo-physical memory and grant table.
    public let memory: SharedMemory?
    let grantTableMemory: SharedMemory?
    /// Guest only: our start_info, as the domain builder wrote it.
    public var startInfo: StartInfo? { memory.map { StartInfo(memory: $0.region) } }

    let state = Mutex<ClientState>(ClientState())

    struct ClientState {
        var domains: [DomID: ForeignDomain] = [:]
        var peers: [EventPort: PeerDescriptor] = [:]
        var maps = MapHandles()

        /// Drops domain `d` if it was destroyed and nothing of ours maps it any
        /// more, so a backend that outlives many guests keeps no descriptors of theirs.
        mutating func evictIfDead(_ d: DomID) {
            guard let f = domains[d], f.active.state == .dying, maps.perDomain[d, default: 0] == 0 else { return }
            domains.removeValue(forKey: d)
            maps.perDomain.removeValue(forKey: d)
        }

        /// The same for every cached domain (slow path: a lookup that missed).
        mutating func evictDeadDomains() {
            for d in Array(domains.keys) { evictIfDead(d) }
        }
    }

    public var isPrivileged: Bool { domid == 0 }

    /// Our connection to xenhv, to poll (with no events) for its hang-up: xenhv
    /// went away. Never read from it: replies belong to ``call(_:_:)``.
    public var connectionDescriptor: CInt { sock }

    /// Connects to xenhv's socket as a dom0 service.
    public static func connect(socketPath: String) throws -> Hypervisor {
        let s = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { throw HypervisorError.system(call: "socket", errno: errno) }
        var addr: sockaddr_un
        do { addr = try UnixSocketAddress.make(socketPath) } catch {
            Glibc.close(s)
            throw error
        }
        let r = UnixSocketAddress.with(&addr) { Glibc.connect(s, $0, $1) }
        guard r == 0 else {
            let e = errno
            Glibc.close(s)
            throw HypervisorError.cannotConnect(path: socketPath, errno: e)
        }
        do {
            return try Hypervisor(socket: s)
        } catch {
            Glibc.close(s)  // a class whose init throws never runs its deinit
            throw error
        }
    }

    /// Adopts an inherited guest connection (the descriptor a toolstack got from
    /// ``createDomain(pages:name:)``).
    public static func guest(descriptor: CInt) throws -> Hypervisor {
        try Hypervisor(socket: descriptor)
    }

    /// A guest process's connection, from the descriptor named by `XENHV_GUEST_FD`.
    public static func guestFromEnvironment() throws -> Hypervisor {
        guard let v = getenv("XENHV_GUEST_FD"), let fd = CInt(String(cString: v)) else {
            throw HypervisorError.protocolViolation("XENHV_GUEST_FD is not set")
        }
        return try guest(descriptor: fd)
    }

    private init(socket s: CInt) throws {
        sock = s
        var buf = [UInt8]()
        try WireMessage(code: Int32(HVOp.hello.rawValue), payload: []).send(on: s)
        guard let reply = try WireMessage.receive(on: s, buffer: &buf) else { throw HypervisorError.connectionLost }
        guard reply.code == 0 else {
            reply.fds.forEach { _ = Glibc.close($0) }
            throw XenErrno(-reply.code)
        }
        var r = WireReader(reply.payload)
        domid = try r.u16()
        clientID = try r.u32()
        let pages = try r.u32()
        let maptrackEntries = try r.u32()
        let fds = reply.fds
        let need = domid == 0 ? 3 : 4
        guard fds.count == need else {
            fds.forEach { _ = Glibc.close($0) }
            throw HypervisorError.protocolViolation("hello carried \(fds.count) descriptors")
        }
        sharedInfo = SharedInfo(memory: try SharedMemory(adopting: fds[0], size: HVLimits.pageSize, writable: true))
        portGenerations = try SharedMemory(adopting: fds[1], size: Int(HVLimits.eventChannelPorts) * 4, writable: false)
        if domid == 0 {
            maptrack = try SharedMemory(adopting: fds[2], size: MaptrackLayout.size(entries: maptrackEntries), writable: true)
            state.withLock { $0.maps.capacity = maptrackEntries }
            memory = nil
            grantTableMemory = nil
        } else {
            maptrack = nil
            memory = try SharedMemory(adopting: fds[2], size: Int(pages) * HVLimits.pageSize, writable: true)
            grantTableMemory = try SharedMemory(
                adopting: fds[3], size: Int(HVLimits.maxGrantFrames) * HVLimits.pageSize, writable: true)
        }
    }

    deinit {
        Glibc.close(sock)
    }

    /// One request/response round trip to xenhv.
    func call(_ op: HVOp, _ build: (inout WireWriter) -> Void = { _ in }) throws -> (WireReader, [CInt]) {
        var w = WireWriter()
        build(&w)
        let reply: WireMessage = try io.withLock { buf in
            try WireMessage(code: Int32(op.rawValue), payload: w.bytes).send(on: sock)
            guard let m = try WireMessage.receive(on: sock, buffer: &buf) else { throw HypervisorError.connectionLost }
            return m
        }
        guard reply.code == 0 else {
            reply.fds.forEach { _ = Glibc.close($0) }
            throw XenErrno(-reply.code)
        }
        return (WireReader(reply.payload), reply.fds)
    }

    // MARK: Domains (toolstack; dom0 only)

    /// A domain fresh from the builder, and the connection its guest process must inherit.
    public struct CreatedDomain: Sendable {
        public let domid: DomID
        /// Hand this to the guest process (see ``Hypervisor/guest(descriptor:)``); the
        /// creator owns it and closes its copy once the guest has it.
        public let guestDescriptor: CInt
        public let storePort: EventPort
        public let consolePort: EventPort
        public let storeMFN: UInt64
        public let consoleMFN: UInt64
    }

    /// `XEN_DOMCTL_createdomain` plus the PV builder: `pages` 4 KiB pages of
    /// memory, start_info, shared_info, the xenstore and console pages and their
    /// unbound event channels (remote end: dom0).
    ///
    /// `guestIDBase`: the uid range the toolstack runs guest processes from
    /// (the domain's runs as `guestIDBase + domid`, as libxl's
    /// xen-qemuuser-range-base), so xenhv charges what the guest can grow in
    /// the kernel through its ports to that uid; 0 for none.
    public func createDomain(pages: UInt32, name: String, guestIDBase: UInt32 = 0) throws -> CreatedDomain {
        var (r, fds) = try call(.createDomain) { w in
            w.u32(pages); w.string(name)
            if guestIDBase != 0 { w.u32(guestIDBase) }
        }
        guard fds.count == 1 else { throw HypervisorError.protocolViolation("createDomain without descriptor") }
        return CreatedDomain(
            domid: try r.u16(), guestDescriptor: fds[0], storePort: try r.u32(), consolePort: try r.u32(),
            storeMFN: try r.u64(), consoleMFN: try r.u64())
    }

    /// `XEN_DOMCTL_destroydomain`: closes the domain's ports (their peers become
    /// unbound and are woken), drops its memory and grant table, hangs up its
    /// guest connection and raises VIRQ_DOM_EXC.
    public func destroyDomain(_ d: DomID) throws { _ = try call(.destroyDomain) { $0.u16(d) } }
    /// `SCHEDOP_shutdown` (guests): our domain shuts itself down for `reason`
    /// (SHUTDOWN_poweroff, _reboot, _crash, ...). xenhv records the reason and
    /// raises VIRQ_DOM_EXC; the toolstack's monitor applies on_poweroff,
    /// on_reboot or on_crash.
    public func shutdownSelf(reason: ShutdownReason = .poweroff) throws {
        try shutdownSelf(rawReason: reason.rawValue)
    }

    /// SCHEDOP_shutdown with any reason word, as a hostile guest may send it (tests).
    package func shutdownSelf(rawReason: UInt32) throws { _ = try call(.shutdown) { $0.u32(rawReason) } }

    /// Renames domain `d` (libxl_domain_rename; dom0 only): `EEXIST` if another
    /// domain has the name.
    public func renameDomain(_ d: DomID, to name: String) throws {
        _ = try call(.renameDomain) { $0.u16(d); $0.string(name) }
    }

    /// `XEN_DOMCTL_set_max_evtchn` (dom0 only): domain `d` may hold ports up
    /// to `maxPort`; allocating or binding past it is `ENOSPC`. Ports it
    /// already holds stay. libxl sets xl.cfg's `max_event_channels` (1023 by
    /// default) right after creating a domain; without the call a domain may
    /// use the whole 2-level ABI (4095 ports).
    public func setMaxEventChannels(_ d: DomID, _ maxPort: UInt32) throws {
        _ = try call(.setMaxEventChannels) { $0.u16(d); $0.u32(maxPort) }
    }

    /// Names the process that runs domain `d` (the toolstack knows it; dom0 only),
    /// so pause, unpause and destroy act on it.
    public func attachProcess(_ pid: Int32, to d: DomID) throws {
        _ = try call(.attachProcess) { $0.u16(d); $0.u32(UInt32(bitPattern: pid)) }
    }
    /// Stops the guest process (SIGSTOP; a confined guest's whole PID
    /// namespace) and marks the domain paused.
    public func pauseDomain(_ d: DomID) throws { _ = try call(.pauseDomain) { $0.u16(d) } }
    public func unpauseDomain(_ d: DomID) throws { _ = try call(.unpauseDomain) { $0.u16(d) } }

    public struct DomainInfo: Sendable, Equatable {
        public let domid: DomID
        public let name: String
        public let pages: UInt32
        public let state: UInt32
        /// Why the domain shut down (xc_domaininfo's shutdown_reason); nil unless it did.
        public let shutdownReason: ShutdownReason?
        public var stateLetters: String { DomainState(rawValue: state)?.description ?? "------" }
        /// XEN_DOMINF_shutdown.
        public var isShutdown: Bool { DomainState(rawValue: state)?.isShutdown ?? false }
    }

    /// `XEN_SYSCTL_getdomaininfolist`.
    public func listDomains() throws -> [DomainInfo] {
        var (r, _) = try call(.listDomains)
        let n = try r.u32()
        return try (0..<n).map { _ in
            DomainInfo(domid: try r.u16(), name: try r.string(), pages: try r.u32(), state: try r.u32(),
                       shutdownReason: ShutdownReason(rawValue: try r.u32()))
        }
    }

    // MARK: Event channels

    /// `EVTCHNOP_alloc_unbound`: a port in `dom` (ours, or any domain for dom0)
    /// that `remote` may bind. The channel object is returned when the port is ours.
    public func allocUnbound(in dom: DomID = HVLimits.domidSelf, remote: DomID) throws -> EventPort {
        var (r, fds) = try call(.allocUnbound) { $0.u16(dom); $0.u16(remote) }
        fds.forEach { _ = Glibc.close($0) }
        return try r.u32()
    }

    /// Our own port's wake-up object (for ports allocated with ``allocUnbound(in:remote:)``
    /// or by the builder, like start_info's store_evtchn).
    public func channel(_ port: EventPort) throws -> EventChannel {
        let (_, fds) = try call(.portDescriptor) { $0.u32(port) }
        guard fds.count == 1 else { throw HypervisorError.protocolViolation("portDescriptor without descriptor") }
        return EventChannel(port: port, descriptor: fds[0], hypervisor: self)
    }

    /// `EVTCHNOP_bind_interdomain`: connects a new local port to `remotePort`
    /// of `remote`, which must be unbound and offered to us.
    public func bindInterdomain(remote: DomID, remotePort: EventPort) throws -> EventChannel {
        var (r, fds) = try call(.bindInterdomain) { $0.u16(remote); $0.u32(remotePort) }
        let port = try r.u32()
        guard fds.count == 1 else { throw HypervisorError.protocolViolation("bind without descriptor") }
        return EventChannel(port: port, descriptor: fds[0], hypervisor: self)
    }

    /// `EVTCHNOP_bind_virq` for VIRQ_DOM_EXC (dom0): wakes when any domain dies.
    public func bindVirq(_ virq: UInt32) throws -> EventChannel {
        var (r, fds) = try call(.bindVirq) { $0.u32(virq) }
        let port = try r.u32()
        guard fds.count == 1 else { throw HypervisorError.protocolViolation("bind without descriptor") }
        return EventChannel(port: port, descriptor: fds[0], hypervisor: self)
    }

    /// `EVTCHNOP_close`.
    public func close(port: EventPort) throws {
        _ = try call(.close) { $0.u32(port) }
        _ = state.withLock { $0.peers.removeValue(forKey: port) }
    }

    /// `EVTCHNOP_status`.
    public func status(of port: EventPort, in dom: DomID = HVLimits.domidSelf) throws -> EventChannelStatus {
        var (r, _) = try call(.status) { $0.u16(dom); $0.u32(port) }
        let kind = try r.u32()
        let a = try r.u32(), b = try r.u32()
        switch kind {
        case UInt32(EVTCHNSTAT_closed): return .closed
        case UInt32(EVTCHNSTAT_unbound): return .unbound(remote: DomID(truncatingIfNeeded: a))
        case UInt32(EVTCHNSTAT_interdomain): return .interdomain(remote: DomID(truncatingIfNeeded: a), remotePort: b)
        case UInt32(EVTCHNSTAT_virq): return .virq(a)
        default: throw HypervisorError.protocolViolation("status \(kind)")
        }
    }

    /// `EVTCHNOP_send`, in-process: a signal on the peer port's eventfd,
    /// through the port's ``PeerDescriptor`` (the one its ``EventChannel``s
    /// use). Sending on an unbound port does nothing, as on Xen; an invalid or
    /// foreign port is `-EINVAL`.
    public func notify(_ port: EventPort) throws {
        guard port > 0, port < HVLimits.eventChannelPorts else { throw XenErrno.EINVAL }
        try send(port, through: peerDescriptor(port))
    }

    /// The send side of our port `port` (made on first use, dropped at close).
    func peerDescriptor(_ port: EventPort) -> PeerDescriptor {
        state.withLock { s in
            if let p = s.peers[port] { return p }
            let p = PeerDescriptor()
            s.peers[port] = p
            return p
        }
    }

    /// Signals `peer` if it is current for the port's binding, else fetches
    /// the peer's eventfd from xenhv first (``refresh(_:_:generation:)``, out of line).
    @inline(__always)
    func send(_ port: EventPort, through peer: PeerDescriptor) throws {
        let gen = generation(of: port)
        if peer.signal(generation: gen) { return }
        try refresh(port, peer, generation: gen)
    }

    @inline(never)
    private func refresh(_ port: EventPort, _ peer: PeerDescriptor, generation gen: UInt32) throws {
        let (_, fds) = try call(.peerDescriptor) { $0.u32(port) }
        guard let fd = fds.first else { return }  // unbound: nothing to wake
        peer.adopt(fd, generation: gen)
    }

    @inline(__always) func generation(of port: EventPort) -> UInt32 {
        cxen_load_acquire_u32((portGenerations.base! + Int(port) * 4).assumingMemoryBound(to: UInt32.self))
    }

    // MARK: Grant tables

    /// `GNTTABOP_setup_table`: grows our grant table to `frames` frames.
    public func setupGrantTable(frames: UInt32) throws { _ = try call(.setupTable) { $0.u32(frames) } }

    /// `GNTTABOP_query_size`: (current frames, maximum frames) of `dom`'s table.
    public func queryGrantTableSize(of dom: DomID = HVLimits.domidSelf) throws -> (frames: UInt32, max: UInt32) {
        var (r, _) = try call(.querySize) { $0.u16(dom) }
        return (try r.u32(), try r.u32())
    }

    /// The grant table we write as a granter (guests).
    public var grantTable: GrantTableWriter? {
        grantTableMemory.map { GrantTableWriter(memory: $0) }
    }

    /// Opens (once) the shared objects of a foreign domain, for mapping and copying.
    func foreignDomain(_ d: DomID) -> ForeignDomain? {
        // Fast path (every grant map and copy): one dictionary lookup.
        if let f = state.withLock({ $0.domains[d] }), f.active.state != .dying { return f }
        state.withLock { $0.evictDeadDomains() }
        guard isPrivileged, let (r, fds) = try? call(.openDomain, { $0.u16(d) }) else { return nil }
        var reader = r
        guard fds.count == 3, let pages = try? reader.u32() else {
            fds.forEach { _ = Glibc.close($0) }
            return nil
        }
        // It owns the descriptors from here, closed by it when it fails.
        guard let f = try? ForeignDomain(domid: d, pages: pages, memoryFD: fds[0], grantFD: fds[1], privateFD: fds[2]) else {
            return nil
        }
        // Two threads that both missed the cache: the first one's stays (the
        // other's maps would fail its identity check as a stale domain).
        return state.withLock { s in
            if let first = s.domains[d], first.active.state != .dying { return first }
            s.domains[d] = f
            return f
        }
    }
}

/// `EVTCHNOP_status` results.
public enum EventChannelStatus: Equatable, Sendable {
    case closed
    case unbound(remote: DomID)
    case interdomain(remote: DomID, remotePort: EventPort)
    case virq(UInt32)
}

/// The shared objects of a domain another process granted us access to.
final class ForeignDomain: @unchecked Sendable {
    // Sound: immutable after init except the lazily mapped whole-memory view,
    // which is published once (under `lazyLock`) and read with an acquiring load.
    let domid: DomID
    let pages: UInt32
    let memory: SharedMemory  // descriptor only; pages mapped per grant
    let grantTable: SharedMemory
    let privateArea: SharedMemory
    let entries: SharedGrantEntries
    let active: ActiveGrantTable
    private let lazyLock = Mutex<Void>(())
    private let wholeMemoryAddress = Atomic<UInt>(0)

    /// Takes the three descriptors whatever happens: if a mapping fails, the
    /// ones already adopted are closed by their ``SharedMemory`` (the failing
    /// one by its own init) and the rest here, each once (a descriptor closed
    /// twice may close another thread's that took its number meanwhile).
    init(domid: DomID, pages: UInt32, memoryFD: CInt, grantFD: CInt, privateFD: CInt) throws {
        self.domid = domid
        self.pages = pages
        var notAdopted = [privateFD, grantFD]
        defer { notAdopted.forEach { _ = Glibc.close($0) } }
        memory = try SharedMemory(adopting: memoryFD, size: Int(pages) * HVLimits.pageSize, writable: true, map: false)
        notAdopted.removeLast()
        grantTable = try SharedMemory(adopting: grantFD, size: Int(HVLimits.maxGrantFrames) * HVLimits.pageSize, writable: true)
        notAdopted.removeLast()
        privateArea = try SharedMemory(adopting: privateFD, size: PrivateLayout.size, writable: true)
        entries = SharedGrantEntries(base: grantTable.base!, capacity: HVLimits.maxGrantFrames * HVLimits.grantEntriesPerFrame)
        active = ActiveGrantTable(base: privateArea.base!)
    }

    /// The whole of the domain's memory, mapped on first use (grant copy);
    /// after that one atomic load, no lock, per copy.
    var wholeMemory: UnsafeMutableRawPointer? {
        if let p = UnsafeMutableRawPointer(bitPattern: wholeMemoryAddress.load(ordering: .acquiring)) { return p }
        return lazyLock.withLock { _ in
            if let p = UnsafeMutableRawPointer(bitPattern: wholeMemoryAddress.load(ordering: .acquiring)) { return p }
            guard let p = try? SharedMemory.mapShared(fd: memory.fd.rawValue, size: memory.size, writable: true) else { return nil }
            wholeMemoryAddress.store(UInt(bitPattern: p), ordering: .releasing)
            return p
        }
    }

    deinit {
        if let p = UnsafeMutableRawPointer(bitPattern: wholeMemoryAddress.load(ordering: .acquiring)) { munmap(p, memory.size) }
    }
}
