import Foundation
import Glibc
import Synchronization
import Testing
import XenBus
import XenHV
import XenStore
import XenTestKit

/// The whole network path with real parts and real tools:
/// ping / iperf3 in the guest's namespace -> pvguest's tap -> netfront ->
/// netif rings and grants -> netback (a real `netback --xenstore` process,
/// hotplug through scripts/vif-bridge) -> vif tap -> bridge -> veth -> the
/// peer namespace. Needs root. Every namespace, bridge and veth is named per
/// run (pid) and removed in a defer, failures included.
@Suite(.serialized) struct NetPathTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path
    static let guestIP = "10.213.0.2", peerIP = "10.213.0.1"
    static let guestIP6 = "fd00:213::2", peerIP6 = "fd00:213::1"

    struct Command {
        let status: Int32
        let output: String
    }

    @discardableResult
    static func run(_ path: String, _ args: [String]) throws -> Command {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = args
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let out = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return Command(status: p.terminationStatus, output: String(decoding: out, as: UTF8.self))
    }

    /// `ip` for the test's scaffolding only (pvguest and netback never run it).
    @discardableResult
    static func ip(_ args: String...) throws -> Command {
        let r = try run("/usr/sbin/ip", args)
        guard r.status == 0 else { throw HypervisorError.protocolViolation("ip \(args.joined(separator: " ")): \(r.output)") }
        return r
    }

    static func inNetns(_ ns: String, _ args: [String]) throws -> Command {
        try run("/usr/sbin/ip", ["netns", "exec", ns] + args)
    }

    /// Pings until one reply comes back, at most `attempts` one-second tries.
    static func pingWorks(from ns: String, to addr: String, size: Int? = nil, attempts: Int = 20) throws -> Bool {
        let extra = size.map { ["-s", "\($0)", "-M", "do"] } ?? []
        for _ in 0..<attempts {
            if try inNetns(ns, ["ping", "-c", "1", "-W", "1"] + extra + [addr]).status == 0 { return true }
        }
        return false
    }

    static let counter = Atomic<Int>(0)

    /// dom0 (xenhv, xenstored), a netback process, the peer network, and a
    /// pvguest process with one vif; all gone at `tearDown`.
    final class Rig {
        let build: String
        let dom0: Dom0Harness
        let tag: String
        let bridge, vethHost, vethPeer, guestNS, peerNS: String
        let mac = "00:16:3e:5a:0b:01"
        let mtu: Int
        /// Queues netback offers and pvguest asks for.
        let queues: Int
        var netback: pid_t = 0
        var domain: Hypervisor.CreatedDomain?
        var guest: pid_t = 0
        var nicLine = ""

        init(mtu: Int = 1500, queues: Int = 1) throws {
            self.mtu = mtu
            self.queues = queues
            build = Dom0Harness.buildDirectory(packageRoot: NetPathTests.root)
            let n = NetPathTests.counter.wrappingAdd(1, ordering: .relaxed).newValue
            tag = "\(getpid() % 100000)x\(n)"
            bridge = "nfb\(tag)"
            vethHost = "nfv\(tag)a"
            vethPeer = "nfv\(tag)b"
            guestNS = "nfg\(tag)"
            peerNS = "nfp\(tag)"
            dom0 = try Dom0Harness(buildDirectory: build)
        }

        var vifName: String { "vif\(domain?.domid ?? 0).0" }

        /// The peer side: a bridge, a veth pair, the far end in its namespace with an address.
        func makePeer() throws {
            try ip("netns", "add", peerNS)
            try ip("link", "add", bridge, "type", "bridge")
            try ip("link", "set", bridge, "mtu", "\(mtu)", "up")
            try ip("link", "add", vethHost, "mtu", "\(mtu)", "type", "veth", "peer", "name", vethPeer, "mtu", "\(mtu)")
            try ip("link", "set", vethHost, "master", bridge, "up")
            try ip("link", "set", vethPeer, "netns", peerNS)
            try ip("-n", peerNS, "addr", "add", NetPathTests.peerIP + "/24", "dev", vethPeer)
            try ip("-n", peerNS, "addr", "add", NetPathTests.peerIP6 + "/64", "dev", vethPeer, "nodad")
            try ip("-n", peerNS, "link", "set", vethPeer, "up")
            try ip("-n", peerNS, "link", "set", "lo", "up")
        }

        func startNetback() throws {
            var out: [CInt] = [-1, -1]
            _ = pipe(&out)
            _ = fcntl(out[0], F_SETFD, FD_CLOEXEC)
            netback = try ProcessLauncher.spawn(build + "/netback",
                                                arguments: ["--xenstore", dom0.xenstoreSocket,
                                                            "--hypervisor", dom0.hypervisorSocket, "--log-level", "warning",
                                                            "--max-queues", "\(queues)"],
                                                environment: ["XEN_RUN_DIR": dom0.dir],
                                                descriptors: [(out[1], 1), (2, 2)])
            close(out[1])
            defer { close(out[0]) }
            var line = ""
            repeat { line = ProcessLauncher.readLine(out[0]) } while !line.isEmpty && !line.hasPrefix("netback ready")
            guard line.hasPrefix("netback ready") else { throw HypervisorError.protocolViolation("netback did not start") }
        }

        func killNetback() {
            guard netback > 0 else { return }
            kill(netback, SIGKILL)
            var st: Int32 = 0
            waitpid(netback, &st, 0)
            netback = 0
        }

        /// `beforeGuest` runs once the vif is in the store, before pvguest starts.
        func startGuest(beforeGuest: (XenBusDevice) throws -> Void = { _ in }) throws {
            let d = try dom0.prepareGuest(name: "pvnet", pages: 4096)
            domain = d
            let dev = XenBusDevice(type: "vif", frontendDomid: XenStore.DomID(d.domid), devid: 0)
            let script = NetPathTests.root + "/scripts/vif-bridge"
            var backend = ["mac": mac, "bridge": bridge, "script": script, "handle": "0", "type": "vif"]
            var frontend = ["mac": mac, "handle": "0"]
            if mtu != 1500 {
                backend["mtu"] = "\(mtu)"
                frontend["mtu"] = "\(mtu)"
            }
            try dom0.xenstore.createDevice(dev, backend: backend, frontend: frontend)
            try beforeGuest(dev)
            let k = try dom0.startKernel(d, "pvguest", arguments: ["--nbd-dir", dom0.dir, "--netns", guestNS, "--net-queues", "\(queues)"],
                                     buildDirectory: build)
            guest = k.pid
            nicLine = k.lines.first { $0.hasPrefix("nic ") } ?? ""
        }

        var tornDown = false
        func tearDown() {
            guard !tornDown else { return }
            tornDown = true
            if let d = domain { try? dom0.hypervisor.destroyDomain(d.domid) }  // kills pvguest: its tap goes
            if guest > 0 {
                var st: Int32 = 0
                waitpid(guest, &st, 0)
            }
            killNetback()  // its taps go
            _ = try? NetPathTests.run("/usr/sbin/ip", ["netns", "del", guestNS])
            _ = try? NetPathTests.run("/usr/sbin/ip", ["netns", "del", peerNS])
            _ = try? NetPathTests.run("/usr/sbin/ip", ["link", "del", vethHost])
            _ = try? NetPathTests.run("/usr/sbin/ip", ["link", "del", bridge])
        }

        /// Whether a link of that name exists in the root namespace.
        func linkExists(_ name: String) -> Bool { if_nametoindex(name) != 0 }

    }

    /// iperf3 TCP from the guest namespace to the peer's server, `reverse` for peer -> guest.
    static func iperf(_ rig: Rig, reverse: Bool, address: String = peerIP, streams: Int = 1) throws -> Command {
        let server = Process()
        server.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        server.arguments = ["netns", "exec", rig.peerNS, "iperf3", "-s", "-1", "-B", address]
        server.standardOutput = FileHandle.nullDevice
        server.standardError = FileHandle.nullDevice
        try server.run()
        defer {
            if server.isRunning { server.terminate() }
            server.waitUntilExit()
        }
        var last = Command(status: -1, output: "")
        // The server needs a moment to listen: retry a refused connection a bounded number of times.
        for _ in 0..<40 {
            last = try inNetns(rig.guestNS, ["iperf3", "-c", address, "-n", "128M", "-P", "\(streams)", "--connect-timeout", "2000"]
                                              + (reverse ? ["-R"] : []))
            if last.status == 0 || !last.output.contains("refused") { break }
            var pfd = pollfd()
            _ = poll(&pfd, 0, 50)
        }
        return last
    }

    @Test func pingAndIperfBothWaysAndReconnectAfterNetbackDies() throws {
        let rig = try Rig()
        defer { rig.tearDown() }
        try rig.makePeer()
        try rig.startNetback()
        try rig.startGuest()

        #expect(rig.nicLine == "nic eth0 netns \(rig.guestNS) mac \(rig.mac)", "pvguest printed '\(rig.nicLine)'")
        #expect(access("/run/netns/" + rig.guestNS, F_OK) == 0, "pvguest made no namespace \(rig.guestNS)")
        // The NIC carries the vif's MAC and is up in the guest's namespace.
        let link = try Self.ip("-n", rig.guestNS, "-o", "link", "show", "eth0").output
        #expect(link.contains("link/ether \(rig.mac)") && link.contains("UP"), "\(link)")
        #expect(rig.linkExists(rig.vifName))
        let be = "/local/domain/0/backend/vif/\(rig.domain!.domid)/0"
        let fe = "/local/domain/\(rig.domain!.domid)/device/vif/0"
        #expect(try rig.dom0.xenstore.read(be + "/state") == "4")
        #expect(try rig.dom0.xenstore.read(fe + "/state") == "4")
        #expect(try rig.dom0.xenstore.read(fe + "/request-rx-copy") == "1")
        #expect(try rig.dom0.xenstore.read(fe + "/feature-sg") == "1")

        try Self.ip("-n", rig.guestNS, "addr", "add", Self.guestIP + "/24", "dev", "eth0")
        // ARP + ICMP, both ways.
        #expect(try Self.pingWorks(from: rig.guestNS, to: Self.peerIP), "guest -> peer ping")
        #expect(try Self.pingWorks(from: rig.peerNS, to: Self.guestIP, attempts: 3), "peer -> guest ping")
        // Full-size frames, don't fragment.
        #expect(try Self.pingWorks(from: rig.guestNS, to: Self.peerIP, size: 1472, attempts: 3))

        // TCP with GSO and checksum offload, both directions.
        let up = try Self.iperf(rig, reverse: false)
        #expect(up.status == 0 && up.output.contains("receiver"), "guest -> peer iperf3: \(up.output)")
        let down = try Self.iperf(rig, reverse: true)
        #expect(down.status == 0 && down.output.contains("receiver"), "peer -> guest iperf3: \(down.output)")

        // IPv6: neighbour discovery, ICMPv6, and TCPv6 with GSO and checksum offload.
        try Self.ip("-n", rig.guestNS, "addr", "add", Self.guestIP6 + "/64", "dev", "eth0", "nodad")
        #expect(try Self.pingWorks(from: rig.guestNS, to: Self.peerIP6), "guest -> peer ping -6")
        #expect(try Self.pingWorks(from: rig.peerNS, to: Self.guestIP6, attempts: 3), "peer -> guest ping -6")
        let up6 = try Self.iperf(rig, reverse: false, address: Self.peerIP6)
        #expect(up6.status == 0 && up6.output.contains("receiver"), "guest -> peer iperf3 -6: \(up6.output)")
        let down6 = try Self.iperf(rig, reverse: true, address: Self.peerIP6)
        #expect(down6.status == 0 && down6.output.contains("receiver"), "peer -> guest iperf3 -6: \(down6.output)")

        // kill -9 netback: its vif tap goes; a new netback re-offers the device,
        // the guest redoes the handshake and traffic flows again.
        rig.killNetback()
        #expect(eventually { !rig.linkExists(rig.vifName) }, "\(rig.vifName) outlived netback")
        try rig.startNetback()
        #expect(eventually { rig.linkExists(rig.vifName) }, "the new netback made no \(rig.vifName)")
        #expect(try Self.pingWorks(from: rig.guestNS, to: Self.peerIP, attempts: 30), "ping after netback restart")
        #expect(try Self.pingWorks(from: rig.peerNS, to: Self.guestIP, attempts: 3), "peer -> guest ping after restart")
        #expect(try rig.dom0.xenstore.read(be + "/state") == "4")
        #expect(try rig.dom0.xenstore.read(fe + "/state") == "4")

        // The toolstack's destroy kills pvguest (SIGKILL): the namespace it
        // created goes with it, and so does its NIC.
        try rig.dom0.hypervisor.destroyDomain(rig.domain!.domid)
        var st: Int32 = 0
        waitpid(rig.guest, &st, 0)
        rig.guest = 0
        #expect(eventually { access("/run/netns/" + rig.guestNS, F_OK) != 0 }, "\(rig.guestNS) outlived pvguest")

        rig.tearDown()
        #expect(Self.leftovers(rig).isEmpty, "left behind: \(Self.leftovers(rig))")
    }

    @Test func jumboFramesWithMTU9000() throws {
        let rig = try Rig(mtu: 9000)
        defer { rig.tearDown() }
        try rig.makePeer()
        try rig.startNetback()
        try rig.startGuest()
        let link = try Self.ip("-n", rig.guestNS, "-o", "link", "show", "eth0").output
        #expect(link.contains("mtu 9000"), "\(link)")
        try Self.ip("-n", rig.guestNS, "addr", "add", Self.guestIP + "/24", "dev", "eth0")
        #expect(try Self.pingWorks(from: rig.guestNS, to: Self.peerIP), "guest -> peer ping")
        // 8000 bytes of payload, don't fragment: a 3-slot frame each way.
        #expect(try Self.pingWorks(from: rig.guestNS, to: Self.peerIP, size: 8000, attempts: 3), "jumbo guest -> peer")
        #expect(try Self.pingWorks(from: rig.peerNS, to: Self.guestIP, size: 8000, attempts: 3), "jumbo peer -> guest")
        let up = try Self.iperf(rig, reverse: false)
        #expect(up.status == 0 && up.output.contains("receiver"), "guest -> peer iperf3: \(up.output)")

        // An orderly stop: pvguest closes the vif with the backend and removes
        // the namespace it created.
        let fe = "/local/domain/\(rig.domain!.domid)/device/vif/0"
        kill(rig.guest, SIGTERM)
        var st: Int32 = 0
        waitpid(rig.guest, &st, 0)
        rig.guest = 0
        #expect(st & 0x7F == 0 && (st >> 8) & 0xFF == 0, "pvguest exit status \(st)")
        #expect(try rig.dom0.xenstore.read(fe + "/state") == "6")
        #expect(access("/run/netns/" + rig.guestNS, F_OK) != 0, "pvguest left its namespace behind")

        rig.tearDown()
        #expect(Self.leftovers(rig).isEmpty, "left behind: \(Self.leftovers(rig))")
    }

    /// The soak's hang on a vif: netback killed between its InitWait and its
    /// Connected, after the frontend announced fresh rings and went Connected
    /// (netfront, as xen-netfront, goes Connected before the backend does).
    /// The restarted netback's InitWait is the value the frontend already
    /// read, so nothing tells it to start over: netback must see that the
    /// rings never carried a request and connect to them, well inside the
    /// frontend's 30 s handshake timeout.
    @Test func netbackKilledBetweenInitWaitAndConnectedConnectsOnRestart() throws {
        let rig = try Rig()
        defer { rig.tearDown() }
        try rig.makePeer()
        try rig.startNetback()
        // Sound: the rig is used by the thread below only while the test waits for it.
        struct Box: @unchecked Sendable { let rig: Rig }
        let box = Box(rig: rig)
        let failure = Mutex<String?>(nil)
        let restartedAt = Mutex(Date())
        let done = DispatchSemaphore(value: 0)
        try rig.startGuest(beforeGuest: { dev in
            // netback offers the vif, then stops before it can see the frontend.
            guard Dom0Harness.wait(rig.dom0.xenstore, state: dev.backendPath, seconds: 10, { $0 == .initWait }) == .initWait else {
                throw HypervisorError.protocolViolation("netback did not offer the vif")
            }
            kill(rig.netback, SIGSTOP)
            // Beside pvguest's start-up (it ends at its ready line, once the NIC is up).
            Thread {
                defer { done.signal() }
                let rig = box.rig
                guard Dom0Harness.wait(rig.dom0.xenstore, state: dev.frontendPath, seconds: 20, { $0 == .connected }) == .connected,
                      (try? rig.dom0.xenstore.read(dev.backendPath + "/state")) == "\(XenBus.XenbusState.initWait.rawValue)" else {
                    failure.withLock { $0 = "the frontend did not go Connected on the stopped netback's InitWait" }
                    return
                }
                rig.killNetback()
                restartedAt.withLock { $0 = Date() }
                do { try rig.startNetback() } catch { failure.withLock { $0 = "netback did not restart: \(error)" } }
            }.start()
        })
        done.wait()
        #expect(failure.withLock { $0 } == nil)
        let restarted = restartedAt.withLock { $0 }
        #expect(Dom0Harness.wait(rig.dom0.xenstore, state: "/local/domain/\(rig.domain!.domid)/device/vif/0", seconds: 1) { $0 == .connected } == .connected)
        #expect(Date().timeIntervalSince(restarted) < 10, "the NIC came up \(Date().timeIntervalSince(restarted)) s after the restart")
        #expect(rig.nicLine == "nic eth0 netns \(rig.guestNS) mac \(rig.mac)", "pvguest printed '\(rig.nicLine)'")
        try Self.ip("-n", rig.guestNS, "addr", "add", Self.guestIP + "/24", "dev", "eth0")
        #expect(try Self.pingWorks(from: rig.guestNS, to: Self.peerIP), "guest -> peer ping")
        #expect(try Self.pingWorks(from: rig.peerNS, to: Self.guestIP, attempts: 3), "peer -> guest ping")
        rig.tearDown()
        #expect(Self.leftovers(rig).isEmpty, "left behind: \(Self.leftovers(rig))")
    }

    /// Two queues with split event channels, as Linux's netfront takes them
    /// when netback offers them: the rings and channels announced under
    /// queue-N/, one tap queue per ring queue on both sides (the guest kernel
    /// and the bridge spread flows over them), TCP both ways over both queues;
    /// a restarted netback gets two queues again.
    @Test func twoQueuesWithSplitEventChannels() throws {
        let rig = try Rig(queues: 2)
        defer { rig.tearDown() }
        try rig.makePeer()
        try rig.startNetback()
        try rig.startGuest()
        #expect(rig.nicLine == "nic eth0 netns \(rig.guestNS) mac \(rig.mac)", "pvguest printed '\(rig.nicLine)'")
        let domid = rig.domain!.domid
        let fe = "/local/domain/\(domid)/device/vif/0"
        let xs = rig.dom0.xenstore
        func expectTwoQueues() throws {
            #expect(try xs.read(fe + "/multi-queue-num-queues") == "2")
            for q in 0..<2 {
                for k in ["tx-ring-ref", "rx-ring-ref", "event-channel-tx", "event-channel-rx"] {
                    #expect(try xs.readIfExists(fe + "/queue-\(q)/" + k) != nil, "no queue-\(q)/\(k)")
                }
                #expect(try xs.readIfExists(fe + "/queue-\(q)/event-channel") == nil)
            }
            for k in ["tx-ring-ref", "rx-ring-ref", "event-channel", "event-channel-tx"] {
                #expect(try xs.readIfExists(fe + "/" + k) == nil, "a single-queue key \(k) is left")
            }
        }
        try expectTwoQueues()
        // A tap queue per ring queue: the vif in dom0, eth0 in the guest's namespace.
        func txQueues(_ dev: String, in ns: String?) throws -> [String] {
            let ls = ["ls", "/sys/class/net/\(dev)/queues"]
            let out = try ns.map { try Self.inNetns($0, ls) } ?? Self.run("/usr/bin/ls", Array(ls.dropFirst()))
            return out.output.split(whereSeparator: \.isWhitespace).map(String.init).filter { $0.hasPrefix("tx-") }.sorted()
        }
        #expect(try txQueues(rig.vifName, in: nil) == ["tx-0", "tx-1"])
        #expect(try txQueues("eth0", in: rig.guestNS) == ["tx-0", "tx-1"])

        try Self.ip("-n", rig.guestNS, "addr", "add", Self.guestIP + "/24", "dev", "eth0")
        #expect(try Self.pingWorks(from: rig.guestNS, to: Self.peerIP), "guest -> peer ping")
        #expect(try Self.pingWorks(from: rig.peerNS, to: Self.guestIP, attempts: 3), "peer -> guest ping")
        // netback's per-queue counters (its statistics file, rewritten every second).
        let statsPath = rig.dom0.dir + "/stats/netback.stats"
        func counter(_ name: String) -> UInt64 {
            let text = (try? String(contentsOfFile: statsPath, encoding: .utf8)) ?? ""
            let line = text.split(separator: "\n").first { $0.hasPrefix("vif \(domid) 0 \(name) ") }
            return line.flatMap { $0.split(separator: " ").last }.flatMap { UInt64($0) } ?? 0
        }
        let names = ["queue0_tx_packets", "queue1_tx_packets", "queue0_rx_packets", "queue1_rx_packets"]
        // Eight flows each way: the taps pick a queue per flow by its hash,
        // so a run may put (nearly) all of them on one queue; each run has new
        // flows, and three runs that all do are a chance in millions.
        var spread = false
        for _ in 0..<3 where !spread {
            let up = try Self.iperf(rig, reverse: false, streams: 8)
            #expect(up.status == 0 && up.output.contains("receiver"), "guest -> peer iperf3: \(up.output)")
            let down = try Self.iperf(rig, reverse: true, streams: 8)
            #expect(down.status == 0 && down.output.contains("receiver"), "peer -> guest iperf3: \(down.output)")
            spread = eventually(seconds: 3) { names.allSatisfy { counter($0) > 1000 } }
        }
        #expect(spread, "per-queue packets: \(names.map { "\($0)=\(counter($0))" })")

        // kill -9 netback; the restarted one is reconnected with two queues again.
        rig.killNetback()
        #expect(eventually { !rig.linkExists(rig.vifName) }, "\(rig.vifName) outlived netback")
        try rig.startNetback()
        #expect(try Self.pingWorks(from: rig.guestNS, to: Self.peerIP, attempts: 30), "ping after netback restart")
        #expect(try xs.read(fe + "/state") == "4")
        try expectTwoQueues()
        #expect(try txQueues(rig.vifName, in: nil) == ["tx-0", "tx-1"])
        #expect(try txQueues("eth0", in: rig.guestNS) == ["tx-0", "tx-1"])

        rig.tearDown()
        #expect(Self.leftovers(rig).isEmpty, "left behind: \(Self.leftovers(rig))")
    }

    /// What of the rig's namespaces, bridge, veth and vif tap still exists.
    static func leftovers(_ rig: Rig) -> [String] {
        let names: [String] = [rig.bridge, rig.vethHost, rig.vifName]
        let links = names.filter { if_nametoindex($0) != 0 }
        let ns = [rig.guestNS, rig.peerNS].filter { access("/run/netns/" + $0, F_OK) == 0 }
        return links + ns
    }
}
