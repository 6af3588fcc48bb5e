import CNetShim
import CXen
import Glibc
import Logging
import Synchronization
import XenHV
import XenRing

/// An Ethernet address.
public struct MACAddress: Equatable, Hashable, Sendable, CustomStringConvertible {
    public var bytes: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8)
    public init(_ b: [UInt8]) {
        precondition(b.count == 6)
        bytes = (b[0], b[1], b[2], b[3], b[4], b[5])
    }
    /// Parses "aa:bb:cc:dd:ee:ff" (the vif's `mac` key).
    public init?(_ s: String) {
        let parts = s.split(separator: ":")
        guard parts.count == 6 else { return nil }
        var b: [UInt8] = []
        for p in parts {
            guard p.count == 2, let v = UInt8(p, radix: 16) else { return nil }
            b.append(v)
        }
        self.init(b)
    }
    public var array: [UInt8] { [bytes.0, bytes.1, bytes.2, bytes.3, bytes.4, bytes.5] }
    public var description: String { array.map { String(format2: $0) }.joined(separator: ":") }
    public static func == (a: MACAddress, b: MACAddress) -> Bool { a.array == b.array }
    public func hash(into h: inout Hasher) { h.combine(array) }
    /// What netback gives the dom0 side of every vif (Linux: FE:FF:FF:FF:FF:FF),
    /// so the bridge never takes the guest's address as its own.
    public static let backendSide = MACAddress([0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF])
}

extension String {
    init(format2 v: UInt8) {
        let d = Array("0123456789abcdef")
        self = String([d[Int(v >> 4)], d[Int(v & 15)]])
    }
}

/// How a vif is set up before any frontend connects: what the toolstack wrote
/// in the backend directory (mac, mtu, rate, bridge) plus our own limits.
public struct VifConfig: Sendable {
    public var frontendDomid: DomID
    public var devid: UInt32
    /// The guest's address (`mac`); the tap itself gets ``MACAddress/backendSide``.
    public var mac: MACAddress?
    public var mtu: UInt32 = 1500
    /// `rate`: credit-based transmit limiting; nil is unlimited.
    public var rate: RateLimit?
    /// `multi-queue-max-queues` we offer; above 1 the tap is IFF_MULTI_QUEUE.
    public var maxQueues: Int = 1
    /// Tap name; Xen's `vif<domid>.<devid>` when nil.
    public var tapName: String?
    /// The name the tap gets.
    public var effectiveTapName: String { tapName ?? Tap.vifName(domid: frontendDomid, devid: devid) }
    /// Frames held per queue while the guest posts no rx buffers (XSA-392).
    public var rxQueueLimit: Int = 64
    /// After this long without rx buffers for waiting frames, the carrier goes
    /// off and the backlog is dropped (Linux: rx_stall_timeout, 60 s). Only
    /// for a frontend with feature-rx-notify: without it there is no stall
    /// detection, as in Linux.
    public var rxStallTimeoutNanoseconds: UInt64 = 60_000_000_000

    public init(frontendDomid: DomID, devid: UInt32, mac: MACAddress? = nil, mtu: UInt32 = 1500,
                rate: RateLimit? = nil, maxQueues: Int = 1, tapName: String? = nil) {
        self.frontendDomid = frontendDomid
        self.devid = devid
        self.mac = mac
        self.mtu = mtu
        self.rate = rate
        self.maxQueues = maxQueues
        self.tapName = tapName
    }
}

/// The event channel(s) of one queue: `event-channel`, or
/// `event-channel-tx` / `event-channel-rx` with feature-split-event-channels.
public enum QueueEventChannels: Sendable, Equatable {
    case shared(EventPort)
    case split(tx: EventPort, rx: EventPort)

    /// A split pair naming one port is that one channel, bound once (Xen
    /// refuses a second bind of a remote port; Linux's xenvif_connect_data).
    public var normalized: QueueEventChannels {
        if case .split(let t, let r) = self, t == r { return .shared(t) }
        return self
    }
}

/// One queue as the frontend announced it (`tx-ring-ref`, `rx-ring-ref`, and
/// the event channel(s), under `queue-N/` when multi-queue).
public struct VifQueueRings: Sendable, Equatable {
    public var txRingRef: GrantRef
    public var rxRingRef: GrantRef
    public var events: QueueEventChannels
    public init(txRingRef: GrantRef, rxRingRef: GrantRef, events: QueueEventChannels) {
        self.txRingRef = txRingRef
        self.rxRingRef = rxRingRef
        self.events = events
    }
}

/// The features the frontend wrote (request-rx-copy, feature-rx-notify,
/// feature-sg, feature-gso-tcpv4/v6, feature-no-csum-offload,
/// feature-ipv6-csum-offload).
public struct FrontendFeatures: Sendable, Equatable {
    public var rxCopy = true
    public var rxNotify = true
    public var sg = false
    public var gsoTCPv4 = false
    public var gsoTCPv6 = false
    /// `feature-no-csum-offload`: the guest wants fully checksummed IPv4 frames.
    public var noChecksumOffload = false
    public var ipv6ChecksumOffload = false
    public init(rxCopy: Bool = true, rxNotify: Bool = true, sg: Bool = false, gsoTCPv4: Bool = false,
                gsoTCPv6: Bool = false, noChecksumOffload: Bool = false, ipv6ChecksumOffload: Bool = false) {
        self.rxCopy = rxCopy; self.rxNotify = rxNotify; self.sg = sg; self.gsoTCPv4 = gsoTCPv4
        self.gsoTCPv6 = gsoTCPv6; self.noChecksumOffload = noChecksumOffload
        self.ipv6ChecksumOffload = ipv6ChecksumOffload
    }
    /// All the offloads this backend can use.
    public static let all = FrontendFeatures(sg: true, gsoTCPv4: true, gsoTCPv6: true, ipv6ChecksumOffload: true)
}

/// What the frontend connects with: its queues and features.
public struct VifConnection: Sendable, Equatable {
    public var queues: [VifQueueRings]
    public var features: FrontendFeatures
    public init(queues: [VifQueueRings], features: FrontendFeatures) {
        self.queues = queues
        self.features = features
    }
}

public enum VifError: Error, CustomStringConvertible, Sendable {
    case tap(TapError)
    case netlink(NetlinkError)
    case grant(ref: GrantRef, GrantStatus)
    case eventChannel(port: EventPort, String)
    case badConnection(String)
    case alreadyConnected
    /// No thread for a queue (pthread_create's error).
    case thread(errno: Int32)

    public var description: String {
        switch self {
        case .tap(let e): "\(e)"
        case .netlink(let e): "\(e)"
        case let .grant(ref, s): "cannot map ring grant \(ref): \(s)"
        case let .eventChannel(port, m): "cannot bind event channel \(port): \(m)"
        case .badConnection(let m): m
        case .alreadyConnected: "vif is already connected"
        case .thread(let e): "cannot start a queue thread: \(String(cString: strerror(e)))"
        }
    }
}

/// One netback vif: the tap `vif<domid>.<devid>` and, while a frontend is
/// connected, one worker thread per queue serving its tx and rx rings.
///
/// Lifecycle (what the XenBus handshake calls): `init` when the backend
/// directory appears (creates the tap; the hotplug script then enslaves it),
/// ``connect(_:)`` when the frontend is Connected with its ring refs and
/// event channels, ``disconnect()`` when it closes (also re-arms a vif a
/// fatal error disabled), ``close()`` (or deinit) when the device goes away.
/// Each vif has its own threads, so a stalled or hostile guest never holds
/// another vif up.
public final class Vif: @unchecked Sendable {
    // Sound: `workers`/`extraQueues` change only under `lifecycle`; the rest is
    // immutable or atomic.
    public let config: VifConfig
    public let hypervisor: Hypervisor
    public var stats: VifStats { shared.stats }
    public private(set) var tap: Tap?
    public let name: String
    let logger: Logger
    let shared: VifShared
    private let lifecycle = Mutex<Void>(())
    private var workers: [QueueWorker] = []

    /// Keys the backend writes in its xenstore directory (in InitWait).
    public static func backendFeatures(maxQueues: Int) -> [(String, String)] {
        [("feature-sg", "1"), ("feature-gso-tcpv4", "1"), ("feature-gso-tcpv6", "1"),
         ("feature-ipv6-csum-offload", "1"), ("feature-rx-copy", "1"), ("feature-rx-flip", "0"),
         ("feature-split-event-channels", "1"), ("multi-queue-max-queues", "\(maxQueues)"),
         ("feature-multicast-control", "0")]
    }

    /// Creates the tap (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, and
    /// `IFF_MULTI_QUEUE` when more than one queue is offered), sets its MTU and
    /// the backend-side address. The tap stays down and unbridged: that is the
    /// hotplug script's job (`vif-bridge` → `xen-netlink`).
    public init(hypervisor: Hypervisor, config: VifConfig, logger: Logger? = nil) throws(VifError) {
        self.config = config
        self.hypervisor = hypervisor
        let wanted = config.effectiveTapName
        let t: Tap
        // Made, never joined: a tap of that name that exists (another vif's
        // `vifname`, a leftover) would otherwise take this guest's frames.
        do { t = try Tap(name: wanted, queues: 1, multiQueue: config.maxQueues > 1, exclusive: true) } catch { throw .tap(error) }
        tap = t
        name = t.name
        var l = logger ?? Logger(label: "netback")
        l[metadataKey: "vif"] = "\(t.name)"
        self.logger = l
        shared = VifShared(tap: t, logger: l, stallTimeout: config.rxStallTimeoutNanoseconds, queues: config.maxQueues, rate: config.rate)
        do {
            let nl = try Netlink()
            try nl.setAddress(t.name, .backendSide)
            try nl.setMTU(t.name, config.mtu)
        } catch {
            throw .netlink(error)
        }
        // No carrier until a frontend connects (Linux's xenvif_alloc), so the
        // bridge forwards nothing to a port no guest reads.
        do throws(TapError) { try t.setCarrier(false) } catch { throw .tap(error) }
    }

    deinit { close() }

    /// Why the vif was disabled by a fatal transmit error, or nil.
    public var disabledReason: String? { shared.reason.withLock { $0 } }
    public var isDisabled: Bool { shared.disabled.load(ordering: .acquiring) }
    public var isConnected: Bool { lifecycle.withLock { _ in !workers.isEmpty } }

    /// Maps every queue's rings, binds its event channel(s), sets the tap's
    /// offloads from the frontend's features and starts one worker per queue.
    public func connect(_ c: VifConnection) throws(VifError) {
        try lifecycle.withLock { _ throws(VifError) in
            guard workers.isEmpty else { throw .alreadyConnected }
            guard let tap else { throw .badConnection("vif is closed") }
            guard !c.queues.isEmpty, c.queues.count <= max(1, config.maxQueues) else {
                throw .badConnection("frontend asked for \(c.queues.count) queues, at most \(config.maxQueues) offered")
            }
            guard c.features.rxCopy else { throw .badConnection("frontend does not support rx-copy") }
            let f = c.features
            // A frontend without scatter-gather takes one page per frame: cap
            // the MTU at 1500 as Linux netback does, so the bridge never
            // forwards it a frame that needs several slots.
            let mtu = f.sg ? config.mtu : min(config.mtu, 1500)
            do throws(NetlinkError) {
                let nl = try Netlink()
                if try nl.link(name).mtu != mtu { try nl.setMTU(name, mtu) }
            } catch {
                throw .netlink(error)
            }
            do throws(TapError) {
                let o = Self.tapOffloads(f)
                try tap.setOffload(checksum: o.checksum, tso4: o.tso4, tso6: o.tso6)
                try tap.setCarrier(true)
            } catch { throw .tap(error) }
            shared.disabled.store(false, ordering: .releasing)
            shared.reason.withLock { $0 = nil }
            var started: [QueueWorker] = []
            do throws(VifError) {
                for (i, q) in c.queues.enumerated() {
                    let fd: CInt
                    if i == 0 { fd = tap.queues[0] } else {
                        do throws(TapError) { fd = try tap.openQueue() } catch { throw .tap(error) }
                    }
                    let w = try QueueWorker(shared: shared, hypervisor: hypervisor, domid: config.frontendDomid,
                                              rxQueueLimit: config.rxQueueLimit, index: i, rings: q, features: f, tapFD: fd, ownsFD: i != 0)
                    started.append(w)
                }
            } catch {
                for w in started { w.stop() }
                try? tap.setCarrier(false)
                throw error
            }
            do throws(VifError) {
                for w in started { try w.start() }
            } catch {
                for w in started { w.stop() }  // joins those that started, releases the rest
                try? tap.setCarrier(false)
                throw error
            }
            workers = started
            logger.info("connected: \(c.queues.count) queue(s), sg \(f.sg), gso4 \(f.gsoTCPv4), gso6 \(f.gsoTCPv6)")
        }
    }

    /// The tap offloads (TUNSETOFFLOAD) a frontend's features allow, as
    /// Linux's xenvif_fix_features clears what it did not offer: checksum
    /// offload unless feature-no-csum-offload (TUN_F_CSUM is NETIF_F_HW_CSUM,
    /// IPv6 too: without feature-ipv6-csum-offload the rx path finishes IPv6
    /// checksums itself); TSO4/TSO6 with scatter-gather and the GSO feature,
    /// TSO6 only with IPv6 checksum offload (the stack drops TSO6 without it).
    public static func tapOffloads(_ f: FrontendFeatures) -> (checksum: Bool, tso4: Bool, tso6: Bool) {
        (!f.noChecksumOffload, f.sg && f.gsoTCPv4, f.sg && f.gsoTCPv6 && f.ipv6ChecksumOffload)
    }

    /// The toolstack's `rate` changed (Linux's xen_net_rate_changed, on its
    /// watch of the backend's `rate`): every queue takes it at its next turn,
    /// woken for it, and so does a later reconnect.
    public func changeRate(_ rate: RateLimit?) {
        guard shared.rate.withLock({ r -> Bool in defer { r = rate }; return r != rate }) else { return }
        shared.rateChanges.wrappingAdd(1, ordering: .releasing)
        lifecycle.withLock { _ in for w in workers { w.wake() } }
        logger.info("rate now \(rate.map { "\($0.bytesPerInterval) bytes per \($0.intervalMicroseconds) us" } ?? "unlimited")")
    }

    /// The rate the queues use now.
    public var rate: RateLimit? { shared.rate.withLock { $0 } }

    /// Stops the workers, unmaps the rings and closes the event channels. The
    /// tap stays (a reconnect reuses it), without carrier (Linux's
    /// xenvif_disconnect_data), and the frames it still holds are dropped
    /// (xenvif_rx_queue_purge): a frontend that connects later is not handed
    /// frames from before, and none sit in dom0 meanwhile.
    public func disconnect() {
        lifecycle.withLock { _ in
            guard !workers.isEmpty else { return }
            for w in workers { w.stop() }
            workers = []
            guard let tap else { return }
            try? tap.setCarrier(false)
            var frame = [UInt8](repeating: 0, count: 65_536 + VnetHeader.size)
            var drained = 0
            while drained < 4096 && read(tap.queues[0], &frame, frame.count) > 0 { drained += 1 }
        }
    }

    /// Disconnects and removes the tap.
    public func close() {
        disconnect()
        lifecycle.withLock { _ in tap = nil }
    }
}

/// What a vif's queue workers share with it: counters, the disabled flag and
/// why, the tap (for the carrier) and the logger.
final class VifShared: @unchecked Sendable {
    // Sound: atomics and a mutex; the rest is immutable.
    let stats: VifStats
    let disabled = Atomic<Bool>(false)
    let reason = Mutex<String?>(nil)
    /// Weak: the vif owns the tap, so closing the vif removes it.
    weak var tap: Tap?
    let logger: Logger
    let stallTimeout: UInt64
    /// The toolstack's `rate`, and how often it changed: a queue compares the
    /// count at each turn and takes the rate when it moved.
    let rate: Mutex<RateLimit?>
    let rateChanges = Atomic<UInt64>(0)

    init(tap: Tap, logger: Logger, stallTimeout: UInt64, queues: Int, rate: RateLimit?) {
        stats = VifStats(queues: queues)
        self.rate = Mutex(rate)
        self.tap = tap
        self.logger = logger
        self.stallTimeout = stallTimeout
    }

    /// Disables the vif after a fatal transmit error (Linux xenvif_fatal_tx_err):
    /// every queue stops serving its rings until the frontend reconnects.
    func fatal(_ error: TxFatal, queue: Int) {
        // The reason is recorded before the flag goes up, so whoever sees the
        // vif disabled also sees why.
        let first = reason.withLock { r -> Bool in
            guard r == nil else { return false }
            r = error.description
            return true
        }
        guard first else { return }
        stats.count(.txFatal)
        disabled.store(true, ordering: .releasing)
        logger.error("fatal error on queue \(queue), disabling vif: \(error)")
        try? tap?.setCarrier(false)
    }
}

extension Tap {
    /// Attaches one more queue descriptor (IFF_MULTI_QUEUE taps only); the
    /// caller owns and closes it.
    public func openQueue() throws(TapError) -> CInt {
        guard multiQueue else { throw TapError(operation: "attach queue to \(name)", errno: EINVAL) }
        var actual = [CChar](repeating: 0, count: 16)
        let fd = cnet_tap_open(name, 1, 0, &actual)
        guard fd >= 0 else { throw TapError(operation: "TUNSETIFF \(name)", errno: -fd) }
        let r = cnet_tap_set_vnet_hdr_size(fd, Int32(VnetHeader.size))
        guard r == 0 else {
            Glibc.close(fd)
            throw TapError(operation: "TUNSETVNETHDRSZ \(name)", errno: -r)
        }
        return fd
    }
}
