import CXen
import Glibc
import Logging
import XenHV

/// The xenhv daemon: owns domain lifecycle, hands out the descriptors of the
/// shared state, records who holds what, and cleans up after processes that die.
///
/// Single-threaded, like a hypercall path serialised per op: one poll loop over
/// the listening socket, the signalfd and every client connection.
public final class HypervisorDaemon {
    public struct Configuration: Sendable {
        public var socketPath: String
        /// Xen's `gnttab_max_maptrack_frames`: each dom0 mapper's handles, in frames of 256.
        public var maptrackFrames: UInt32
        /// The first domid handed out (Xen starts at 1). Separate dom0s on one
        /// host (tests, side-by-side setups) start elsewhere so their tap
        /// names (vif<domid>.<devid>) do not collide.
        public var firstDomID: DomID
        public init(socketPath: String, maptrackFrames: UInt32 = HVLimits.maptrackFrames, firstDomID: DomID = 1) {
            self.socketPath = socketPath
            self.maptrackFrames = maptrackFrames
            self.firstDomID = firstDomID
        }
        var maptrackEntries: UInt32 { maptrackFrames * HVLimits.maptrackEntriesPerFrame }
    }

    /// A connected process: a dom0 service on the socket, or a guest on the
    /// connection its domain was created with.
    final class Client {
        let id: UInt32
        let fd: CInt
        let domid: DomID
        var greeted = false
        /// Its malformed requests are logged a line a second at most.
        var malformedLog = LogRateLimit()
        /// Dom0 mappers only.
        var maptrack: SharedMemory?
        init(id: UInt32, fd: CInt, domid: DomID) {
            self.id = id
            self.fd = fd
            self.domid = domid
        }
    }

    /// Owner id xenhv uses when it takes a grant-entry lock itself.
    static let hypervisorLockOwner: UInt32 = 0xFFFF_FFFF

    let config: Configuration
    var logger: Logger
    let listenFD: CInt
    let signalFD: CInt
    var clients: [CInt: Client] = [:]
    var domains: [DomID: Domain] = [:]
    var nextClientID: UInt32 = 1
    var nextDomID: DomID = 1
    var virqDomExc: [(domid: DomID, port: EventPort)] = []
    var recvBuffer: [UInt8] = []
    /// One poll round's descriptors and the clients behind them, kept
    /// between rounds for their capacity.
    var pollFDs: [pollfd] = []
    var polledClients: [Client] = []
    /// The listener out of the poll while accept(2) finds no descriptor left.
    var acceptRest = AcceptRest()
    var running = true
    /// Said once: the kernel cannot refuse descriptors (before Linux 6.16).
    var warnedDescriptorsPass = false

    /// No client may pass xenhv a descriptor: the kernel refuses them on
    /// `fd` (SO_PASSRIGHTS, Linux 6.16: the sender's sendmsg fails with
    /// EPERM). Before 6.16 ``serve(_:)`` closes what arrives off this thread.
    func refuseDescriptors(on fd: CInt) {
        guard cxen_refuse_descriptors(fd) != 0, !warnedDescriptorsPass else { return }
        warnedDescriptorsPass = true
        logger.warning("this kernel has no SO_PASSRIGHTS (Linux 6.16): a guest that sends a descriptor is disconnected, and the descriptor closed on a thread of its own")
    }

    public init(configuration: Configuration, logger: Logger) throws {
        self.config = configuration
        self.nextDomID = configuration.firstDomID
        self.logger = logger
        // Up to three descriptors per port (wake-up set, send, and the kick of
        // one xenhv has raised); a bound port usually holds two, an unbound
        // one one. The soft limit goes up to the hard one.
        var limit = rlimit()
        if getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0, limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max
            _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        }
        signalFD = cxen_termination_signalfd()
        guard signalFD >= 0 else { throw HypervisorError.system(call: "signalfd", errno: errno) }
        listenFD = try Self.listen(at: configuration.socketPath)
        domains[0] = try Domain(domid: 0, name: "Domain-0", pages: 0)
        // What guests send is closed off this thread (see serve); on kernels
        // with SO_PASSRIGHTS they cannot send descriptors at all.
        let r = cxen_defer_closes()
        guard r == 0 else { throw HypervisorError.system(call: "closer thread", errno: -r) }
    }

    static func listen(at path: String) throws -> CInt {
        let s = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { throw HypervisorError.system(call: "socket", errno: errno) }
        var addr: sockaddr_un
        do { addr = try UnixSocketAddress.make(path) } catch {
            Glibc.close(s)
            throw error
        }
        // A stale socket from a dead xenhv is replaced; a live one is not stolen.
        let probe = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        let live = UnixSocketAddress.with(&addr) { connect(probe, $0, $1) } == 0
        Glibc.close(probe)
        if live {
            Glibc.close(s)
            throw HypervisorError.system(call: "bind \(path) (another xenhv is running)", errno: EADDRINUSE)
        }
        unlink(path)
        let r = UnixSocketAddress.with(&addr) { bind(s, $0, $1) }
        guard r == 0, chmod(path, 0o600) == 0, Glibc.listen(s, 64) == 0 else {
            let e = errno
            Glibc.close(s)
            throw HypervisorError.system(call: "bind/listen \(path)", errno: e)
        }
        return s
    }

    /// Serves until SIGTERM, SIGINT or SIGHUP.
    public func run() {
        logger.info("xenhv listening", metadata: ["socket": "\(config.socketPath)"])
        ServiceReadiness.announce("xenhv ready \(config.socketPath)")
        while running {
            guard let round = pollRound(timeout: -1) else { break }
            if round.signalled {
                logger.info("xenhv stopping on signal")
                break
            }
            if round.listening { accept() }
            serve(round)
        }
        shutdown()
    }

    /// What one poll found ready: the listening socket, the signalfd, and
    /// the clients, each with its events.
    struct Round {
        var listening = false
        var signalled = false
        var ready: [(client: Client, events: Int16)] = []
    }

    /// One poll over the listening socket, the signalfd and every client
    /// (`timeout` in milliseconds, -1 for none); nil when poll fails.
    func pollRound(timeout: Int32) -> Round? {
        pollFDs.removeAll(keepingCapacity: true)
        polledClients.removeAll(keepingCapacity: true)
        let now = monotonicNanoseconds()
        let resting = acceptRest.resting(now: now)
        let timeout = acceptRest.pollTimeout(timeout, now: now)
        pollFDs.append(pollfd(fd: resting ? -1 : listenFD, events: Int16(POLLIN), revents: 0))
        pollFDs.append(pollfd(fd: signalFD, events: Int16(POLLIN), revents: 0))
        for c in clients.values {
            pollFDs.append(pollfd(fd: c.fd, events: Int16(POLLIN), revents: 0))
            polledClients.append(c)
        }
        while true {
            let n = poll(&pollFDs, nfds_t(pollFDs.count), timeout)
            if n >= 0 { break }
            if errno == EINTR { continue }
            logger.critical("poll failed: errno \(errno)")
            return nil
        }
        var round = Round()
        round.listening = pollFDs[0].revents & Int16(POLLIN) != 0
        round.signalled = pollFDs[1].revents != 0
        for (i, c) in polledClients.enumerated() where pollFDs[i + 2].revents != 0 {
            round.ready.append((c, pollFDs[i + 2].revents))
        }
        polledClients.removeAll(keepingCapacity: true)  // no client kept past its round
        return round
    }

    /// Serves one round's ready clients, each by the object the poll saw:
    /// a request earlier in the round may have disconnected a client (a
    /// destroy hangs up its guest) and a create may have given its number to
    /// a new one, which this round never polled and must not serve.
    func serve(_ round: Round) {
        // Hung-up connections first: a mapper that died is cleaned up before
        // any request that arrived with it in the same round is answered.
        let hup = Int16(POLLHUP | POLLERR)
        for (c, events) in round.ready where events & hup != 0 && clients[c.fd] === c { serve(c) }
        for (c, events) in round.ready where events & hup == 0 && clients[c.fd] === c { serve(c) }
    }

    func accept() {
        let fd = Glibc.accept(listenFD, nil, nil)
        if fd >= 0 { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        guard fd >= 0 else {
            let e = errno
            if acceptRest.acceptFailed(errno: e, now: monotonicNanoseconds()) == .outOfDescriptors(first: true) {
                logger.warning("accept: no descriptor left (errno \(e)); new connections wait")
            }
            return
        }
        if acceptRest.accepted() { logger.info("accepting connections again") }
        refuseDescriptors(on: fd)
        let c = Client(id: nextClientID, fd: fd, domid: 0)
        nextClientID += 1
        clients[fd] = c
        logger.debug("dom0 client connected", metadata: ["client": "\(c.id)", "pid": "\(cxen_peer_pid(fd))"])
    }

    /// Answers one request of `c`. The receive never blocks (MSG_DONTWAIT):
    /// xenhv waits for no client, and readiness that went away costs nothing.
    func serve(_ c: Client) {
        let msg: WireMessage
        do {
            switch try WireMessage.receive(on: c.fd, buffer: &recvBuffer, blocking: false) {
            case .message(let m): msg = m
            case .wouldBlock: return
            case .end:
                disconnect(c)
                return
            }
        } catch {
            logger.warning("dropping client \(c.id): \(error)")
            disconnect(c)
            return
        }
        // Descriptors are never accepted from clients. A guest's could be a
        // file whose last close waits as long as the guest likes, so they are
        // closed on the closer thread, and a guest that sends any is gone (no
        // guest of ours does: it is a protocol violation, its domain's crash).
        msg.fds.forEach { cxen_close_received($0) }
        if c.domid != 0 && !msg.fds.isEmpty {
            logger.warning("dropping client \(c.id) (domain \(c.domid)): it sent descriptors")
            disconnect(c)
            return
        }
        let reply = answer(msg.code, msg.payload, client: c)
        do { try reply.send(on: c.fd, blocking: false) } catch {
            logger.warning("dropping client \(c.id) (domain \(c.domid)): it does not read its replies")
            disconnect(c)
        }
        closeReplyDescriptors()
    }

    /// Descriptors we created only to pass along are closed once sent, and
    /// also when the request failed after making them (the error reply
    /// carries none).
    func closeReplyDescriptors() {
        ownedOnlyForSending.forEach { _ = Glibc.close($0) }
        ownedOnlyForSending.removeAll(keepingCapacity: true)
    }

    /// The reply to one request of `c`: its result, or the errno it failed with
    /// (EINVAL for one that does not parse).
    func answer(_ code: Int32, _ payload: [UInt8], client c: Client) -> WireMessage {
        do {
            guard let op = HVOp(rawValue: UInt32(bitPattern: code)) else { throw XenErrno.ENOSYS }
            if !c.greeted && op != .hello { throw XenErrno.EPERM }
            var r = WireReader(payload)
            return try handle(op, &r, client: c)
        } catch let e as XenErrno {
            return WireMessage(code: -e.rawValue, payload: [])
        } catch {
            if let leftOut = c.malformedLog.admit(now: monotonicNanoseconds()) {
                logger.warning("client \(c.id) sent a malformed request: \(error)\(LogRateLimit.suffix(leftOut))")
            }
            return WireMessage(code: -XenErrno.EINVAL.rawValue, payload: [])
        }
    }

    /// Descriptors made for one reply (the read-only port generations, the
    /// guest's socketpair end), closed after it, sent or not.
    var ownedOnlyForSending: Set<CInt> = []

    func domain(_ d: DomID, for c: Client) throws(XenErrno) -> Domain {
        let id = d == HVLimits.domidSelf ? c.domid : d
        guard id == c.domid || c.domid == 0 else { throw .EPERM }
        guard let dom = domains[id] else { throw .ESRCH }
        return dom
    }

    func requirePrivileged(_ c: Client) throws(XenErrno) {
        guard c.domid == 0 else { throw .EPERM }
    }

    func handle(_ op: HVOp, _ r: inout WireReader, client c: Client) throws -> WireMessage {
        var w = WireWriter()
        var fds: [CInt] = []
        switch op {
        case .hello:
            guard !c.greeted else { throw XenErrno.EINVAL }
            let dom = try domain(c.domid, for: c)
            w.u16(c.domid); w.u32(c.id); w.u32(dom.pages); w.u32(config.maptrackEntries)
            fds.append(dom.sharedInfo.fd.rawValue)
            let ro = try dom.portGenerations.readOnlyDescriptor()
            ownedOnlyForSending.insert(ro)
            fds.append(ro)
            if c.domid == 0 {
                let mt = try SharedMemory(creating: "xen-maptrack-\(c.id)", size: MaptrackLayout.size(entries: config.maptrackEntries))
                c.maptrack = mt
                fds.append(mt.fd.rawValue)
            } else {
                fds.append(dom.memory!.fd.rawValue)
                fds.append(dom.grantTable.fd.rawValue)
            }
            c.greeted = true

        case .createDomain:
            try requirePrivileged(c)
            let pages = try r.u32()
            let name = try r.string()
            // Optional: the toolstack's uid range for guest processes (libxl's
            // xen-qemuuser-range-base); the domain's process runs as base + domid.
            let guestIDBase = r.at < r.bytes.count ? try r.u32() : 0
            let (d, guestEnd) = try createDomain(pages: pages, name: name, guestIDBase: guestIDBase)
            ownedOnlyForSending.insert(guestEnd)
            fds.append(guestEnd)
            w.u16(d.domid); w.u32(d.storePort); w.u32(d.consolePort)
            w.u64(UInt64(d.pages - SpecialPages.xenstoreFromEnd)); w.u64(UInt64(d.pages - SpecialPages.consoleFromEnd))

        case .destroyDomain:
            try requirePrivileged(c)
            let d = try r.u16()
            guard d != 0 else { throw XenErrno.EINVAL }
            guard let dom = domains[d] else { throw XenErrno.ESRCH }
            destroy(dom)

        case .listDomains:
            try requirePrivileged(c)
            let all = domains.values.sorted { $0.domid < $1.domid }
            w.u32(UInt32(all.count))
            for d in all {
                w.u16(d.domid); w.string(d.name); w.u32(d.pages); w.u32(d.state.rawValue)
                w.u32(d.shutdownReason?.rawValue ?? UInt32.max)
            }

        case .pauseDomain, .unpauseDomain:
            try requirePrivileged(c)
            let d = try r.u16()
            guard d != 0, let dom = domains[d] else { throw d == 0 ? XenErrno.EINVAL : XenErrno.ESRCH }
            let pause = op == .pauseDomain
            dom.signalDomain(pause ? SIGSTOP : SIGCONT)
            // A shut-down or crashed domain stays so (Xen keeps is_shut_down
            // across pause and unpause), or the toolstack would never apply
            // its on_* action.
            if dom.state == .running || dom.state == .paused { dom.active.setState(pause ? .paused : .running) }

        case .shutdown:
            let dom = try domain(c.domid, for: c)
            guard dom.domid != 0 else { throw XenErrno.EINVAL }
            // The reason is the guest's word: anything past SHUTDOWN_MAX is refused.
            guard let reason = ShutdownReason(rawValue: try r.u32()) else { throw XenErrno.EINVAL }
            shutDown(dom, reason: reason)

        case .setMaxEventChannels:
            try requirePrivileged(c)
            let d = try r.u16()
            let max = try r.u32()
            guard let dom = domains[d], dom.state != .dying else { throw XenErrno.ESRCH }
            // Xen caps it at what the ABI can name (4095 ports for 2-level).
            dom.maxPort = min(max, HVLimits.eventChannelPorts - 1)

        case .renameDomain:
            try requirePrivileged(c)
            let d = try r.u16()
            let name = try r.string()
            guard d != 0, let dom = domains[d], dom.state != .dying else { throw d == 0 ? XenErrno.EINVAL : XenErrno.ESRCH }
            guard !name.isEmpty, name.utf8.count <= 64 else { throw XenErrno.EINVAL }
            guard !domains.values.contains(where: { $0.name == name && $0.domid != d }) else { throw XenErrno.EEXIST }
            logger.info("renamed domain \(d)", metadata: ["from": "\(dom.name)", "to": "\(name)"])
            dom.name = name

        case .attachProcess:
            try requirePrivileged(c)
            let d = try r.u16()
            let pid = Int32(bitPattern: try r.u32())
            guard d != 0, let dom = domains[d] else { throw XenErrno.ESRCH }
            guard pid > 0 else { throw XenErrno.EINVAL }
            try dom.attachProcess(pid)

        case .openDomain:
            try requirePrivileged(c)
            let d = try r.u16()
            guard d != 0, let dom = domains[d], dom.state != .dying else { throw XenErrno.ESRCH }
            w.u32(dom.pages)
            fds = [dom.memory!.fd.rawValue, dom.grantTable.fd.rawValue, dom.privateArea.fd.rawValue]

        case .allocUnbound:
            let dom = try domain(try r.u16(), for: c)
            var remote = try r.u16()
            if remote == HVLimits.domidSelf { remote = c.domid }
            let port = try allocate(in: dom, .unbound(remote: remote), owner: dom.domid == 0 ? c.id : 0)
            w.u32(port)

        case .bindInterdomain:
            let local = try domain(c.domid, for: c)
            var rd = try r.u16()
            if rd == HVLimits.domidSelf { rd = c.domid }
            let rport = try r.u32()
            guard let remote = domains[rd], remote.state != .dying else { throw XenErrno.ESRCH }
            guard rport > 0, rport < HVLimits.eventChannelPorts,
                  remote.ports[Int(rport)].state == .unbound(remote: local.domid) else { throw XenErrno.EINVAL }
            let lport = try allocate(in: local, .interdomain(remote: rd, remotePort: rport), owner: local.domid == 0 ? c.id : 0)
            // One send eventfd each way, each in the other end's wake-up set.
            guard let toRemote = sendDescriptor(into: remote.ports[Int(rport)].wake) else {
                close(lport, in: local)
                throw XenErrno.ENOMEM
            }
            guard let toLocal = sendDescriptor(into: local.ports[Int(lport)].wake) else {
                unregister(toRemote, from: remote.ports[Int(rport)].wake)
                close(lport, in: local)
                throw XenErrno.ENOMEM
            }
            local.ports[Int(lport)].send = toRemote
            remote.ports[Int(rport)].send = toLocal
            remote.ports[Int(rport)].state = .interdomain(remote: local.domid, remotePort: lport)
            remote.bumpGeneration(rport)
            // Xen conservatively raises the new local port: a notification sent
            // while the remote end was unbound may have been lost. Through the
            // remote's send eventfd, fresh and not yet handed out, so nothing can block it.
            _ = cxen_port_signal(toLocal)
            w.u32(lport)
            fds.append(local.ports[Int(lport)].wake)

        case .bindVirq:
            try requirePrivileged(c)
            let virq = try r.u32()
            guard virq == UInt32(VIRQ_DOM_EXC) else { throw XenErrno.EINVAL }
            let dom0 = domains[0]!
            let port = try allocate(in: dom0, .virq(virq), owner: c.id)
            // A VIRQ port is there to be raised: its kick is made now, not at the first death.
            guard kick(of: port, in: dom0) != nil else {
                close(port, in: dom0)
                throw XenErrno.ENOMEM
            }
            virqDomExc.append((0, port))
            w.u32(port)
            fds.append(dom0.ports[Int(port)].wake)

        case .close:
            let (dom, port) = try ownPort(&r, client: c)
            close(port, in: dom)

        case .status:
            let dom = try domain(try r.u16(), for: c)
            let port = try r.u32()
            guard port > 0, port < HVLimits.eventChannelPorts else { throw XenErrno.EINVAL }
            switch dom.ports[Int(port)].state {
            case .free: w.u32(UInt32(EVTCHNSTAT_closed)); w.u32(0); w.u32(0)
            case .unbound(let rd): w.u32(UInt32(EVTCHNSTAT_unbound)); w.u32(UInt32(rd)); w.u32(0)
            case .interdomain(let rd, let rp): w.u32(UInt32(EVTCHNSTAT_interdomain)); w.u32(UInt32(rd)); w.u32(rp)
            case .virq(let v): w.u32(UInt32(EVTCHNSTAT_virq)); w.u32(v); w.u32(0)
            }

        case .peerDescriptor:
            let (dom, port) = try ownPort(&r, client: c)
            switch dom.ports[Int(port)].state {
            case .interdomain:
                let fd = dom.ports[Int(port)].send
                if fd >= 0 { fds.append(fd) }
            case .unbound: break
            default: throw XenErrno.EINVAL
            }

        case .portDescriptor:
            let (dom, port) = try ownPort(&r, client: c)
            fds.append(dom.ports[Int(port)].wake)

        case .raisePort:
            let (dom, port) = try ownPort(&r, client: c)
            raise(port, in: dom)

        case .setupTable:
            let dom = try domain(c.domid, for: c)
            let frames = try r.u32()
            guard frames <= HVLimits.maxGrantFrames else { throw XenErrno.EINVAL }
            if frames > dom.active.grantFrames { dom.active.setGrantFrames(frames) }

        case .querySize:
            let dom = try domain(try r.u16(), for: c)
            w.u32(dom.active.grantFrames); w.u32(HVLimits.maxGrantFrames)
        }
        return WireMessage(code: 0, payload: w.bytes, fds: fds)
    }

    /// The caller's domain and the port the request names, which the caller must hold.
    func ownPort(_ r: inout WireReader, client c: Client) throws -> (Domain, EventPort) {
        let dom = try domain(c.domid, for: c)
        let port = try r.u32()
        try checkOwned(port, in: dom, by: c)
        return (dom, port)
    }

    /// A port may be used by the client that holds it; a guest holds all of its domain's.
    func checkOwned(_ port: EventPort, in dom: Domain, by c: Client) throws(XenErrno) {
        guard port > 0, port < HVLimits.eventChannelPorts, dom.ports[Int(port)].state != .free else { throw .EINVAL }
        let owner = dom.ports[Int(port)].owner
        guard owner == 0 || owner == c.id else { throw .EPERM }
    }

    func allocate(in dom: Domain, _ state: Port.State, owner: UInt32) throws(XenErrno) -> EventPort {
        guard let port = dom.freePort() else { throw .ENOSPC }
        // A guest's set counts against its own uid's epoll watches: whoever
        // holds an epoll descriptor may add watches to it.
        let wake = dom.processUID.map { cxen_wake_create_as($0) } ?? cxen_wake_create()
        guard wake >= 0 else { throw .ENOMEM }
        dom.ports[Int(port)] = Port(state: state, wake: wake, owner: owner)
        dom.bumpGeneration(port)
        return port
    }

    /// A new eventfd registered in the wake-up set `wake` (nil when either
    /// call fails). Non-blocking, so a signal at its (unreachable) ceiling
    /// fails instead of waiting: Xen's evtchn_send never blocks.
    func sendDescriptor(into wake: CInt) -> CInt? {
        let fd = cxen_eventfd(0, 0x80000 | 0x800 /* EFD_CLOEXEC | EFD_NONBLOCK */)
        guard fd >= 0 else { return nil }
        guard cxen_wake_add(wake, fd) == 0 else {
            Glibc.close(fd)
            return nil
        }
        return fd
    }

    /// Takes `fd` out of `wake` and closes our copy. A holder's copy keeps
    /// the eventfd alive, so without the removal its signals would still wake
    /// the set.
    func unregister(_ fd: CInt, from wake: CInt) {
        guard fd >= 0 else { return }
        if wake >= 0 { cxen_wake_remove(wake, fd) }
        Glibc.close(fd)
    }

    /// `EVTCHNOP_close` (and the per-port part of `evtchn_destroy`): an
    /// interdomain peer goes back to unbound, waiting for a new connection.
    func close(_ port: EventPort, in dom: Domain, wakePeer: Bool = false) {
        let p = dom.ports[Int(port)]
        if case let .interdomain(rd, rp) = p.state, let remote = domains[rd] {
            // Both send eventfds of the binding leave the wake-up sets they were in:
            // a stale copy in either owner's hands wakes nothing any more.
            unregister(p.send, from: remote.ports[Int(rp)].wake)
            unregister(remote.ports[Int(rp)].send, from: p.wake)
            remote.ports[Int(rp)].send = -1
            remote.ports[Int(rp)].state = .unbound(remote: dom.domid)
            remote.bumpGeneration(rp)
            if wakePeer { raise(rp, in: remote) }
        } else if p.send >= 0 {
            Glibc.close(p.send)
        }
        if case .virq = p.state { virqDomExc.removeAll { $0.domid == dom.domid && $0.port == port } }
        if p.kick >= 0 { Glibc.close(p.kick) }
        if p.wake >= 0 { Glibc.close(p.wake) }
        dom.ports[Int(port)] = Port()
        dom.bumpGeneration(port)
    }

    /// Raises `port` of `dom` through xenhv's own eventfd in its wake-up set
    /// (no domain holds it), made at the first raise: a port that xenhv never
    /// raises costs one descriptor here, a bound one two. Without descriptors
    /// left the raise is dropped and logged.
    func raise(_ port: EventPort, in dom: Domain) {
        guard let fd = kick(of: port, in: dom) else {
            logger.warning("domain \(dom.domid) port \(port): no descriptor for a raise: \(String(cString: strerror(errno)))")
            return
        }
        _ = cxen_port_signal(fd)
    }

    /// The port's kick eventfd, made (and registered in its wake-up set) on first use.
    func kick(of port: EventPort, in dom: Domain) -> CInt? {
        if dom.ports[Int(port)].kick >= 0 { return dom.ports[Int(port)].kick }
        guard let made = sendDescriptor(into: dom.ports[Int(port)].wake) else { return nil }
        dom.ports[Int(port)].kick = made
        return made
    }

    /// Raises VIRQ_DOM_EXC on every port bound to it.
    func raiseDomExc() {
        guard let dom0 = domains[0] else { return }
        for (_, port) in virqDomExc { raise(port, in: dom0) }
    }

    func shutdown() {
        for c in Array(clients.values) { disconnect(c) }
        Glibc.close(listenFD)
        Glibc.close(signalFD)
        unlink(config.socketPath)
        logger.info("xenhv stopped")
    }
}
