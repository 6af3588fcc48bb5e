import Foundation
import Glibc
import Synchronization
import CNetShim
import CXen
import NetBack
import NetFrontKit
import XenHV
import XenTestKit


/// Runs a command to completion and captures its output.
@discardableResult
func run(_ path: String, _ args: [String]) throws -> CommandResult { CommandResult.run(path, args) }

/// `ip` for the test's own scaffolding (namespaces, addresses); netback itself never runs it.
@discardableResult
func ip(_ args: String...) throws -> CommandResult {
    let r = try run("/usr/sbin/ip", args)
    if r.status != 0 { throw FrontError("ip \(args.joined(separator: " ")): \(r.err)") }
    return r
}

/// A private xenhv for one test, on its own socket; stopped at deinit.
final class HypervisorFixture {
    let dir: String
    let socket: String
    let daemon: Process
    let dom0: Hypervisor

    init() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("xenhv-net-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        socket = dir + "/xenhv.sock"
        daemon = Process()
        daemon.executableURL = URL(fileURLWithPath: BuildProducts.path("xenhv"))
        daemon.arguments = ["--socket", socket, "--log-level", "error"]
        let out = Pipe()
        daemon.standardOutput = out
        try daemon.run()
        // xenhv prints "xenhv ready" once its socket listens.
        var line = Data()
        while !line.contains(10) {
            let d = out.fileHandleForReading.availableData
            if d.isEmpty { break }
            line.append(d)
        }
        guard String(decoding: line, as: UTF8.self).hasPrefix("xenhv ready") else {
            daemon.terminate()
            throw FrontError("xenhv did not start")
        }
        dom0 = try Hypervisor.connect(socketPath: socket)
    }

    /// A domain whose connection this process keeps, to play the frontend in-process.
    func guest(pages: UInt32, name: String = "netfront") throws -> (DomID, Hypervisor) {
        let d = try dom0.createDomain(pages: pages, name: name)
        let g = try Hypervisor.guest(descriptor: d.guestDescriptor)
        return (d.domid, g)
    }

    deinit {
        daemon.terminate()
        daemon.waitUntilExit()
        try? FileManager.default.removeItem(atPath: dir)
    }
}

/// A name no parallel run can share: a prefix, our pid, a counter.
func uniqueName(_ prefix: String) -> String {
    let n = nameCounter.wrappingAdd(1, ordering: .relaxed).newValue
    return "\(prefix)\(getpid() % 100000)x\(n)"
}
private let nameCounter = Atomic<Int>(0)

/// The peer side of the data path (needs root): a bridge, a veth pair whose
/// far end sits in a network namespace with an address. Everything is removed
/// by `tearDown()`, which tests call in a defer so failures clean up too.
final class PeerNetwork {
    let bridge: String
    let vethHost: String
    let vethPeer: String
    let namespace: String
    let subnet: Int
    let peerIP: [UInt8]
    let guestIP: [UInt8]
    var peerMAC: [UInt8] = []
    let netlink: Netlink

    init(mtu: UInt32 = 1500) throws {
        netlink = try Netlink()
        let tag = uniqueName("")
        bridge = "nbr\(tag)"
        vethHost = "nvh\(tag)"
        vethPeer = "nvp\(tag)"
        namespace = "nbns\(tag)"
        subnet = Int(getpid() % 200) + 20
        peerIP = [10, 213, UInt8(subnet), 2]
        guestIP = [10, 213, UInt8(subnet), 1]
        do {
            try netlink.addBridge(bridge)
            try netlink.setMTU(bridge, mtu)
            try ip("netns", "add", namespace)
            try netlink.addVeth(vethHost, peer: vethPeer)
            try netlink.setMTU(vethHost, mtu)
            try netlink.setMTU(vethPeer, mtu)
            try netlink.enslave(vethHost, to: bridge)
            try netlink.setUp(vethHost)
            try netlink.setUp(bridge)
            try ip("link", "set", vethPeer, "netns", namespace)
            try ip("-n", namespace, "addr", "add", "\(peerIP.map(String.init).joined(separator: "."))/24", "dev", vethPeer)
            try ip("-n", namespace, "link", "set", vethPeer, "up")
            try ip("-n", namespace, "link", "set", "lo", "up")
            let mac = try ip("-n", namespace, "-br", "link", "show", vethPeer).out
                .split(separator: " ", omittingEmptySubsequences: true)[2]
            peerMAC = MACAddress(String(mac))!.array
        } catch {
            tearDown()
            throw error
        }
    }

    var peerAddress: String { peerIP.map(String.init).joined(separator: ".") }
    var guestAddress: String { guestIP.map(String.init).joined(separator: ".") }

    /// Attaches a vif's tap to the bridge and brings it up (the hotplug script's job).
    func plug(_ vif: Vif) throws {
        try netlink.enslave(vif.name, to: bridge)
        try netlink.setUp(vif.name)
    }

    /// Tells the peer where the guest is, so it needs no ARP answer from the test guest.
    func addNeighbor(ip addr: [UInt8], mac: [UInt8]) throws {
        try ip("-n", namespace, "neigh", "replace", addr.map(String.init).joined(separator: "."),
               "lladdr", MACAddress(mac).description, "dev", vethPeer)
    }

    func tearDown() {
        _ = try? run("/usr/sbin/ip", ["netns", "del", namespace])
        _ = try? netlink.deleteLink(vethHost)
        _ = try? netlink.deleteLink(bridge)
    }

    /// A socket created inside the namespace (setns on a private thread, so
    /// this process's other threads stay where they are).
    func socket(type: Int32, port: UInt16, ipv6: Bool = false) throws -> CInt {
        let path = "/var/run/netns/\(namespace)"
        final class Box: @unchecked Sendable { var fd: CInt = -1; var err: Int32 = 0; var path = "" ; var type: Int32 = 0; var port: UInt16 = 0; var v6 = false }
        let box = Box()
        box.path = path; box.type = type; box.port = port; box.v6 = ipv6
        var t = pthread_t()
        let arg = Unmanaged.passRetained(box).toOpaque()
        pthread_create(&t, nil, { a in
            let b = Unmanaged<Box>.fromOpaque(a!).takeRetainedValue()
            let nsfd = open(b.path, O_RDONLY | O_CLOEXEC)
            guard nsfd >= 0, cxen_setns(nsfd, 0x4000_0000 /* CLONE_NEWNET */) == 0 else { b.err = errno; return nil }
            close(nsfd)
            let s = Glibc.socket(b.v6 ? AF_INET6 : AF_INET, b.type | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard s >= 0 else { b.err = errno; return nil }
            var one: Int32 = 1
            setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, 4)
            let r: Int32
            if b.v6 {
                var addr = sockaddr_in6()
                addr.sin6_family = sa_family_t(AF_INET6)
                addr.sin6_port = b.port.bigEndian
                r = withUnsafePointer(to: &addr) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) }
                }
            } else {
                var addr = sockaddr_in()
                addr.sin_family = sa_family_t(AF_INET)
                addr.sin_port = b.port.bigEndian
                r = withUnsafePointer(to: &addr) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
                }
            }
            guard r == 0 else { b.err = errno; close(s); return nil }
            b.fd = s
            return nil
        }, arg)
        pthread_join(t, nil)
        guard box.fd >= 0 else { throw FrontError("socket in \(namespace): \(String(cString: strerror(box.err)))") }
        return box.fd
    }
}


func receiveDatagram(_ fd: CInt, timeout ms: Int32 = 5000) -> [UInt8]? {
    var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
    guard poll(&pfd, 1, ms) > 0 else { return nil }
    var buf = [UInt8](repeating: 0, count: 65536)
    let n = recv(fd, &buf, buf.count, 0)
    return n < 0 ? nil : Array(buf[..<n])
}

func sendDatagram6(_ fd: CInt, to ip: [UInt8], port: UInt16, _ payload: [UInt8]) -> Int {
    var addr = sockaddr_in6()
    addr.sin6_family = sa_family_t(AF_INET6)
    addr.sin6_port = port.bigEndian
    withUnsafeMutableBytes(of: &addr.sin6_addr) { $0.copyBytes(from: ip) }
    return payload.withUnsafeBytes { p in
        withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                sendto(fd, p.baseAddress, p.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in6>.size))
            }
        }
    }
}

func sendDatagram(_ fd: CInt, to ip: [UInt8], port: UInt16, _ payload: [UInt8]) -> Int {
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = port.bigEndian
    addr.sin_addr.s_addr = UInt32(ip[0]) | UInt32(ip[1]) << 8 | UInt32(ip[2]) << 16 | UInt32(ip[3]) << 24
    return payload.withUnsafeBytes { p in
        withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                sendto(fd, p.baseAddress, p.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
    }
}

/// A guest (the test process) with a connected vif on the peer network.
final class GuestVif {
    let fixture: HypervisorFixture
    let domid: DomID
    let guest: Hypervisor
    let front: NetFront
    let vif: Vif
    let mac: [UInt8]
    let ip: [UInt8]

    init(fixture: HypervisorFixture, network: PeerNetwork?, devid: UInt32 = 0, queues: Int = 1, split: Bool = false,
         features: FrontendFeatures = .all, mtu: UInt32 = 1500, rate: RateLimit? = nil, ipLastOctet: UInt8 = 1,
         rxQueueLimit: Int = 64, stallTimeoutMs: UInt64 = 60_000, postRx: Bool = true) throws {
        self.fixture = fixture
        (domid, guest) = try fixture.guest(pages: NetFront.pagesNeeded(queues: queues), name: uniqueName("netfront"))
        front = try NetFront(guest: guest, queues: queues, split: split)
        var cfg = VifConfig(frontendDomid: domid, devid: devid, mac: nil, mtu: mtu, rate: rate, maxQueues: max(1, queues),
                            tapName: uniqueName("nbv"))
        cfg.rxQueueLimit = rxQueueLimit
        cfg.rxStallTimeoutNanoseconds = stallTimeoutMs * 1_000_000
        mac = [0x00, 0x16, 0x3e, UInt8(getpid() & 0x7f), UInt8(domid & 0xff), UInt8(devid & 0xff)]
        ip = network.map { [$0.guestIP[0], $0.guestIP[1], $0.guestIP[2], ipLastOctet] } ?? [10, 0, 0, ipLastOctet]
        vif = try Vif(hypervisor: fixture.dom0, config: cfg)
        if let network {
            try network.plug(vif)
            try network.addNeighbor(ip: ip, mac: mac)
        }
        if postRx { for q in front.queues { try q.postRx() } }
        try vif.connect(front.connection(features: features))
        // The tap has carrier from the connect on; the bridge forwards to it
        // once the kernel's link watch has seen that (asynchronously): wait
        // (bounded) for the port to forward, so a test's first frame is not
        // dropped at the bridge.
        if network != nil {
            let state = "/sys/class/net/\(vif.name)/brport/state"
            _ = eventually(seconds: 5, every: 1) { (try? String(contentsOfFile: state, encoding: .utf8))?.hasPrefix("3") == true }
        }
    }

    var queue: FrontQueue { front.queues[0] }

    func close() { vif.close() }
}
