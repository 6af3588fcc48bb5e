import CNetShim
import CXen
import Foundation
import Glibc
import Logging
import NetBack
import NetFrontKit
import Synchronization
import Testing
import XenBus
import XenHV
import XenRing
import XenStore
import XenTestKit

// What the netback hostile cases share: in-process vifs, netback serving the
// harness's xenstore through the real XenBus handshake and hotplug script, a
// well-behaved second guest's transmit traffic, and tx response slot checks.

/// A vif of `g` served in this process by `dom0` (no XenBus): a NetFront in
/// the guest's pages `slot`, its tap up and unbridged. Needs root.
/// `quiet`: the host sends nothing of its own on the tap (IPv6 is off before
/// it comes up), so a test can count every rx buffer; `mtu` is set before it comes up.
func directVif(_ dom0: Hypervisor, _ g: Dom0Harness.Guest, _ tag: String, split: Bool = false,
               postRx: Bool = true, quiet: Bool = false, mtu: UInt32? = nil) throws -> (Vif, NetFront) {
    let front = try NetFront(guest: g.hypervisor, split: split)
    let v = try Vif(hypervisor: dom0, config: VifConfig(frontendDomid: g.domid, devid: 0,
                                                         tapName: "hx\(tag)\(getpid() % 100000)"))
    if postRx { for q in front.queues { try q.postRx() } }
    try v.connect(front.connection(features: .all))
    if quiet {
        let knob = "/proc/sys/net/ipv6/conf/\(v.name)/disable_ipv6"
        guard (try? "1".write(toFile: knob, atomically: false, encoding: .utf8)) != nil else { throw FrontError("cannot write \(knob)") }
    }
    if let mtu { try Netlink().setMTU(v.name, mtu) }
    try Netlink().setUp(v.name)
    return (v, front)
}

/// A hostile guest's vif next to a bystander's on one dom0, each on a vif of
/// its own driven directly (``directVif``), the bystander's traffic kept
/// flowing by a ``NetWorker``. `finish()` checks the bystander was never held
/// up; `close()` removes both vifs.
final class HostileVifPair {
    let d: HostileDom0
    let liar: Dom0Harness.Guest, bystander: Dom0Harness.Guest
    let vif: Vif, front: NetFront
    let bystanderVif: Vif
    let worker: NetWorker
    var queue: FrontQueue { front.queues[0] }
    var grants: GrantTableWriter { liar.hypervisor.grantTable! }

    /// `tags`: the two vifs' name tags, unique among the tests.
    init(_ name: String, tags: (String, String), postRx: Bool = true, quiet: Bool = false, mtu: UInt32? = nil) throws {
        d = try HostileDom0()
        let dom0 = try d.s.dom0Hypervisor()
        liar = try d.guest(name, pages: 1024)
        bystander = try d.guest("bystander", pages: 1024)
        (vif, front) = try directVif(dom0, liar, tags.0, postRx: postRx, quiet: quiet, mtu: mtu)
        do {
            let (bv, bf) = try directVif(dom0, bystander, tags.1)
            bystanderVif = bv
            worker = NetWorker(bf.queues[0])
        } catch {
            vif.close()
            throw error
        }
        worker.start()
    }

    func finish() {
        let w = worker.stop()
        #expect(w.failures.isEmpty, "\(w.failures)")
        #expect(w.packets > 0)
    }

    func close() {
        vif.close()
        bystanderVif.close()
    }
}

/// netback as the daemon runs it (``NetbackService``), on the hostile dom0's
/// xenstore, with Xen's vif-bridge hotplug script enslaving each vif to a
/// bridge of this run. ``stop()`` removes the vifs and the bridge.
final class HostileNetback: @unchecked Sendable {
    let service: NetbackService
    let bridge = "hxbr\(getpid() % 100000)"
    private var stopped = false

    init(_ d: HostileDom0, defaultScript: String = HostileDom0.root + "/scripts/vif-bridge", hotplugSeconds: Double = 40) throws {
        var log = Logger(label: "netback")
        log.logLevel = .critical  // hostile cases make the backend complain on purpose
        let build = Dom0Harness.buildDirectory(packageRoot: HostileDom0.root)
        let driver = NetbackDriver(hypervisor: try d.s.dom0Hypervisor(), logger: log, maxQueues: 1,
                                   defaultScript: defaultScript,
                                   scriptEnvironment: ["XENSTORED_PATH": d.s.xenstoreSocket,
                                                       "XEN_NETLINK": build + "/xen-netlink",
                                                       "PATH": ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"],
                                   hotplugSeconds: hotplugSeconds)
        service = NetbackService(xenbus: try d.s.dom0XenStore(), driver: driver, logger: log)
        try service.start()
    }

    /// The vif netback holds for `dev`, if open.
    func vif(_ dev: XenBusDevice) -> Vif? { service.withDevices { $0[dev.backendPath] } }

    func stop() {
        guard !stopped else { return }
        stopped = true
        service.stop()
        _ = try? Netlink().deleteLink(bridge)
    }

    deinit { stop() }
}

/// A vif attached through XenBus: the toolstack's keys (mac, bridge, handle),
/// InitWait, then a NetFront's ring keys and Connected. Each front of a guest
/// sits in its own `slot` of guest pages and grant refs.
final class XenBusVif: @unchecked Sendable {
    let dev: XenBusDevice
    let guest: Dom0Harness.Guest
    let front: NetFront
    var queue: FrontQueue { front.queues[0] }
    var tapName: String { "vif\(dev.frontendDomid).\(dev.devid)" }

    /// Guest pages for `slots` fronts plus the builder's reserved pages.
    static func pages(slots: Int) -> UInt32 { UInt32(slots * NetFront.pagesPerQueue + 64) }

    /// The toolstack's part only (`backend` adds keys, e.g. `script`), without
    /// waiting for InitWait.
    static func add(_ d: HostileDom0, _ net: HostileNetback, guest g: Dom0Harness.Guest, devid: Int = 0,
                    backend extra: [String: String] = [:]) throws -> XenBusDevice {
        let dev = XenBusDevice(type: "vif", frontendDomid: XenStore.DomID(g.domid), devid: devid)
        let mac = String(format: "00:16:3e:%02x:%02x:%02x", Int(g.domid >> 8) & 0xFF, Int(g.domid) & 0xFF, devid & 0xFF)
        try d.s.xenstore.createDevice(dev, backend: ["mac": mac, "bridge": net.bridge, "handle": "\(devid)", "type": "vif"]
                                        .merging(extra) { $1 },
                                      frontend: ["mac": mac, "handle": "\(devid)"])
        return dev
    }

    static func create(_ d: HostileDom0, _ net: HostileNetback, guest g: Dom0Harness.Guest, devid: Int = 0,
                       backend extra: [String: String] = [:]) throws -> XenBusDevice {
        let dev = try add(d, net, guest: g, devid: devid, backend: extra)
        try awaitInitWait(d, dev)
        return dev
    }

    static func awaitInitWait(_ d: HostileDom0, _ dev: XenBusDevice, seconds: Double = 20) throws {
        guard Dom0Harness.wait(d.s.xenstore, state: dev.backendPath, seconds: seconds, { $0 == .initWait || $0 == .closing }) == .initWait else {
            let why = (try? d.s.xenstore.readIfExists(dev.backendPath + "/error")) ?? nil
            throw FrontError("\(dev.backendPath) never reached InitWait: \(why ?? "?")")
        }
    }

    static func makeFront(_ g: Dom0Harness.Guest, slot: Int) throws -> NetFront {
        try NetFront(guest: g.hypervisor, firstPage: slot * NetFront.pagesPerQueue,
                     firstRef: 16 + GrantRef(slot * NetFront.pagesPerQueue))
    }

    /// The keys a well-behaved netfront writes (netif.h).
    static func frontendKeys(_ front: NetFront) -> [String: String] {
        let r = front.queues[0].rings
        guard case .shared(let port) = r.events else { preconditionFailure("one event channel") }
        return ["tx-ring-ref": "\(r.txRingRef)", "rx-ring-ref": "\(r.rxRingRef)", "event-channel": "\(port)",
                "request-rx-copy": "1", "feature-rx-notify": "1", "feature-sg": "1", "feature-gso-tcpv4": "1"]
    }

    /// Writes `keys` in one transaction and switches to Connected (as Linux netfront does).
    static func publish(_ g: Dom0Harness.Guest, _ dev: XenBusDevice, _ keys: [String: String]) throws {
        try g.xenstore.transaction { t in
            for (k, v) in keys { try t.write(dev.frontendPath + "/" + k, v) }
        }
        try g.xenstore.switchState(at: dev.frontendPath, to: .connected)
    }

    convenience init(_ d: HostileDom0, _ net: HostileNetback, guest g: Dom0Harness.Guest, devid: Int = 0, slot: Int = 0,
                     backend extra: [String: String] = [:]) throws {
        try self.init(d, attaching: Self.create(d, net, guest: g, devid: devid, backend: extra), guest: g, slot: slot)
    }

    /// A netfront in `slot` of `g`'s pages for `dev`, which netback already offered (InitWait).
    init(_ d: HostileDom0, attaching dev: XenBusDevice, guest g: Dom0Harness.Guest, slot: Int = 0) throws {
        self.dev = dev
        guest = g
        front = try Self.makeFront(g, slot: slot)
        try front.queues[0].postRx()
        try Self.publish(g, dev, Self.frontendKeys(front))
        guard Dom0Harness.wait(g.xenstore, state: dev.backendPath, { $0 == .connected || $0 == .closing }) == .connected else {
            let why = (try? d.s.xenstore.readIfExists(dev.backendPath + "/error")) ?? nil
            throw FrontError("\(dev.backendPath) did not connect: \(why ?? "?")")
        }
    }
}

/// One transmitted frame's outcome on `q`: its response status and whether
/// the response slot's padding (bytes 4..<12 of the 12-byte union) is zero.
func sendOne(_ q: FrontQueue, _ frame: [UInt8]) throws -> (status: Int16?, paddingZero: Bool) {
    let idx = q.tx.reqProdPvt
    guard try q.send(frame) else { throw FrontError("tx ring full") }
    try q.pushTx()
    let r = try q.txResponses(1)
    return (r.first?.status, try txPaddingIsZero(q, slot: idx))
}

/// XSA-216 for netif tx: a response slot carries the 4-byte response and zeroes.
func txPaddingIsZero(_ q: FrontQueue, slot index: UInt32) throws -> Bool {
    try q.txSlotBytes(index)[4...].allSatisfy { $0 == 0 }
}

/// A second, well-behaved guest's transmit traffic: batches of 16 frames of
/// our ethertype, each batch pushed and every response checked (OKAY).
/// ``throughput(seconds:)`` measures on the calling thread; ``start()`` /
/// ``stop()`` run it on a thread of its own.
final class NetWorker: @unchecked Sendable {
    let q: FrontQueue
    let running = Atomic<Bool>(true)
    let packets = Atomic<Int>(0)
    let failures = Mutex<[String]>([])
    private var thread: TestThread?
    let frames: [[UInt8]] = (0..<16).map { testFrame($0, length: 128) }

    init(_ q: FrontQueue) { self.q = q }

    /// One batch; nil or what went wrong.
    func step() -> String? {
        do {
            for f in frames { guard try q.send(f) else { return "tx ring full" } }
            try q.pushTx()
            let r = try q.txResponses(frames.count)
            guard r.count == frames.count else { return "\(r.count) of \(frames.count) responses" }
            if let bad = r.first(where: { $0.status != Int16(NETIF_RSP_OKAY) }) { return "status \(bad.status)" }
        } catch {
            return "\(error)"
        }
        return nil
    }

    /// Frames per second over `seconds`, on the calling thread.
    func throughput(seconds: Double) -> (perSecond: Double, failures: [String]) {
        var n = 0, bad: [String] = []
        let start = Date()
        while Date().timeIntervalSince(start) < seconds {
            if let e = step() { bad.append(e); if bad.count > 5 { break } } else { n += frames.count }
        }
        return (Double(n) / Date().timeIntervalSince(start), bad)
    }

    func start() {
        thread = TestThread { [self] in
            while running.load(ordering: .acquiring) {
                if let e = step() {
                    failures.withLock { $0.append(e) }
                    if failures.withLock({ $0.count }) > 5 { break }
                } else {
                    packets.wrappingAdd(frames.count, ordering: .releasing)
                }
            }
        }
    }

    func stop() -> (packets: Int, failures: [String]) {
        running.store(false, ordering: .releasing)
        thread?.join()
        thread = nil
        return (packets.load(ordering: .acquiring), failures.withLock { $0 })
    }
}

/// Whether `q` still carries frames to its tap: `n` frames sent, each OKAY
/// with zero padding and seen on the tap exactly as sent.
func vifCarriesFrames(_ q: FrontQueue, tap: String, n: Int = 5, tag: Int = 0x7000) throws -> Bool {
    let cap = try TapCapture(tap)
    for i in 0..<n {
        let f = testFrame(tag + i, length: 90 + i)
        let (status, pad) = try sendOne(q, f)
        guard status == Int16(NETIF_RSP_OKAY), pad else { return false }
        // Skip what other traffic left on the tap; ours comes in order.
        var seen = false
        while let got = cap.next(ms: 5000) {
            if got == f { seen = true; break }
        }
        guard seen else { return false }
    }
    return true
}
