import CNetShim
import CXen
import Dispatch
import Glibc
import Logging
import NetBack
import Synchronization
import XenBus
import XenHV
import XenRing

/// pvguest's netfront (Linux's xen-netfront): the frontend half of the
/// netif.h handshake on /local/domain/<me>/device/vif/<devid>, and the guest's
/// NIC — a tap with vnet headers inside a network namespace — so the
/// namespace's real stack (ping, iperf3) drives the vif.
///
/// Queues as Linux's netfront takes them: min(``Options/maxQueues``, the
/// backend's multi-queue-max-queues), announced under `queue-N/` with
/// `multi-queue-num-queues` when more than one, else at the top level. Each
/// queue is a tx and an rx ring, its own event channel (or a tx and an rx one
/// with feature-split-event-channels), its own queue of the guest's tap
/// (`IFF_MULTI_QUEUE`, so the guest kernel spreads flows over them) and its
/// own thread. Each tx id (0-255) owns one granted page; each rx ring slot
/// owns one granted page and an rx request's id is its slot (as in Linux), so
/// every rx response is checked against its position. Everything the backend
/// writes on the rings is validated: ids, sizes, offsets, statuses,
/// extra-info types, slot counts.
///
/// When the backend rewrites its state after the device connected (a
/// restarted netback re-offering the device, or Closing), the data path
/// stops and the frontend goes Closing -> Closed -> Initialising and redoes
/// the handshake on fresh rings and fresh event channels.
public final class NetFrontDevice: @unchecked Sendable {
    // Sound: the immutable configuration is set in init; the sessions, the
    // queues' memory and the flags are behind `control`; each session's rings
    // are used only by its data thread.
    public let frontendPath: String
    public let backendPath: String
    public let backendID: DomID
    public let mac: MACAddress
    public let mtu: UInt32
    public let interfaceName: String
    public let namespace: String
    /// Whether this device created `namespace` (and removes it on `stop`).
    public let createdNamespace: Bool
    public let options: Options
    public let stats = NetFrontStats()

    /// What the guest kernel would take from its module parameters.
    public struct Options: Sendable {
        /// Queues to use at most (Linux's `xennet_max_queues`, default the
        /// online CPUs); the backend's multi-queue-max-queues caps it.
        public var maxQueues: Int
        /// Separate tx and rx event channels when the backend offers
        /// feature-split-event-channels, as Linux's netfront always takes
        /// them; off to drive a backend's shared-channel path.
        public var splitEventChannels: Bool
        public init(maxQueues: Int = HVLimits.onlineCPUs, splitEventChannels: Bool = true) {
            self.maxQueues = max(1, maxQueues)
            self.splitEventChannels = splitEventChannels
        }
    }

    let hv: Hypervisor
    let xs: XenBusClient
    let logger: Logger
    let tap: Tap
    let pages: GuestPages
    let grants: GrantRefs
    var backendWatch: XenBusWatch?

    struct Control {
        /// The connected queues' data paths (empty while not connected).
        var sessions: [Session] = []
        /// Queue memory granted so far, kept across reconnects; index = queue.
        var memory: [QueueMemory] = []
        var stopped = false
    }
    let control = Mutex(Control())
    /// Writes to the backend's state node (counted by the watch callback).
    let backendEvents = Atomic<Int>(0)
    /// `backendEvents` when the current connection was made: any write after it is a renegotiation.
    let baseline = Atomic<Int>(0)
    let wake = DispatchSemaphore(value: 0)
    /// Signalled when the supervisor thread has ended: only then is no
    /// reconnect using the queues' memory.
    let supervisorDone = DispatchSemaphore(value: 0)
    /// Handshakes completed (1 after init; more after reconnects).
    public var connections: Int { connectionCount.load(ordering: .relaxed) }
    let connectionCount = Atomic<Int>(0)
    let detachedFlag = Atomic<Bool>(false)

    /// Whether the toolstack took the backend away under the NIC (it stays
    /// down now; ``stop()`` it).
    public var isDetached: Bool { detachedFlag.load(ordering: .acquiring) }

    static let ringSize = 256
    /// A key this frontend writes at every handshake (whatever its queues)
    /// and never removes.
    public static let handshakeKey = "request-rx-copy"
    /// Slots a tx packet may use: the frame (at most 64 KiB, 16-17 pages) and one GSO extra.
    static let maxTxSlots = 18
    static let maxFrame = 65535
    static let maxRxSlots = 19

    /// Connects the vif at `frontendPath` and creates its NIC `interfaceName`
    /// in network namespace `namespace` (created when missing).
    public init(hypervisor hv: Hypervisor, xenstore xs: XenBusClient, frontendPath fe: String,
                pages: GuestPages, grants: GrantRefs, namespace: String, interfaceName: String = "eth0",
                options: Options = Options(), logger: Logger = Logger(label: "netfront")) throws {
        self.hv = hv
        self.xs = xs
        self.logger = logger
        self.pages = pages
        self.grants = grants
        self.frontendPath = fe
        self.namespace = namespace
        self.options = options
        let (be, beID) = try backend(of: fe, xs)
        backendPath = be
        backendID = beID
        let macString = try xs.readIfExists(fe + "/mac") ?? xs.readIfExists(be + "/mac")
        guard let macString, let m = MACAddress(macString) else {
            throw HypervisorError.protocolViolation("\(fe)/mac is missing or not a MAC address")
        }
        mac = m
        let mtuString = try xs.readIfExists(fe + "/mtu") ?? xs.readIfExists(be + "/mtu")
        if let mtuString {
            guard let v = UInt32(mtuString), (68...65535).contains(v) else {
                throw HypervisorError.protocolViolation("bad mtu '\(mtuString)'")
            }
            mtu = v
        } else {
            mtu = 1500
        }

        // The NIC: a tap inside the guest's namespace, with our MAC, up;
        // multi-queue when we may use several queues (a connection attaches
        // one tap queue per ring queue beyond the first).
        let mac = self.mac, mtu = self.mtu
        let (made, created) = try NetNamespace.run(in: namespace, create: true) { () throws -> Tap in
            let t = try Tap(name: interfaceName, queues: 1, multiQueue: options.maxQueues > 1)
            // The socket is bound to the namespace it was opened in.
            let nl = try Netlink()
            try nl.setAddress(t.name, mac)
            try nl.setMTU(t.name, mtu)
            try nl.setUp(t.name)
            try? nl.setUp("lo")
            return t
        }
        tap = made
        createdNamespace = created
        self.interfaceName = made.name
        try? tap.setCarrier(false)

        backendWatch = try xs.watch(be + "/state") { [weak self] _ in
            guard let self else { return }
            self.backendEvents.wrappingAdd(1, ordering: .releasing)
            self.wake.signal()
        }
        do {
            try handshake(timeout: 30)
        } catch {
            // A NIC that does not connect gives back what it took.
            control.withLock { $0.stopped = true }
            if let w = backendWatch { try? xs.unwatch(w) }
            releaseResources()
            throw error
        }
        guard DetachedThread.start(name: "nf-\(interfaceName)", { [self] in
            supervise()
            supervisorDone.signal()
        }) else {
            // Without its supervisor nobody would see the backend go or the
            // data path fail: the NIC is given up as one that did not connect.
            supervisorDone.signal()
            stop()
            throw HypervisorError.system(call: "pthread_create", errno: EAGAIN)
        }
    }

    // MARK: Handshake

    /// The keys one queue is announced with, relative to the frontend
    /// directory (`queue-N/` when there are several: netfront's
    /// write_queue_xenstore_keys).
    static func queueKeys(_ q: Int, of n: Int, txRing: GrantRef, rxRing: GrantRef,
                          ports: (tx: EventPort, rx: EventPort?)) -> [(String, String)] {
        let dir = n == 1 ? "" : "queue-\(q)/"
        var keys = [(dir + "tx-ring-ref", "\(txRing)"), (dir + "rx-ring-ref", "\(rxRing)")]
        if let rx = ports.rx {
            keys += [(dir + "event-channel-tx", "\(ports.tx)"), (dir + "event-channel-rx", "\(rx)")]
        } else {
            keys.append((dir + "event-channel", "\(ports.tx)"))
        }
        return keys
    }

    /// Waits for the backend's InitWait, sets up fresh rings and event
    /// channels for each queue, announces them with our features, goes
    /// Connected and waits for the backend's Connected; then starts the data
    /// paths. On a reconnect the backend is still Closed when we go
    /// Initialising: only InitWait ends the wait then.
    func handshake(timeout: Double, reconnecting: Bool = false) throws {
        let fe = frontendPath, be = backendPath
        // Unknown: the toolstack removed the device before it connected.
        let settledStates: Set<XenBus.XenbusState> = reconnecting ? [.initWait] : [.initWait, .connected, .closing, .closed, .unknown]
        // A reconnect stops as soon as the device is stopped or detached: the
        // directories may be a new device's by now, not ours to write.
        let abandon: () throws -> Void = reconnecting ? { [self] in try checkAttached() } : {}
        guard let s = try awaitBackend(timeout, abandon: abandon, { settledStates.contains($0) }), s == .initWait else {
            throw HypervisorError.protocolViolation("backend \(be) did not reach InitWait")
        }
        let features = Set(["feature-sg", "feature-gso-tcpv4", "feature-gso-tcpv6", "feature-ipv6-csum-offload",
                            "feature-rx-copy", "feature-split-event-channels"].filter {
            ((try? xs.readIfExists(be + "/" + $0)) ?? nil) == "1"
        })
        guard features.contains("feature-rx-copy") else {
            throw HypervisorError.protocolViolation("backend \(be) does not offer feature-rx-copy")
        }
        let sg = features.contains("feature-sg")
        let gso4 = sg && features.contains("feature-gso-tcpv4")
        let gso6 = sg && features.contains("feature-gso-tcpv6")
        let split = options.splitEventChannels && features.contains("feature-split-event-channels")
        // A value that does not parse offers one queue, as in Linux.
        let offered = ((try? xs.readIfExists(be + "/multi-queue-max-queues")) ?? nil).flatMap { Int($0) } ?? 1
        let wanted = max(1, min(options.maxQueues, offered, tap.multiQueue ? Int.max : 1))
        // What the guest kernel may hand us: checksum offload, and TSO only when the backend takes GSO.
        try tap.setOffload(checksum: true, tso4: gso4, tso6: gso6)

        try abandon()
        let memory = try queueMemory(wanted)
        let nq = memory.count
        var sessions: [Session] = []
        do {
            for (q, m) in memory.enumerated() {
                let txShared = try pages.page(m.ringFrame).ring(NetifTxRing.self, pages: 1)
                let rxShared = try pages.page(m.ringFrame + 1).ring(NetifRxRing.self, pages: 1)
                // The tap's first queue is the device's; the others are
                // attached in the guest's namespace for this connection (the
                // session owns and closes them, also when it fails to start).
                let fd = q == 0 ? tap.queues[0] : try NetNamespace.run(in: namespace, create: false) { try tap.openQueue() }.value
                sessions.append(try Session(device: self, index: q, memory: m, tapFD: fd, ownsTapFD: q > 0,
                                            tx: FrontRing(initializing: txShared), rx: FrontRing(initializing: rxShared),
                                            split: split, sg: sg, gso4: gso4, gso6: gso6))
            }
            try xs.transaction { t in
                // Keys of an earlier connection with other queues or channels must not linger.
                for k in ["multi-queue-num-queues", "tx-ring-ref", "rx-ring-ref", "event-channel", "event-channel-tx", "event-channel-rx"] {
                    try? t.rm(fe + "/" + k)
                }
                for d in (try? t.directory(fe)) ?? [] where d.hasPrefix("queue-") { try? t.rm(fe + "/" + d) }
                if nq > 1 { try t.write(fe + "/multi-queue-num-queues", "\(nq)") }
                for (q, s) in sessions.enumerated() {
                    for (k, v) in Self.queueKeys(q, of: nq, txRing: memory[q].txRingRef, rxRing: memory[q].rxRingRef,
                                                 ports: (s.txChannel.port, s.rxChannel?.port)) {
                        try t.write(fe + "/" + k, v)
                    }
                }
                try t.write(fe + "/request-rx-copy", "1")
                try t.write(fe + "/feature-rx-notify", "1")
                try t.write(fe + "/feature-sg", sg ? "1" : "0")
                try t.write(fe + "/feature-gso-tcpv4", gso4 ? "1" : "0")
                try t.write(fe + "/feature-gso-tcpv6", gso6 ? "1" : "0")
                try t.write(fe + "/feature-ipv6-csum-offload", "1")
            }
            try xs.switchStateIfPresent(at: fe, to: .connected)
            guard try awaitBackend(timeout, abandon: abandon, { [.connected, .closing, .closed, .unknown].contains($0) }) == .connected else {
                let why = (try? xs.readIfExists(be + "/error")) ?? nil
                throw HypervisorError.protocolViolation("backend \(be) did not connect\(why.map { ": \($0)" } ?? "")")
            }
        } catch {
            for s in sessions { s.close() }
            throw error
        }
        // Every write to the backend's state from here on is a renegotiation.
        baseline.store(backendEvents.load(ordering: .acquiring), ordering: .releasing)
        // A stop() that came while we were connecting wins.
        guard control.withLock({ c -> Bool in
            guard !c.stopped else { return false }
            c.sessions = sessions
            return true
        }) else {
            for s in sessions { s.close() }
            return
        }
        for s in sessions { s.start() }
        try? tap.setCarrier(true)
        connectionCount.wrappingAdd(1, ordering: .relaxed)
        logger.info("\(fe): connected to \(be) as \(interfaceName) in netns \(namespace) (mtu \(mtu), \(nq) queue(s)\(split ? ", split event channels" : ""), sg \(sg), gso \(gso4)/\(gso6))")
        if (try? xs.state(at: be)) != .connected { wake.signal() }
    }

    /// The memory of `wanted` queues, granting what earlier connections did
    /// not: fewer queues when the guest's memory is short (a queue takes 514
    /// pages; this device takes at most half of what is left, as blkfront does).
    func queueMemory(_ wanted: Int) throws -> [QueueMemory] {
        try control.withLock { c throws -> [QueueMemory] in
            guard !c.stopped else { throw Gone(why: "the NIC was stopped") }
            var want = wanted
            while want > max(1, c.memory.count) && (want - c.memory.count) * QueueMemory.pageCount > pages.available / 2 { want -= 1 }
            while c.memory.count < want {
                c.memory.append(try QueueMemory(pages: pages, grants: grants, backend: backendID))
            }
            return Array(c.memory.prefix(want))
        }
    }

    /// Waits up to `timeout` s, in one-second steps, for the backend's state
    /// to satisfy `settled`; `abandon` throws to stop early.
    func awaitBackend(_ timeout: Double, abandon: () throws -> Void, _ settled: (XenBus.XenbusState) -> Bool) throws -> XenBus.XenbusState? {
        var waited = 0.0
        while waited < timeout {
            if let s = xs.awaitState(at: backendPath, seconds: min(1, timeout - waited), settled) { return s }
            waited += 1
            try abandon()
        }
        return nil
    }

    /// Why a reconnect stops: the NIC was stopped, or the toolstack detached it.
    struct Gone: Error { let why: String }

    /// Throws ``Gone`` once the NIC is stopped, or the toolstack takes the
    /// device away (online=0, the directory gone, or a new device in our
    /// frontend directory: it lost the key we wrote).
    func checkAttached() throws {
        if control.withLock({ $0.stopped }) { throw Gone(why: "the NIC was stopped") }
        guard let online = (try? xs.readIfExists(backendPath + "/online")) ?? nil, online != "0",
              (try? xs.readIfExists(frontendPath + "/" + Self.handshakeKey)) ?? nil != nil else {
            throw Gone(why: "backend \(backendPath) is going away")
        }
    }

    /// The reconnect loop: waits for a renegotiation (or a data-path failure),
    /// then closes the device with the backend and connects again.
    func supervise() {
        while true {
            wake.wait()
            let (sessions, stopped) = control.withLock { ($0.sessions, $0.stopped) }
            if stopped { return }
            if !sessions.isEmpty, !sessions.contains(where: { $0.failed.load(ordering: .acquiring) }),
               backendEvents.load(ordering: .acquiring) == baseline.load(ordering: .acquiring),
               (try? xs.state(at: backendPath)) == .connected {
                continue  // nothing changed
            }
            // The toolstack removing the device (online=0, or the directory
            // gone, or a new device in its place: the frontend lost the keys we
            // wrote) is no renegotiation: the NIC stays down until the guest removes it.
            guard let online = (try? xs.readIfExists(backendPath + "/online")) ?? nil, online != "0",
                  (try? xs.readIfExists(frontendPath + "/" + Self.handshakeKey)) ?? nil != nil else {
                logger.info("\(frontendPath): backend \(backendPath) is going away; NIC stays down")
                detachedFlag.store(true, ordering: .releasing)
                stopSessions()
                return
            }
            logger.info("\(frontendPath): backend renegotiates; reconnecting")
            stopSessions()
            reconnect()
            if isDetached { return }
        }
    }

    func stopSessions() {
        let sessions = control.withLock { c -> [Session] in defer { c.sessions = [] }; return c.sessions }
        try? tap.setCarrier(false)
        for s in sessions { s.stop() }
    }

    /// Closing -> Closed -> Initialising, then the handshake again, retried
    /// until it works, the device stops or the toolstack takes it away. The
    /// states go only into our own directory (`owner`: not into a new device
    /// the toolstack put in its place).
    func reconnect() {
        let fe = frontendPath
        while true {
            do {
                try checkAttached()
                try? xs.switchStateIfPresent(at: fe, to: .closing, owner: Self.handshakeKey)
                _ = try awaitBackend(5, abandon: checkAttached) { $0 == .closing || $0 == .closed }
                try? xs.switchStateIfPresent(at: fe, to: .closed, owner: Self.handshakeKey)
                _ = try awaitBackend(5, abandon: checkAttached) { $0 == .closed }
                try? xs.switchStateIfPresent(at: fe, to: .initialising, owner: Self.handshakeKey)
                try handshake(timeout: 30, reconnecting: true)
                return
            } catch let e as Gone {
                logger.info("\(fe): \(e.why) while reconnecting; NIC stays down")
                detachedFlag.store(true, ordering: .releasing)
                return
            } catch {
                logger.warning("\(fe): reconnect failed: \(error); retrying")
            }
        }
    }

    /// Stops the data paths and closes the device with the backend (Linux's
    /// xennet_remove); the rings, grants and buffer pages go back to the guest
    /// once the backend has let go of them. The NIC goes with the last
    /// reference to the device.
    public func stop() {
        guard !control.withLock({ c -> Bool in defer { c.stopped = true }; return c.stopped }) else { return }
        wake.signal()
        stopSessions()
        if let w = backendWatch { try? xs.unwatch(w) }
        // Not into a new device the toolstack put in our place.
        if (try? xs.readIfExists(frontendPath + "/" + Self.handshakeKey)) ?? nil != nil {
            try? xs.switchStateIfPresent(at: frontendPath, to: .closing, owner: Self.handshakeKey)
            // Also a backend offering the device anew (a new device in the directory by now).
            _ = xs.awaitState(at: backendPath, seconds: 2) { [.closing, .closed, .unknown, .initialising, .initWait].contains($0) }
            try? xs.switchStateIfPresent(at: frontendPath, to: .closed, owner: Self.handshakeKey)
        }
        // A reconnect in progress initialises rings on these pages until it
        // sees the stop (each of its waits looks at least once a second).
        if supervisorDone.wait(timeout: .now() + 35) == .success {
            releaseResources()
        } else {
            logger.error("\(frontendPath): the reconnect did not stop; its queues' memory stays granted")
        }
        if createdNamespace { NetNamespace.remove(namespace) }
    }

    /// Revokes the grants and frees the pages the backend no longer maps.
    func releaseResources() {
        let memory = control.withLock { c -> [QueueMemory] in defer { c.memory = [] }; return c.memory }
        for m in memory { m.release(pages: pages, grants: grants) }
    }
}

extension NetFrontDevice {
    /// One queue's rings and buffers: two ring pages, 256 tx and 256 rx
    /// buffer pages, all granted to the backend once and kept for the
    /// device's life (a reconnect reinitialises the rings on the same pages).
    struct QueueMemory: Sendable {
        /// The tx ring's page; the rx ring's is the next one.
        let ringFrame: UInt32
        let txRingRef: GrantRef
        let rxRingRef: GrantRef
        /// The first frames of the 256 tx and 256 rx buffer pages.
        let txFirst: UInt32
        let rxFirst: UInt32
        /// Read-only grants: the backend only reads what we send.
        let txRefs: [GrantRef]
        /// Writable grants: the backend grant-copies received frames into them.
        let rxRefs: [GrantRef]

        static let pageCount = 2 + 2 * NetFrontDevice.ringSize

        init(pages: GuestPages, grants: GrantRefs, backend be: DomID) throws {
            var frames: [(first: UInt32, count: Int)] = []
            var made: [GrantRef] = []
            func grant(_ frame: UInt32, readOnly: Bool) throws -> GrantRef {
                let r = try grants.grant(frame: frame, to: be, readOnly: readOnly)
                made.append(r)
                return r
            }
            do {
                let ring = try pages.allocate(2)
                frames.append((ring, 2))
                let tx = try pages.allocate(NetFrontDevice.ringSize)
                frames.append((tx, NetFrontDevice.ringSize))
                let rx = try pages.allocate(NetFrontDevice.ringSize)
                frames.append((rx, NetFrontDevice.ringSize))
                ringFrame = ring
                txRingRef = try grant(ring, readOnly: false)
                rxRingRef = try grant(ring + 1, readOnly: false)
                txFirst = tx
                rxFirst = rx
                txRefs = try (0..<NetFrontDevice.ringSize).map { try grant(tx + UInt32($0), readOnly: true) }
                rxRefs = try (0..<NetFrontDevice.ringSize).map { try grant(rx + UInt32($0), readOnly: false) }
            } catch {
                // Nothing was offered to the backend yet: every grant revokes.
                _ = grants.revoke(made)
                for f in frames { pages.free(f.first, count: f.count) }
                throw error
            }
        }

        /// Revokes the grants and frees the pages the backend no longer maps.
        func release(pages: GuestPages, grants: GrantRefs) {
            if grants.revoke([txRingRef, rxRingRef]) { pages.free(ringFrame, count: 2) }
            if grants.revoke(txRefs) { pages.free(txFirst, count: NetFrontDevice.ringSize) }
            if grants.revoke(rxRefs) { pages.free(rxFirst, count: NetFrontDevice.ringSize) }
        }
    }
}

/// Counters of one NIC.
public final class NetFrontStats: Sendable {
    public let txPackets = Atomic<UInt64>(0)
    public let txBytes = Atomic<UInt64>(0)
    public let txDropped = Atomic<UInt64>(0)
    public let txErrors = Atomic<UInt64>(0)
    public let rxPackets = Atomic<UInt64>(0)
    public let rxBytes = Atomic<UInt64>(0)
    public let rxDropped = Atomic<UInt64>(0)
    /// Values from the backend that broke the protocol (bad id, size, offset, extra).
    public let protocolErrors = Atomic<UInt64>(0)
    /// Queues that found the NIC deleted under them (`ip link del` in the
    /// guest's namespace) and stopped reading it.
    public let nicGone = Atomic<UInt64>(0)
    public init() {}
}

extension NetFrontDevice {
    /// One queue's data path for one connection: its rings, its event
    /// channel(s), its tap queue and the thread that moves frames between them.
    final class Session: @unchecked Sendable {
        // Sound: the rings and buffers are touched only by the data thread
        // (after `start`); `failed` is read by the supervisor.
        unowned let device: NetFrontDevice
        let index: Int
        // The device's data-path pieces, held here so the per-frame path never
        // goes through the unowned reference (each use a slow-path retain).
        let tapFD: CInt
        /// Queues beyond the first attach a tap queue of their own, closed with the session.
        let ownsTapFD: Bool
        let txPages: GuestRegion, rxPages: GuestRegion
        let txRefs: [GrantRef], rxRefs: [GrantRef]
        let stats: NetFrontStats
        // The data thread's own state, touched by no other thread: exempt from
        // Swift's dynamic exclusivity checks, which cost a tenth of the thread
        // (perf: swift_beginAccess/endAccess and their thread-local access set).
        @exclusivity(unchecked) var tx: FrontRing<NetifTxRing>
        @exclusivity(unchecked) var rx: FrontRing<NetifRxRing>
        /// The queue's event channel, or its tx one with split event channels.
        let txChannel: EventChannel
        /// The rx event channel with split event channels.
        let rxChannel: EventChannel?
        let sg: Bool, gso4: Bool, gso6: Bool
        /// The NIC was deleted under us: tun then answers every poll with
        /// POLLERR, at once, and every read and write with EBADFD.
        var tapGone = false
        let stopFD: CInt
        let done = DispatchSemaphore(value: 0)
        let failed = Atomic<Bool>(false)

        @exclusivity(unchecked) var freeTx: [UInt16] = Array((0..<UInt16(NetFrontDevice.ringSize)).reversed())
        @exclusivity(unchecked) var txOut = [Bool](repeating: false, count: NetFrontDevice.ringSize)
        /// The vnet header of a frame read from the tap; the frame itself is
        /// read straight into the free tx buffer pages it will be sent from.
        let txBuffer: UnsafeMutableRawPointer
        static let txBufferSize = VnetHeader.size
        /// The read's scatter list: the header, then `txReadPages` free pages
        /// (the last ones on `freeTx`, in the order `enqueue` takes them).
        let txIov: UnsafeMutablePointer<iovec>
        static let txReadPages = NetFrontDevice.maxTxSlots - 1
        /// An rx frame's vnet header, then room to gather the frame when its
        /// headers do not fit its first slot.
        let rxBuffer: UnsafeMutableRawPointer
        static let rxBufferSize = VnetHeader.size + 65536 + 4096
        /// The frame being received, where it sits in the rx pages: the vnet
        /// header (in `rxBuffer`), then one piece per data slot. Its slots are
        /// not posted again until it is written to the tap.
        let rxIov: UnsafeMutablePointer<iovec>
        @exclusivity(unchecked) var rxPieces = 0
        @exclusivity(unchecked) var rxLength = 0
        @exclusivity(unchecked) var rxSlots = 0
        @exclusivity(unchecked) var rxFlags: UInt16 = 0
        @exclusivity(unchecked) var rxGSO: TxGSO?
        @exclusivity(unchecked) var rxBad = false
        @exclusivity(unchecked) var rxInFrame = false
        @exclusivity(unchecked) var expectExtra = false

        /// Binds the queue's event channel(s) (unbound ports the backend
        /// binds to); on a throw the owned tap queue is closed.
        init(device: NetFrontDevice, index: Int, memory m: QueueMemory, tapFD: CInt, ownsTapFD: Bool,
             tx: FrontRing<NetifTxRing>, rx: FrontRing<NetifRxRing>, split: Bool,
             sg: Bool, gso4: Bool, gso6: Bool) throws {
            var channels: [EventChannel] = []
            let fd = cxen_eventfd(0, O_CLOEXEC | O_NONBLOCK)  // EFD_CLOEXEC | EFD_NONBLOCK
            do {
                guard fd >= 0 else { throw HypervisorError.system(call: "eventfd", errno: errno) }
                for _ in 0..<(split ? 2 : 1) {
                    channels.append(try device.hv.channel(try device.hv.allocUnbound(remote: device.backendID)))
                }
            } catch {
                for c in channels { try? c.close() }
                if fd >= 0 { Glibc.close(fd) }
                if ownsTapFD { Glibc.close(tapFD) }
                throw error
            }
            stopFD = fd
            txChannel = channels[0]
            rxChannel = split ? channels[1] : nil
            self.device = device
            self.index = index
            self.tapFD = tapFD
            self.ownsTapFD = ownsTapFD
            txPages = device.pages.page(m.txFirst, count: NetFrontDevice.ringSize)
            rxPages = device.pages.page(m.rxFirst, count: NetFrontDevice.ringSize)
            txRefs = m.txRefs
            rxRefs = m.rxRefs
            stats = device.stats
            self.tx = tx
            self.rx = rx
            self.sg = sg
            self.gso4 = gso4
            self.gso6 = gso6
            txBuffer = .allocate(byteCount: Self.txBufferSize, alignment: 64)
            txIov = .allocate(capacity: 1 + Self.txReadPages)
            rxIov = .allocate(capacity: 2 + NetFrontDevice.maxRxSlots)
            rxBuffer = .allocate(byteCount: Self.rxBufferSize, alignment: 64)
            postRx()
        }

        deinit {
            Glibc.close(stopFD)
            txBuffer.deallocate()
            txIov.deallocate()
            rxIov.deallocate()
            rxBuffer.deallocate()
        }

        func start() {
            guard DetachedThread.start(name: "nf-\(device.interfaceName)q\(index)", { [self] in run(); done.signal() }) else {
                // As a data path that failed: the supervisor reconnects, and stop() finds it ended.
                device.logger.error("\(device.frontendPath): no thread for queue \(index) (pthread_create failed); stopping the data path")
                failed.store(true, ordering: .releasing)
                done.signal()
                device.wake.signal()
                return
            }
        }

        /// Stops the thread and waits for it, then ``close()``s.
        func stop() {
            var one: UInt64 = 1
            _ = write(stopFD, &one, 8)
            done.wait()
            close()
        }

        /// Closes the event channel(s) and the session's own tap queue (for a
        /// session whose thread never started, or has ended).
        func close() {
            try? txChannel.close()
            try? rxChannel?.close()
            if ownsTapFD { Glibc.close(tapFD) }
        }

        func protocolError(_ what: @autoclosure () -> String) {
            let n = stats.protocolErrors.wrappingAdd(1, ordering: .relaxed).newValue
            if n <= 10 { device.logger.warning("\(device.frontendPath): backend \(what())") }
        }

        // MARK: Loop

        func run() {
            // The stop eventfd, the tap queue, then the event channel(s).
            var pfds = [pollfd(fd: stopFD, events: Int16(POLLIN), revents: 0),
                        pollfd(fd: tapFD, events: Int16(POLLIN), revents: 0),
                        pollfd(fd: txChannel.descriptor, events: Int16(POLLIN), revents: 0)]
            if let rxChannel { pfds.append(pollfd(fd: rxChannel.descriptor, events: Int16(POLLIN), revents: 0)) }
            do {
                while true {
                    try reapTx()
                    try receive()
                    transmit()
                    // Ask for an event for the next responses, then look again before sleeping.
                    if try tx.finalCheckForResponses() { continue }
                    if try rx.finalCheckForResponses() { continue }
                    if tapGone && pfds[1].fd >= 0 {
                        // Polled no more (it would wake us at once, for ever); said
                        // before the wait, which may be long.
                        pfds[1].fd = -1
                        stats.nicGone.wrappingAdd(1, ordering: .relaxed)
                        device.logger.warning("\(device.frontendPath): NIC \(device.interfaceName) was deleted in the guest's namespace; queue \(index) no longer reads it")
                    }
                    pfds[1].events = txRoom ? Int16(POLLIN) : 0
                    for i in pfds.indices { pfds[i].revents = 0 }
                    while poll(&pfds, nfds_t(pfds.count), -1) < 0 && errno == EINTR {}
                    if pfds[0].revents != 0 { return }
                    if pfds[1].revents & Int16(POLLERR | POLLHUP | POLLNVAL) != 0 { tapGone = true }
                    // Only a channel the poll found kicked is consumed: a wake-up
                    // by the tap costs no event-channel syscall.
                    if pfds[2].revents != 0 { _ = txChannel.consume() }
                    if let rxChannel, pfds[3].revents != 0 { _ = rxChannel.consume() }
                }
            } catch {
                device.logger.error("\(device.frontendPath): \(error); stopping the data path")
                failed.store(true, ordering: .releasing)
                device.wake.signal()
            }
        }

        /// Room on the tx ring and in tx buffers for the largest packet.
        var txRoom: Bool { tx.freeRequests >= UInt32(NetFrontDevice.maxTxSlots) && freeTx.count >= NetFrontDevice.maxTxSlots }

        // MARK: Transmit (tap -> tx ring)

        func reapTx() throws(RingError) {
            while let r = try tx.nextResponse() {
                if r.status == Int16(NETIF_RSP_NULL) { continue }  // an extra-info slot's answer
                guard r.id < UInt16(NetFrontDevice.ringSize), txOut[Int(r.id)] else {
                    protocolError("answered tx id \(r.id), which is not outstanding")
                    continue
                }
                txOut[Int(r.id)] = false
                freeTx.append(r.id)
                switch Int32(r.status) {
                case NETIF_RSP_OKAY: break
                case NETIF_RSP_DROPPED: stats.txDropped.wrappingAdd(1, ordering: .relaxed)
                case NETIF_RSP_ERROR: stats.txErrors.wrappingAdd(1, ordering: .relaxed)
                default: protocolError("tx status \(r.status)")
                }
            }
        }

        /// Reads frames from the tap while the ring has room. Each frame is
        /// pushed (and the backend kicked if it asked) as soon as it is on the
        /// ring, as Linux's xennet_start_xmit does, so the backend copies one
        /// while we read the next instead of waiting for a whole batch.
        func transmit() {
            let fd = tapFD
            var batch = 0
            // Sound: the tx pages stay mapped for the device's life, which outlasts this session.
            let pages = txPages.unsafeBaseAddress
            while !tapGone && txRoom && batch < 64 {
                // txRoom leaves at least maxTxSlots ids free: the pages of the last ones take the frame.
                txIov[0] = iovec(iov_base: txBuffer, iov_len: VnetHeader.size)
                let last = freeTx.count - 1
                for j in 0..<Self.txReadPages {
                    txIov[1 + j] = iovec(iov_base: pages + Int(freeTx[last - j]) * HVLimits.pageSize, iov_len: HVLimits.pageSize)
                }
                let n = readv(fd, txIov, Int32(1 + Self.txReadPages))
                if n < 0 {
                    if errno == EINTR { continue }
                    if errno == EBADFD { tapGone = true }
                    break  // EAGAIN: the tap is empty
                }
                batch += 1
                guard n >= VnetHeader.size + 14, n - VnetHeader.size <= NetFrontDevice.maxFrame else {
                    stats.txDropped.wrappingAdd(1, ordering: .relaxed)
                    continue
                }
                if enqueue(length: n - VnetHeader.size) && tx.pushRequestsAndCheckNotify() { try? txChannel.notify() }
            }
        }

        /// Puts the frame just read on the ring: its header in `txBuffer`, its
        /// data already in the pages of the last free ids, one slot per page
        /// (NETTXF_more_data), the GSO extra after the first.
        func enqueue(length len: Int) -> Bool {
            let h = VnetHeader.load(from: txBuffer)
            let gso: TxGSO?
            do { gso = try h.netifGSO(tcpv4: gso4, tcpv6: gso6) } catch {
                stats.txDropped.wrappingAdd(1, ordering: .relaxed)
                return false
            }
            if gso != nil && h.gsoSize == 0 {
                stats.txDropped.wrappingAdd(1, ordering: .relaxed)
                return false
            }
            let page = HVLimits.pageSize
            let slots = (len + page - 1) / page
            guard sg || slots == 1, slots + (gso == nil ? 0 : 1) <= NetFrontDevice.maxTxSlots else {
                stats.txDropped.wrappingAdd(1, ordering: .relaxed)
                return false
            }
            var flags: UInt16 = 0
            if h.needsChecksum { flags |= UInt16(NETTXF_csum_blank | NETTXF_data_validated) }
            else if h.dataValid { flags |= UInt16(NETTXF_data_validated) }
            for s in 0..<slots {
                let id = freeTx.removeLast()  // the page slot s was read into
                txOut[Int(id)] = true
                let n = min(page, len - s * page)
                tx.enqueueTxSlot(s, of: slots, totalBytes: len, slotBytes: n, gref: txRefs[Int(id)], id: id, flags: flags, gso: gso)
            }
            stats.txPackets.wrappingAdd(1, ordering: .relaxed)
            stats.txBytes.wrappingAdd(UInt64(len), ordering: .relaxed)
            return true
        }

        // MARK: Receive (rx ring -> tap)

        /// Keeps every rx slot posted: request id = slot = buffer page.
        @discardableResult
        func postRx() -> Bool {
            var posted = false
            // The slots of a frame still being received stay ours.
            let held = UInt32(rxInFrame || expectExtra ? rxSlots : 0)
            while !rx.isFull && rx.reqProdPvt &- rx.rspCons < UInt32(NetFrontDevice.ringSize) - held {
                let id = UInt16(rx.reqProdPvt & UInt32(NetFrontDevice.ringSize - 1))
                var r = netif_rx_request()
                r.id = id
                r.gref = rxRefs[Int(id)]
                rx.enqueue(r)
                posted = true
            }
            return posted && rx.pushRequestsAndCheckNotify()
        }

        func receive() throws {
            var any = false
            while true {
                let index = rx.rspCons
                guard let r = try rx.nextResponse() else { break }
                any = true
                take(r, slot: Int(index & UInt32(NetFrontDevice.ringSize - 1)))
            }
            if any && postRx() { try? (rxChannel ?? txChannel).notify() }
        }

        /// One rx response, in ring order.
        func take(_ r: netif_rx_response, slot: Int) {
            rxSlots += 1
            if expectExtra {
                // Sound: netif_extra_info and netif_rx_response are both 8-byte plain C structs sharing a ring slot.
                let x = unsafeBitCast(r, to: netif_extra_info.self)
                expectExtra = x.flags & UInt8(XEN_NETIF_EXTRA_FLAG_MORE) != 0
                switch Int32(x.type) {
                case XEN_NETIF_EXTRA_TYPE_GSO:
                    let t = Int32(x.u.gso.type)
                    if (t == XEN_NETIF_GSO_TYPE_TCPV4 || t == XEN_NETIF_GSO_TYPE_TCPV6) && x.u.gso.size > 0 {
                        rxGSO = TxGSO(type: x.u.gso.type, size: x.u.gso.size)
                    } else {
                        protocolError("sent GSO type \(x.u.gso.type) size \(x.u.gso.size)")
                        rxBad = true
                    }
                case 1..<XEN_NETIF_EXTRA_TYPE_MAX: break  // not ours to act on
                default:
                    protocolError("sent extra type \(x.type)")
                    rxBad = true
                }
                if !expectExtra && rxFlags & UInt16(NETRXF_more_data) == 0 { finishFrame() }
                return
            }
            if !rxInFrame {
                rxInFrame = true
                rxFlags = r.flags
            } else {
                rxFlags = (rxFlags & ~UInt16(NETRXF_more_data)) | (r.flags & UInt16(NETRXF_more_data))
            }
            let size = Int(r.status), off = Int(r.offset)
            if r.id != UInt16(slot) {
                protocolError("answered rx id \(r.id) in slot \(slot)")
                rxBad = true
            } else if r.status < 0 {
                rxBad = true
            } else if off + size > HVLimits.pageSize {
                protocolError("rx slot offset \(off) size \(size) crosses the page")
                rxBad = true
            } else if rxLength + size > NetFrontDevice.maxFrame + 14 {
                protocolError("rx frame longer than \(rxLength + size) bytes")
                rxBad = true
            } else if !rxBad && rxPieces <= NetFrontDevice.maxRxSlots {
                // In bounds: slot < 256 and off + size <= one page were checked above.
                rxIov[1 + rxPieces] = iovec(iov_base: rxPages.unsafeBaseAddress + slot * HVLimits.pageSize + off, iov_len: size)
                rxPieces += 1
                rxLength += size
            }
            if rxSlots > NetFrontDevice.maxRxSlots && !rxBad {
                protocolError("rx frame over \(NetFrontDevice.maxRxSlots) slots")
                rxBad = true
            }
            if rxSlots == 1 && r.flags & UInt16(NETRXF_extra_info) != 0 {
                expectExtra = true
                return
            }
            if r.flags & UInt16(NETRXF_more_data) == 0 { finishFrame() }
        }

        /// Writes the assembled frame to the tap with its vnet header, or drops it.
        func finishFrame() {
            defer {
                rxLength = 0; rxPieces = 0; rxSlots = 0; rxFlags = 0; rxGSO = nil; rxBad = false; rxInFrame = false; expectExtra = false
            }
            guard !rxBad, rxLength >= 14, rxPieces > 0 else {
                stats.rxDropped.wrappingAdd(1, ordering: .relaxed)
                return
            }
            // The headers are read (and the pseudo-header checksum written) in the
            // first slot's page; a frame whose headers run past it is gathered first.
            var frame = UnsafeMutableRawBufferPointer(start: rxIov[1].iov_base, count: rxIov[1].iov_len)
            var gathered = false
            func gather() {
                var at = rxBuffer + VnetHeader.size
                for i in 0..<rxPieces {
                    at.copyMemory(from: rxIov[1 + i].iov_base!, byteCount: rxIov[1 + i].iov_len)
                    at += rxIov[1 + i].iov_len
                }
                frame = UnsafeMutableRawBufferPointer(start: rxBuffer + VnetHeader.size, count: rxLength)
                gathered = true
            }
            if frame.count < 14 { gather() }
            var h = VnetHeader()
            let blank = rxFlags & UInt16(NETRXF_csum_blank) != 0
            if blank || rxGSO != nil {
                if !gathered && rxPieces > 1, (try? PacketParser.checksumLocation(UnsafeRawBufferPointer(frame))) == nil { gather() }
                guard let loc = try? PacketParser.checksumLocation(UnsafeRawBufferPointer(frame)) else {
                    stats.rxDropped.wrappingAdd(1, ordering: .relaxed)
                    return
                }
                if !blank { PacketParser.writePseudoHeaderChecksum(frame, loc, totalLength: rxLength) }
                h.flags = CNET_VNET_F_NEEDS_CSUM
                h.csumStart = UInt16(loc.l4Offset)
                h.csumOffset = UInt16(loc.checksumOffset)
                if let g = rxGSO {
                    guard loc.l4Protocol == 6, loc.isIPv6 == (Int32(g.type) == XEN_NETIF_GSO_TYPE_TCPV6) else {
                        stats.rxDropped.wrappingAdd(1, ordering: .relaxed)
                        return
                    }
                    h.gsoType = loc.isIPv6 ? CNET_VNET_GSO_TCPV6 : CNET_VNET_GSO_TCPV4
                    h.gsoSize = g.size
                    h.headerLength = UInt16(loc.headerLength)
                }
            } else if rxFlags & UInt16(NETRXF_data_validated) != 0 {
                h.flags = CNET_VNET_F_DATA_VALID
            }
            h.store(to: rxBuffer)
            let n: Int
            if tapGone {
                n = -1
            } else if gathered {
                n = write(tapFD, rxBuffer, VnetHeader.size + rxLength)
            } else {
                rxIov[0] = iovec(iov_base: rxBuffer, iov_len: VnetHeader.size)
                n = writev(tapFD, rxIov, Int32(1 + rxPieces))
            }
            if n == VnetHeader.size + rxLength {
                stats.rxPackets.wrappingAdd(1, ordering: .relaxed)
                stats.rxBytes.wrappingAdd(UInt64(rxLength), ordering: .relaxed)
            } else {
                if n < 0 && errno == EBADFD { tapGone = true }
                stats.rxDropped.wrappingAdd(1, ordering: .relaxed)
            }
        }
    }
}
