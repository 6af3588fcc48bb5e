// Release-mode netback benchmarks, each against a baseline measured in the
// same run (see scripts/bench-netback):
//  - TCP: the guest's GSO sender -> rings -> netback -> tap -> bridge -> veth
//    -> a socket in a namespace, vs iperf3 over a bare veth pair;
//  - 64-byte UDP frames per second through the transmit path, vs a bare
//    program writing the same frames (with the same vnet header) to a tap on
//    the same bridge.
import ArgumentParser
import CNetShim
import CXen
import Foundation
import Glibc
import NetBack
import NetFrontKit
import XenHV
import XenRing

struct NetbackBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "netback-bench", abstract: "netback throughput against same-run baselines.")
    @Option(help: "Seconds per measurement.") var seconds = 3.0
    @Option(help: "The xenhv executable (default: beside this one).") var xenhv: String?
    @Flag(help: "Only the small-packet measurement.") var smallOnly = false
    @Flag(help: "Only the TCP measurement.") var tcpOnly = false

    func run() throws {
        let dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().path
        let env = try BenchEnvironment(xenhv: xenhv ?? dir + "/xenhv")
        defer { env.tearDown() }
        if !smallOnly { try tcp(env) }
        if !tcpOnly { try smallPackets(env) }
    }

    func tcp(_ env: BenchEnvironment) throws {
        let base = try env.iperfOverVeth(seconds: seconds)
        let path = try env.tcpThroughPath(seconds: seconds)
        print(String(format: "tcp   iperf3 over bare veth: %8.2f Gbit/s", base / 1e9))
        print(String(format: "tcp   guest->netback->bridge: %8.2f Gbit/s   ratio %.2f (goal >= 0.50)", path / 1e9, path / base))
    }

    func smallPackets(_ env: BenchEnvironment) throws {
        let base = try env.bareTapWriter(seconds: seconds)
        let path = try env.smallPacketsThroughTx(seconds: seconds)
        print(String(format: "64B   bare tap writer:        %8.3f Mpps", base / 1e6))
        print(String(format: "64B   guest tx ring->netback: %8.3f Mpps   ratio %.2f (goal >= 0.70)", path / 1e6, path / base))
    }
}

func now() -> UInt64 { RateLimiter.now() }

@discardableResult
func sh(_ path: String, _ args: [String], check: Bool = true) throws -> String {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: path)
    p.arguments = args
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let e = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    if check && p.terminationStatus != 0 {
        throw FrontError("\(path) \(args.joined(separator: " ")): \(String(decoding: e, as: UTF8.self))")
    }
    return String(decoding: o, as: UTF8.self)
}

func ip(_ args: String...) throws { try sh("/usr/sbin/ip", args) }

/// xenhv, a bridge with a veth into a namespace, and a bare veth pair between
/// two more namespaces for iperf3; all removed by `tearDown()`.
final class BenchEnvironment {
    let daemon: Process
    let socketDir: String
    let dom0: Hypervisor
    let nl: Netlink
    let tag = "\(getpid() % 100000)"
    var bridge: String { "nbb\(tag)" }
    var vethHost: String { "nbh\(tag)" }
    var vethPeer: String { "nbp\(tag)" }
    var ns: String { "nbench\(tag)" }
    var nsA: String { "nbencha\(tag)" }
    var nsB: String { "nbenchb\(tag)" }
    let peerIP: [UInt8] = [10, 214, 0, 2]
    let guestIP: [UInt8] = [10, 214, 0, 1]
    let guestMAC: [UInt8] = [0x00, 0x16, 0x3e, 0x11, 0x22, 0x33]
    var peerMAC: [UInt8] = []

    init(xenhv: String) throws {
        socketDir = NSTemporaryDirectory() + "netback-bench-\(getpid())"
        try FileManager.default.createDirectory(atPath: socketDir, withIntermediateDirectories: true)
        daemon = Process()
        daemon.executableURL = URL(fileURLWithPath: xenhv)
        daemon.arguments = ["--socket", socketDir + "/xenhv.sock", "--log-level", "error"]
        let out = Pipe()
        daemon.standardOutput = out
        try daemon.run()
        var line = Data()
        while !line.contains(10) {
            let d = out.fileHandleForReading.availableData
            if d.isEmpty { break }
            line.append(d)
        }
        dom0 = try Hypervisor.connect(socketPath: socketDir + "/xenhv.sock")
        nl = try Netlink()
        do {
            try nl.addBridge(bridge)
            try nl.setMTU(bridge, 1500)
            try ip("netns", "add", ns)
            try nl.addVeth(vethHost, peer: vethPeer)
            try nl.enslave(vethHost, to: bridge)
            try nl.setUp(vethHost)
            try nl.setUp(bridge)
            try ip("link", "set", vethPeer, "netns", ns)
            try ip("-n", ns, "addr", "add", "10.214.0.2/24", "dev", vethPeer)
            try ip("-n", ns, "link", "set", vethPeer, "up")
            try ip("-n", ns, "neigh", "replace", "10.214.0.1", "lladdr", MACAddress(guestMAC).description, "dev", vethPeer)
            let mac = try sh("/usr/sbin/ip", ["-n", ns, "-br", "link", "show", vethPeer]).split(separator: " ", omittingEmptySubsequences: true)[2]
            peerMAC = MACAddress(String(mac))!.array
        } catch {
            tearDown()
            throw error
        }
    }

    func tearDown() {
        for n in [ns, nsA, nsB] { _ = try? sh("/usr/sbin/ip", ["netns", "del", n], check: false) }
        _ = try? nl.deleteLink(vethHost)
        _ = try? nl.deleteLink(bridge)
        daemon.terminate()
        daemon.waitUntilExit()
        try? FileManager.default.removeItem(atPath: socketDir)
    }

    /// A guest in this process with a vif on the bridge.
    func guestVif(features: FrontendFeatures, name: String) throws -> (Hypervisor, NetFront, Vif) {
        let d = try dom0.createDomain(pages: NetFront.pagesNeeded(queues: 1), name: name)
        let g = try Hypervisor.guest(descriptor: d.guestDescriptor)
        let front = try NetFront(guest: g)
        let vif = try Vif(hypervisor: dom0, config: VifConfig(frontendDomid: d.domid, devid: 0, tapName: "nbv\(name.suffix(6))"))
        try nl.enslave(vif.name, to: bridge)
        try nl.setUp(vif.name)
        try front.queues[0].postRx()
        try vif.connect(front.connection(features: features))
        return (g, front, vif)
    }

    // MARK: TCP

    func iperfOverVeth(seconds: Double) throws -> Double {
        try ip("netns", "add", nsA)
        try ip("netns", "add", nsB)
        try ip("-n", nsA, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", nsB)
        try ip("-n", nsA, "addr", "add", "10.215.0.1/24", "dev", "va")
        try ip("-n", nsB, "addr", "add", "10.215.0.2/24", "dev", "vb")
        try ip("-n", nsA, "link", "set", "va", "up")
        try ip("-n", nsB, "link", "set", "vb", "up")
        let server = Process()
        server.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        server.arguments = ["netns", "exec", nsA, "iperf3", "-s", "-B", "10.215.0.1"]
        server.standardOutput = FileHandle.nullDevice
        try server.run()
        defer { server.terminate(); server.waitUntilExit() }
        var json = ""
        for _ in 0..<50 {
            json = (try? sh("/usr/sbin/ip", ["netns", "exec", nsB, "iperf3", "-c", "10.215.0.1", "-t", "\(Int(seconds.rounded(.up)))", "-J"])) ?? ""
            if !json.isEmpty && !json.contains("unable to connect") { break }
            usleep(100_000)  // the server is still starting; iperf3 has no readiness signal
        }
        guard let data = json.data(using: .utf8),
              let obj = try JSONSerialization.jsonObject(with: data) as? [String: Any],
              let end = obj["end"] as? [String: Any], let sum = end["sum_received"] as? [String: Any],
              let bps = sum["bits_per_second"] as? Double else { throw FrontError("iperf3 gave no result: \(json.prefix(300))") }
        return bps
    }

    func tcpThroughPath(seconds: Double) throws -> Double {
        let (_, front, vif) = try guestVif(features: .all, name: "tcp\(tag)")
        defer { vif.close() }
        let listener = try socketInNamespace(ns, type: Int32(SOCK_STREAM.rawValue), port: 7001)
        defer { close(listener) }
        listen(listener, 1)
        let tcp = MiniTCP(queue: front.queues[0], mac: guestMAC, peerMAC: peerMAC, ip: guestIP, peerIP: peerIP, port: 41000, peerPort: 7001)
        try tcp.connect()
        let conn = accept(listener, nil, nil)
        defer { close(conn) }
        final class Counter: @unchecked Sendable { var bytes = 0; var stop = false }
        let c = Counter()
        let done = DispatchSemaphore(value: 0)
        let reader = Thread {
            var buf = [UInt8](repeating: 0, count: 1 << 20)
            while !c.stop {
                var pfd = pollfd(fd: conn, events: Int16(POLLIN), revents: 0)
                if poll(&pfd, 1, 200) <= 0 { continue }
                let n = recv(conn, &buf, buf.count, 0)
                if n <= 0 { break }
                c.bytes += n
            }
            done.signal()
        }
        reader.start()
        let chunk = [UInt8](repeating: 0x5A, count: 4 << 20)
        // Warm up, then measure.
        try tcp.send(chunk, gso: true, chunk: 64000)
        let start = now()
        let startBytes = c.bytes
        var sent = 0
        while Double(now() - start) < seconds * 1e9 {
            try tcp.send(chunk, gso: true, chunk: 64000)
            sent += chunk.count
        }
        let elapsed = Double(now() - start) / 1e9
        let got = c.bytes - startBytes
        c.stop = true
        done.wait()
        return Double(min(got, sent)) * 8 / elapsed
    }

    // MARK: Small packets

    var smallFrame: [UInt8] {
        Frames.udp(srcMAC: guestMAC, dstMAC: peerMAC, src: guestIP, dst: peerIP, sport: 9, dport: 9,
                   payload: Array(repeating: 0, count: 18))  // 60 bytes + FCS = 64 on the wire
    }

    func bareTapWriter(seconds: Double) throws -> Double {
        let tap = try Tap(name: "nbw\(tag)")
        try nl.enslave(tap.name, to: bridge)
        try nl.setUp(tap.name)
        let frame = smallFrame
        var buf = [UInt8](repeating: 0, count: VnetHeader.size) + frame
        let fd = tap.queues[0]
        var n = 0
        let start = now()
        let end = start + UInt64(seconds * 1e9)
        buf.withUnsafeMutableBytes { p in
            var iov = iovec(iov_base: p.baseAddress, iov_len: p.count)
            while true {
                for _ in 0..<256 { if cnet_writev(fd, &iov, 1) > 0 { n += 1 } }
                if now() >= end { break }
            }
        }
        return Double(n) / (Double(now() - start) / 1e9)
    }

    func smallPacketsThroughTx(seconds: Double) throws -> Double {
        let (_, front, vif) = try guestVif(features: .all, name: "pps\(tag)")
        defer { vif.close() }
        let q = front.queues[0]
        let frame = smallFrame
        // Every buffer holds the frame once; the loop only posts requests, as a
        // netfront recycling its buffers would.
        var ids: [UInt16] = []
        while let id = q.takeTxID() { ids.append(id); try q.writeTxBuffer(id, offset: 0, frame) }
        var free = ids
        var done = 0
        let start = now()
        let end = start + UInt64(seconds * 1e9)
        while true {
            while let id = free.popLast() {
                var r = netif_tx_request()
                r.id = id; r.gref = q.txRef(id); r.size = UInt16(frame.count)
                q.tx.enqueue(r)
            }
            try q.pushTx()
            while let r = try q.tx.nextResponse() { free.append(r.id); done += 1 }
            if now() >= end { break }
            if free.isEmpty {
                if try q.tx.finalCheckForResponses() { continue }
                _ = q.txChannel.wait(milliseconds: 100)
            }
        }
        let elapsed = Double(now() - start) / 1e9
        let s = vif.stats.snapshot
        if s.txDrops > 0 { print("warning: \(s)") }
        return Double(done) / elapsed
    }
}

/// A socket made inside a namespace (setns on a private thread).
func socketInNamespace(_ ns: String, type: Int32, port: UInt16) throws -> CInt {
    final class Box: @unchecked Sendable { var fd: CInt = -1; var err: Int32 = 0 }
    let box = Box()
    let sem = DispatchSemaphore(value: 0)
    // setns on a thread of its own, so this thread's namespace is untouched.
    let t = Thread {
        defer { sem.signal() }
        let nsfd = open("/var/run/netns/\(ns)", O_RDONLY | O_CLOEXEC)
        guard nsfd >= 0, cnet_enter_netns(nsfd) == 0 else { box.err = errno; return }
        close(nsfd)
        let s = socket(AF_INET, type | Int32(SOCK_CLOEXEC.rawValue), 0)
        var one: Int32 = 1
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, 4)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        box.fd = s
    }
    t.start()
    sem.wait()
    guard box.fd >= 0 else { throw FrontError("socket in \(ns): \(String(cString: strerror(box.err)))") }
    return box.fd
}

NetbackBench.main()
