// Release-mode netback benchmarks, each against a baseline measured in the
// same run (see scripts/bench-netback). Everything runs on a private dom0
// (xenhv, xenstored) with a real `netback --xenstore` process whose vifs the
// hotplug script puts on a bridge of this run:
//  - TCP: iperf3 from a real pvguest's namespace (its NIC a tap, netfront,
//    rings, netback, vif tap, bridge, veth) to a peer namespace and back
//    (-R), vs iperf3 over a bare veth pair between two namespaces;
//  - 64-byte UDP frames per second through the transmit path (a guest
//    posting tx requests -> netback -> vif tap), vs a bare program writing
//    the same frames (with the same vnet header) to a tap on the same bridge;
//  - netback's resident size per connected vif, and over a long run with a
//    guest that posts no rx buffers while the peer floods it (the bounded
//    backlog keeps it flat).
import ArgumentParser
import CNetShim
import CXen
import Foundation
import Glibc
import NetBack
import NetFrontKit
import XenBus
import XenHV
import XenRing
import XenStore
import XenTestKit

struct NetbackBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "netback-bench", abstract: "netback throughput and memory against same-run baselines.")
    @Option(help: "Seconds per throughput measurement.") var seconds = 3.0
    @Option(help: "TCP rounds; each measures the bare veth pair and the path, both ways, back to back.") var rounds = 5
    @Option(help: "Seconds of the long run with a guest that posts no rx buffers.") var memorySeconds = 20.0
    @Option(help: "Idle vifs connected to measure the resident size per vif.") var vifs = 16
    @Option(help: "Queues netback offers and the guest's netfront takes (default: both daemons' own default, the online CPUs).")
    var queues: Int?
    @Flag(help: "Only the TCP measurements.") var tcpOnly = false
    @Flag(help: "Only the small-packet measurement.") var smallOnly = false
    @Flag(help: "Only the memory measurements.") var memoryOnly = false

    func run() throws {
        let all = !tcpOnly && !smallOnly && !memoryOnly
        try InterruptCleanup.run {
            let rig = try Rig(build: ProcessLauncher.executableDirectory, queues: queues)
            defer { rig.tearDown() }
            try rig.startNetback()
            if all || memoryOnly { try memory(rig) }
            if all || tcpOnly { try tcp(rig) }
            if all || smallOnly { try smallPackets(rig) }
        }
    }

    func tcp(_ rig: Rig) throws {
        let memBefore = rig.netbackMemory()
        try rig.makeVethPair()
        try rig.startGuest()
        // Rounds of baseline and path back to back, so the machine's other load
        // weighs on both alike; the median ratio and the range are reported.
        var up: [(base: Double, path: Double)] = [], down: [(base: Double, path: Double)] = []
        for _ in 0..<max(1, rounds) {
            let b = try rig.iperfOverVeth(seconds: seconds)
            let p = try rig.iperfThroughPath(seconds: seconds)
            up.append((b.up, p.up))
            down.append((b.down, p.down))
        }
        let memAfter = rig.netbackMemory()
        func report(_ what: String, _ r: [(base: Double, path: Double)]) {
            func median(_ v: [Double]) -> Double { v.sorted()[v.count / 2] }
            let ratios = r.map { $0.path / $0.base }
            print(String(format: "tcp   %@: iperf3 over bare veth %5.2f Gbit/s, through netback %5.2f Gbit/s (medians of %d)   ratio %.2f, range %.2f-%.2f (goal >= 0.50)",
                         what, median(r.map(\.base)) / 1e9, median(r.map(\.path)) / 1e9, r.count, median(ratios),
                         ratios.min()!, ratios.max()!))
        }
        report("guest -> peer", up)
        report("peer -> guest", down)
        print(String(format: "mem   the vif that carried TCP both ways: netback's private memory grew %.2f MiB (goal <= 4 MiB per vif); resident %.2f MiB more in all, %.2f MiB of it the guest's own pages that grant copies and in-place reads and writes touched",
                     Double(memAfter.own - memBefore.own) / 1024, Double(memAfter.rss - memBefore.rss) / 1024,
                     Double(memAfter.shared - memBefore.shared) / 1024))
    }

    func smallPackets(_ rig: Rig) throws {
        let base = try rig.bareTapWriter(seconds: seconds)
        let path = try rig.smallPacketsThroughTx(seconds: seconds)
        print(String(format: "64B   bare tap writer %6.3f Mpps, guest tx ring -> netback -> tap %6.3f Mpps   ratio %.2f (goal >= 0.70)",
                     base / 1e6, path / 1e6, path / base))
    }

    func memory(_ rig: Rig) throws {
        let idle = rig.netbackMemory()
        var guests: [KitVif] = []
        for i in 0..<vifs { guests.append(try rig.kitVif(name: "mem\(i)", postRx: true)) }
        let connected = rig.netbackMemory()
        let perVif = Double(connected.rss - idle.rss) / Double(vifs) / 1024
        let ownPerVif = Double(connected.own - idle.own) / Double(vifs) / 1024
        print(String(format: "mem   netback resident: %.1f MiB with no vif, %.1f MiB with %d connected vifs: %.2f MiB per vif (goal <= 4), %.2f MiB of it private",
                     Double(idle.rss) / 1024, Double(connected.rss) / 1024, vifs, perVif, ownPerVif))
        for g in guests { try rig.remove(g) }

        // The long run: a guest that posts no rx buffers, flooded by the peer.
        let before = rig.netbackMemory().rss
        let stalled = try rig.kitVif(name: "stall", postRx: false, ip: [10, 214, 0, 9])
        let flood = try rig.flood(to: stalled)
        var samples: [Int] = []
        let start = Date()
        while Date().timeIntervalSince(start) < memorySeconds {
            usleep(500_000)  // a benchmark's sampling period, not synchronisation
            samples.append(rig.netbackMemory().rss)
        }
        let sent = flood.stop()
        let stats = rig.tapCounters(stalled.tap)
        try rig.remove(stalled)
        let warm = samples.dropFirst(min(4, samples.count - 1))
        let lo = warm.min() ?? 0, hi = warm.max() ?? 0
        print(String(format: "mem   %.0f s flood (%d frames) at a guest posting no rx buffers: netback %.1f -> %.1f MiB (range after 2 s %.2f-%.2f MiB, growth %.2f MiB); %@",
                     memorySeconds, sent, Double(before) / 1024, Double(samples.last ?? 0) / 1024,
                     Double(lo) / 1024, Double(hi) / 1024, Double(hi - lo) / 1024, stats))
    }
}

@discardableResult
func sh(_ path: String, _ args: [String], check: Bool = true) throws -> String {
    let r = CommandResult.run(path, args, timeout: 600)
    if check && !r.ok { throw FrontError("\(path) \(args.joined(separator: " ")): \(r.out + r.err)") }
    return r.out
}

func ip(_ args: String...) throws { try sh("/usr/sbin/ip", args) }

/// A guest in this process (NetFrontKit) whose vif netback serves through
/// the XenBus handshake.
struct KitVif {
    let guest: Dom0Harness.Guest
    let dev: XenBusDevice
    let front: NetFront
    let mac: [UInt8]
    let ip: [UInt8]
    var tap: String { "vif\(dev.frontendDomid).\(dev.devid)" }
}

/// Keeps sending UDP datagrams from the peer namespace until stopped.
final class Flood: @unchecked Sendable {
    private var stopFlag = false
    private var count = 0
    private let done = DispatchSemaphore(value: 0)
    init(fd: CInt, to ip: [UInt8]) {
        Thread { [self] in
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_port = UInt16(9).bigEndian
            addr.sin_addr.s_addr = UInt32(ip[0]) | UInt32(ip[1]) << 8 | UInt32(ip[2]) << 16 | UInt32(ip[3]) << 24
            let payload = [UInt8](repeating: 0xA5, count: 1472)
            while !stopFlag {
                for _ in 0..<64 {
                    let n = payload.withUnsafeBytes { p in
                        withUnsafePointer(to: &addr) {
                            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                                sendto(fd, p.baseAddress, p.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                            }
                        }
                    }
                    if n > 0 { count += 1 }
                }
                usleep(1000)  // pacing: about 64k frames/s, leaving the cores to netback
            }
            close(fd)
            done.signal()
        }.start()
    }
    func stop() -> Int {
        stopFlag = true
        done.wait()
        return count
    }
}

/// A private dom0, a netback process, a bridge with a veth into a peer
/// namespace, and (for TCP) a pvguest process; all removed by `tearDown()`.
final class Rig {
    let build: String
    let dom0: Dom0Harness
    let tag = "\(getpid() % 100000)"
    var bridge: String { "nbb\(tag)" }
    var vethHost: String { "nbh\(tag)" }
    var vethPeer: String { "nbp\(tag)" }
    var peerNS: String { "nbpeer\(tag)" }
    var guestNS: String { "nbguest\(tag)" }
    var nsA: String { "nbencha\(tag)" }
    var nsB: String { "nbenchb\(tag)" }
    let peerIP: [UInt8] = [10, 214, 0, 2]
    let guestIP = "10.214.0.1"
    var peerMAC: [UInt8] = []
    var netback: pid_t = 0
    var guest: pid_t = 0
    var guestDomain: XenHV.DomID?
    var writerTap: Tap?
    var kitCount = 0
    /// `--queues`: nil leaves both daemons at their defaults.
    let queues: Int?
    /// What an interrupted run must still undo: the links and namespaces
    /// (made in init), netback (while it runs).
    private var interruptedLinks: InterruptCleanup.Token?
    private var interruptedNetback: InterruptCleanup.Token?

    init(build: String, queues: Int?) throws {
        self.build = build
        self.queues = queues
        dom0 = try Dom0Harness(buildDirectory: build)
        let (namespaces, links) = ([peerNS, guestNS, nsA, nsB], [vethHost, bridge])
        interruptedLinks = InterruptCleanup.register { Self.removeLinks(namespaces: namespaces, links: links) }
        do {
            try ip("netns", "add", peerNS)
            try ip("link", "add", bridge, "type", "bridge")
            try ip("link", "set", bridge, "up")
            try ip("link", "add", vethHost, "type", "veth", "peer", "name", vethPeer)
            try ip("link", "set", vethHost, "master", bridge, "up")
            try ip("link", "set", vethPeer, "netns", peerNS)
            try ip("-n", peerNS, "addr", "add", "10.214.0.2/24", "dev", vethPeer)
            try ip("-n", peerNS, "link", "set", vethPeer, "up")
            try ip("-n", peerNS, "link", "set", "lo", "up")
            let mac = try sh("/usr/sbin/ip", ["-n", peerNS, "-br", "link", "show", vethPeer]).split(separator: " ", omittingEmptySubsequences: true)[2]
            peerMAC = MACAddress(String(mac))!.array
        } catch {
            tearDown()
            throw error
        }
    }

    func tearDown() {
        if let d = guestDomain { try? dom0.hypervisor.destroyDomain(d) }  // kills pvguest: its namespace and tap go
        if guest > 0 {
            var st: Int32 = 0
            waitpid(guest, &st, 0)
            guest = 0
        }
        if netback > 0, interruptedNetback.map({ InterruptCleanup.unregister($0) }) ?? true {
            kill(netback, SIGTERM)
            var st: Int32 = 0
            waitpid(netback, &st, 0)
        }
        netback = 0
        writerTap = nil
        if interruptedLinks.map({ InterruptCleanup.unregister($0) }) ?? true {
            Self.removeLinks(namespaces: [peerNS, guestNS, nsA, nsB], links: [vethHost, bridge])
        }
    }

    static func removeLinks(namespaces: [String], links: [String]) {
        for n in namespaces { _ = try? sh("/usr/sbin/ip", ["netns", "del", n], check: false) }
        for l in links { _ = try? sh("/usr/sbin/ip", ["link", "del", l], check: false) }
    }

    func startNetback() throws {
        var out: [CInt] = [-1, -1]
        _ = pipe(&out)
        _ = fcntl(out[0], F_SETFD, FD_CLOEXEC)
        netback = try ProcessLauncher.spawn(build + "/netback",
                                            arguments: ["--xenstore", dom0.xenstoreSocket, "--hypervisor", dom0.hypervisorSocket,
                                                        "--log-level", "error"] + (queues.map { ["--max-queues", "\($0)"] } ?? []),
                                            environment: ["XEN_RUN_DIR": dom0.dir], descriptors: [(out[1], 1), (2, 2)])
        let pid = netback
        interruptedNetback = InterruptCleanup.register { InterruptCleanup.stop(pid) }
        close(out[1])
        defer { close(out[0]) }
        var line = ""
        repeat { line = ProcessLauncher.readLine(out[0]) } while !line.isEmpty && !line.hasPrefix("netback ready")
        guard line.hasPrefix("netback ready") else { throw FrontError("netback did not start") }
    }

    /// netback's resident size in KiB: all of it (VmRSS), its private memory
    /// (RssAnon + RssFile), and shared memory (RssShmem: the guests' pages that
    /// grant copy maps, ring pages, the hypervisor core's tables).
    func netbackMemory() -> (rss: Int, own: Int, shared: Int) {
        guard let s = try? String(contentsOfFile: "/proc/\(netback)/status", encoding: .utf8) else { return (0, 0, 0) }
        func field(_ name: String) -> Int {
            guard let line = s.split(separator: "\n").first(where: { $0.hasPrefix(name + ":") }) else { return 0 }
            return Int(line.split(separator: " ", omittingEmptySubsequences: true)[1]) ?? 0
        }
        return (field("VmRSS"), field("RssAnon") + field("RssFile"), field("RssShmem"))
    }

    /// The toolstack's keys for a vif on our bridge; waits for netback's InitWait.
    func createVif(_ d: XenHV.DomID, mac: String) throws -> XenBusDevice {
        let dev = XenBusDevice(type: "vif", frontendDomid: XenStore.DomID(d), devid: 0)
        try dom0.xenstore.createDevice(dev, backend: ["mac": mac, "bridge": bridge, "handle": "0", "type": "vif"],
                                       frontend: ["mac": mac, "handle": "0"])
        guard Dom0Harness.wait(dom0.xenstore, state: dev.backendPath, { $0 == .initWait || $0 == .closing }) == .initWait else {
            throw FrontError("\(dev.backendPath) never reached InitWait")
        }
        return dev
    }

    /// A guest in this process, its vif connected through XenBus like Linux netfront.
    func kitVif(name: String, postRx: Bool, ip addr: [UInt8] = [10, 214, 0, 1]) throws -> KitVif {
        kitCount += 1
        let g = try dom0.createGuest(name: name + tag, pages: NetFront.pagesNeeded(queues: 1) + 64)
        let mac: [UInt8] = [0x00, 0x16, 0x3e, 0x7a, UInt8(kitCount >> 8 & 0xFF), UInt8(kitCount & 0xFF)]
        let dev = try createVif(g.domid, mac: MACAddress(mac).description)
        let front = try NetFront(guest: g.hypervisor)
        if postRx { try front.queues[0].postRx() }
        let r = front.queues[0].rings
        guard case .shared(let port) = r.events else { throw FrontError("one event channel expected") }
        let keys = ["tx-ring-ref": "\(r.txRingRef)", "rx-ring-ref": "\(r.rxRingRef)", "event-channel": "\(port)",
                    "request-rx-copy": "1", "feature-rx-notify": "1", "feature-sg": "1", "feature-gso-tcpv4": "1",
                    "feature-gso-tcpv6": "1", "feature-ipv6-csum-offload": "1"]
        try g.xenstore.transaction { t in for (k, v) in keys { try t.write(dev.frontendPath + "/" + k, v) } }
        try g.xenstore.switchState(at: dev.frontendPath, to: .connected)
        guard Dom0Harness.wait(g.xenstore, state: dev.backendPath, { $0 == .connected || $0 == .closing }) == .connected else {
            throw FrontError("\(dev.backendPath) did not connect")
        }
        return KitVif(guest: g, dev: dev, front: front, mac: mac, ip: addr)
    }

    /// Closes a kit guest's vif and removes the device; waits until its tap is gone.
    func remove(_ v: KitVif) throws {
        try v.guest.xenstore.switchState(at: v.dev.frontendPath, to: .closed)
        _ = Dom0Harness.wait(dom0.xenstore, state: v.dev.backendPath, seconds: 10) { $0 == .closed }
        try dom0.xenstore.destroyDevice(v.dev)
        let deadline = Date().addingTimeInterval(10)
        while if_nametoindex(v.tap) != 0 && Date() < deadline { usleep(10_000) }  // bounded wait for the tap to go
        v.guest.xenstore.close()
        try dom0.hypervisor.destroyDomain(v.guest.domid)
    }

    /// What the kernel sent into a vif's tap and dropped at it (netback not reading: the backlog is full).
    func tapCounters(_ tap: String) -> String {
        func stat(_ n: String) -> String {
            ((try? String(contentsOfFile: "/sys/class/net/\(tap)/statistics/\(n)", encoding: .utf8)) ?? "?")
                .trimmingCharacters(in: .whitespacesAndNewlines)
        }
        return "the vif tap took \(stat("tx_packets")) frames and dropped \(stat("tx_dropped"))"
    }

    /// Floods `v` from the peer namespace with 1472-byte UDP datagrams.
    func flood(to v: KitVif) throws -> Flood {
        try ip("-n", peerNS, "neigh", "replace", v.ip.map(String.init).joined(separator: "."), "lladdr",
               MACAddress(v.mac).description, "dev", vethPeer)
        return Flood(fd: try socketInNamespace(peerNS, type: Int32(SOCK_DGRAM.rawValue), port: 0), to: v.ip)
    }

    // MARK: TCP

    /// iperf3 against a server in `serverNS`; returns bits/s received (up, then -R).
    func iperf(clientNS: String, serverNS: String, server: String, seconds: Double) throws -> (up: Double, down: Double) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        p.arguments = ["netns", "exec", serverNS, "iperf3", "-s", "-B", server]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        // ip netns exec runs iperf3 in its place; Foundation reaps it, so it
        // is signalled through a pidfd (never a pid someone else got since).
        let serverProcess = ProcessHandle(p.processIdentifier)
        let interrupted = InterruptCleanup.register { serverProcess?.signal(SIGKILL) }
        defer {
            if InterruptCleanup.unregister(interrupted) {
                p.terminate()
                p.waitUntilExit()
            }
        }
        func one(_ reverse: Bool) throws -> Double {
            var json = ""
            for _ in 0..<50 {
                json = (try? sh("/usr/sbin/ip", ["netns", "exec", clientNS, "iperf3", "-c", server, "-t", "\(Int(seconds.rounded(.up)))", "-J"]
                                + (reverse ? ["-R"] : []), check: false)) ?? ""
                if !json.isEmpty && !json.contains("unable to connect") && !json.contains("refused") { break }
                usleep(100_000)  // the server is still starting; iperf3 has no readiness signal
            }
            guard let data = json.data(using: .utf8),
                  let obj = try JSONSerialization.jsonObject(with: data) as? [String: Any],
                  let end = obj["end"] as? [String: Any], let sum = end["sum_received"] as? [String: Any],
                  let bps = sum["bits_per_second"] as? Double else { throw FrontError("iperf3 gave no result: \(json.prefix(400))") }
            return bps
        }
        return (try one(false), try one(true))
    }

    /// A bare veth pair between two namespaces of their own: the TCP baseline.
    func makeVethPair() throws {
        try ip("netns", "add", nsA)
        try ip("netns", "add", nsB)
        try ip("-n", nsA, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", nsB)
        try ip("-n", nsA, "addr", "add", "10.215.0.1/24", "dev", "va")
        try ip("-n", nsB, "addr", "add", "10.215.0.2/24", "dev", "vb")
        try ip("-n", nsA, "link", "set", "va", "up")
        try ip("-n", nsB, "link", "set", "vb", "up")
    }

    func iperfOverVeth(seconds: Double) throws -> (up: Double, down: Double) {
        try iperf(clientNS: nsB, serverNS: nsA, server: "10.215.0.1", seconds: seconds)
    }

    /// A pvguest process with one vif on the bridge, its NIC in `guestNS`.
    func startGuest() throws {
        let d = try dom0.prepareGuest(name: "pvnet\(tag)", pages: 4096)
        guestDomain = d.domid
        _ = try createVif(d.domid, mac: "00:16:3e:5a:0b:01")
        guest = try dom0.startKernel(d, "pvguest", arguments: ["--nbd-dir", dom0.dir, "--netns", guestNS] + (queues.map { ["--net-queues", "\($0)"] } ?? []),
                                  buildDirectory: build).pid
        try ip("-n", guestNS, "addr", "add", guestIP + "/24", "dev", "eth0")
    }

    func iperfThroughPath(seconds: Double) throws -> (up: Double, down: Double) {
        try iperf(clientNS: guestNS, serverNS: peerNS, server: "10.214.0.2", seconds: seconds)
    }

    // MARK: Small packets

    func smallFrame(from mac: [UInt8], ip src: [UInt8]) -> [UInt8] {
        Frames.udp(srcMAC: mac, dstMAC: peerMAC, src: src, dst: peerIP, sport: 9, dport: 9,
                   payload: Array(repeating: 0, count: 18))  // 60 bytes + FCS = 64 on the wire
    }

    func bareTapWriter(seconds: Double) throws -> Double {
        let tap = try Tap(name: "nbw\(tag)")
        writerTap = tap
        try ip("link", "set", tap.name, "master", bridge, "up")
        let frame = smallFrame(from: [0x00, 0x16, 0x3e, 0x7b, 0, 1], ip: [10, 214, 0, 8])
        var buf = [UInt8](repeating: 0, count: VnetHeader.size) + frame
        let fd = tap.queues[0]
        var n = 0
        let start = RateLimiter.now()
        let end = start + UInt64(seconds * 1e9)
        buf.withUnsafeMutableBytes { p in
            var iov = iovec(iov_base: p.baseAddress, iov_len: p.count)
            while true {
                for _ in 0..<256 { if cnet_writev(fd, &iov, 1) > 0 { n += 1 } }
                if RateLimiter.now() >= end { break }
            }
        }
        return Double(n) / (Double(RateLimiter.now() - start) / 1e9)
    }

    func smallPacketsThroughTx(seconds: Double) throws -> Double {
        let v = try kitVif(name: "pps", postRx: true, ip: [10, 214, 0, 7])
        defer { try? remove(v) }
        let q = v.front.queues[0]
        let frame = smallFrame(from: v.mac, ip: v.ip)
        // Every buffer holds the frame once; the loop only posts requests, as a
        // netfront recycling its buffers would.
        var ids: [UInt16] = []
        while let id = q.takeTxID() { ids.append(id); try q.writeTxBuffer(id, offset: 0, frame) }
        var free = ids
        var done = 0, errors = 0
        let start = RateLimiter.now()
        let end = start + UInt64(seconds * 1e9)
        while true {
            while let id = free.popLast() {
                var r = netif_tx_request()
                r.id = id; r.gref = q.txRef(id); r.size = UInt16(frame.count)
                q.tx.enqueue(r)
            }
            try q.pushTx()
            while let r = try q.tx.nextResponse() {
                free.append(r.id)
                done += 1
                if r.status != Int16(NETIF_RSP_OKAY) { errors += 1 }
            }
            if RateLimiter.now() >= end { break }
            if free.isEmpty {
                if try q.tx.finalCheckForResponses() { continue }
                _ = q.txChannel.wait(milliseconds: 100)
            }
        }
        let elapsed = Double(RateLimiter.now() - start) / 1e9
        if errors > 0 { print("warning: \(errors) of \(done) small frames answered with an error") }
        return Double(done - errors) / elapsed
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
        guard nsfd >= 0, cxen_setns(nsfd, 0x4000_0000 /* CLONE_NEWNET */) == 0 else { box.err = errno; return }
        close(nsfd)
        let s = socket(AF_INET, type | Int32(SOCK_CLOEXEC.rawValue), 0)
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
