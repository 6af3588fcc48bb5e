import Foundation
import Glibc
import NBD
import Synchronization
import Testing
import XenBus
import XenCtl
import XenTestKit

extension Hostile {
    /// Issue 6's soak with real processes throughout: `xenctl up` (xenhv,
    /// xenstored, blkback, netback under the supervisor), 8 pvguests with 2
    /// disks and 2 NICs each on one bridge, a peer namespace on a veth.
    /// For XEN_SYSTEM_SOAK_SECONDS (default 20): each guest writes
    /// checksummed blocks through its first disk's NBD export and flushes,
    /// reads one back, and pings the peer with a payload pattern; one thread
    /// detaches and re-attaches every guest's second disk (checking what was
    /// flushed to it) and second NIC; another kills blkback or netback with
    /// SIGKILL at random and the supervisor restarts it. At the end: every
    /// device is connected again, every acknowledged and flushed block is in
    /// its image, both NICs of every guest answer, and once the guests are
    /// destroyed every daemon is back to its starting descriptors and holds
    /// no mapping of a destroyed guest. Root: bridge, veth, namespaces, taps; all removed.
    @Suite struct SystemSoakTests {
        static var seconds: Double {
            ProcessInfo.processInfo.environment["XEN_SYSTEM_SOAK_SECONDS"].flatMap(Double.init) ?? 20
        }
        static let guestCount = 8

        @Test(.timeLimit(.minutes(15)))
        func eightGuestsWithTwoDisksAndTwoNICsSurviveDetachLoopsAndBackendKills() throws {
            let soak = try SystemSoak(guests: Self.guestCount)
            defer { soak.tearDown() }
            try soak.start()
            let idle = soak.daemonResources()
            try soak.createGuests()
            try soak.warmUp()
            let problems = soak.run(seconds: Self.seconds)
            #expect(problems.isEmpty, "\(problems.prefix(20))")

            // Every device connected again, on the right backends.
            let unconnected = soak.unconnectedDevices(within: 60)
            #expect(unconnected.isEmpty, "not connected: \(unconnected)")
            // Every acknowledged, flushed block, through the guest and in the image.
            let lost = soak.lostBlocks()
            #expect(lost.isEmpty, "lost: \(lost.prefix(20))")
            // Both NICs of every guest carry traffic.
            let deaf = soak.deafNICs()
            #expect(deaf.isEmpty, "no ping through: \(deaf)")
            #expect(soak.cycles.load(ordering: .relaxed) >= 2, "attach/detach cycles: \(soak.cycles.load(ordering: .relaxed))")
            #expect(soak.kills.load(ordering: .relaxed) >= 1)

            // Guests gone: descriptors and mappings back to the idle level.
            try soak.destroyGuests()
            let leftovers = soak.waitForIdle(idle, seconds: 60)
            #expect(leftovers.isEmpty, "\(leftovers)")
            print(soak.summary(idle: idle))
        }
    }
}

/// The soak's world: a run directory with the dom0 services, a bridge with a
/// peer, guests, and the record of every acknowledged write.
final class SystemSoak: @unchecked Sendable {
    // Sound: set-up fields are written before any worker thread starts; the
    // shared records are behind Mutexes and Atomics.
    let run: String
    let bridge: String
    let peer: String
    let veth: String
    let guestCount: Int
    let bin = BuildProducts.directory()
    let environment: [String: String]

    struct Guest {
        let name: String
        var domid = ""
        var netns = ""
        /// (vdev, image, NBD socket)
        var disks: [(vdev: String, image: String, socket: String)] = []
        let index: Int
        var mac: [String] { ["00:16:3e:5a:\(String(format: "%02x", index)):00", "00:16:3e:5a:\(String(format: "%02x", index)):01"] }
        /// The guest's address on NIC `n` (eth0 10.77.0.x, eth1 10.78.0.x).
        func address(_ n: Int) -> String { "10.\(77 + n).0.\(10 + index)" }
    }
    var guests: [Guest] = []
    /// guest -> disk -> block -> seed of the last acknowledged and flushed write.
    let acknowledged: Mutex<[[[Int: Int]]]>
    let problems = Mutex<[String]>([])
    let cycles = Atomic<Int>(0)
    let kills = Atomic<Int>(0)
    let writes = Atomic<Int>(0)
    let pings = Atomic<Int>(0)
    let attachRetries = Atomic<Int>(0)
    let stop = Atomic<Bool>(false)
    static let blocksPerDisk = 256  // 1 MiB of 4 KiB blocks per disk is exercised
    static let imageBytes: off_t = 8 << 20

    init(guests: Int) throws {
        guestCount = guests
        var template = Array("/tmp/xsoak-XXXXXX".utf8CString)
        run = String(cString: mkdtemp(&template)!)
        chmod(run, 0o755)  // guests run unprivileged and serve their disks from run/guests
        let tag = String(getpid() % 100000)
        bridge = "xsk\(tag)"
        veth = "xskv\(tag)"
        peer = "xsk-peer-\(tag)"
        environment = ["XENHV_FIRST_DOMID": "\(Dom0Harness.distinctFirstDomID())"]
        acknowledged = Mutex(Array(repeating: [[:], [:]], count: guests))
    }

    func xenctl(_ args: String...) -> CommandResult {
        let t0 = Date()
        let r = CommandResult.run(bin + "/xenctl", args + ["--run-dir", run], environment: environment, timeout: 120)
        if ProcessInfo.processInfo.environment["XEN_SOAK_TRACE"] != nil { print("xenctl \(args.first ?? "") \(args.dropFirst().first ?? ""): \(String(format: "%.2f", Date().timeIntervalSince(t0))) s") }
        return r
    }

    func problem(_ p: String) { problems.withLock { $0.append(p) } }

    func start() throws {
        let up = xenctl("up")
        guard up.ok else { throw SoakFailure("xenctl up: \(up)") }
        for (cmd, args) in [(bin + "/xen-netlink", ["bridge-add", bridge]),
                            ("ip", ["netns", "add", peer]),
                            ("ip", ["link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", peer]),
                            (bin + "/xen-netlink", ["enslave", veth, bridge]),
                            (bin + "/xen-netlink", ["up", veth]),
                            ("ip", ["-n", peer, "addr", "add", "10.77.0.1/24", "dev", "eth0"]),
                            ("ip", ["-n", peer, "addr", "add", "10.78.0.1/24", "dev", "eth0"]),
                            ("ip", ["-n", peer, "link", "set", "eth0", "up"])] {
            let r = CommandResult.run(cmd, args)
            guard r.ok else { throw SoakFailure("\(cmd) \(args.joined(separator: " ")): \(r)") }
        }
    }

    func createGuests() throws {
        for i in 0..<guestCount {
            var g = Guest(name: "soak\(i)", index: i)
            var specs: [String] = []
            for vdev in ["xvda", "xvdb"] {
                let image = run + "/\(g.name)-\(vdev).img"
                guard FileManager.default.createFile(atPath: image, contents: nil), truncate(image, Self.imageBytes) == 0 else {
                    throw SoakFailure("cannot make \(image)")
                }
                g.disks.append((vdev, image, ""))
                specs.append("'format=raw, vdev=\(vdev), access=rw, target=\(image)'")
            }
            let cfg = run + "/\(g.name).cfg"
            let text = "name = '\(g.name)'\nmemory = 64\ndisk = [ \(specs.joined(separator: ", ")) ]\n"
                + "vif = [ 'mac=\(g.mac[0]), bridge=\(bridge)', 'mac=\(g.mac[1]), bridge=\(bridge)' ]\n"
            #expect(FileManager.default.createFile(atPath: cfg, contents: Data(text.utf8)))
            let r = xenctl("create", cfg)
            guard r.ok else { throw SoakFailure("create \(g.name): \(r)") }
            g.domid = r.out.split(separator: "(id ").last?.split(separator: ")").first.map(String.init) ?? ""
            for (k, d) in g.disks.enumerated() {
                guard let uri = Self.uri(in: r.out, vdev: d.vdev) else { throw SoakFailure("create \(g.name): no \(d.vdev) in \(r.out)") }
                g.disks[k].socket = uri
            }
            let nics = r.out.split(separator: "\n").filter { $0.contains("nic eth") }
            guard nics.count == 2, let ns = nics[0].split(separator: " ").firstIndex(of: "netns").map({ String(nics[0].split(separator: " ")[$0 + 1]) }) else {
                throw SoakFailure("create \(g.name): NICs \(nics)")
            }
            g.netns = ns
            guests.append(g)
            for n in 0..<2 { try configureNIC(g, n) }
        }
    }

    /// The NBD socket of `vdev` in xenctl's output ("disk xvda: nbd+unix:///xvda?socket=PATH").
    static func uri(in out: String, vdev: String) -> String? {
        guard let line = out.split(separator: "\n").first(where: { $0.contains("disk \(vdev):") }),
              let s = line.range(of: "socket=") else { return nil }
        return String(line[s.upperBound...]).trimmingCharacters(in: .whitespaces)
    }

    func configureNIC(_ g: Guest, _ n: Int) throws {
        for args in [["-n", g.netns, "addr", "replace", g.address(n) + "/24", "dev", "eth\(n)"],
                     ["-n", g.netns, "link", "set", "eth\(n)", "up"]] {
            let r = CommandResult.run("ip", args)
            guard r.ok else { throw SoakFailure("ip \(args.joined(separator: " ")): \(r)") }
        }
    }

    /// One ping with a payload pattern from NIC `n` of guest `g` to the peer;
    /// ping checks the echoed bytes.
    func ping(_ g: Guest, _ n: Int, count: Int = 1) -> Bool {
        let pattern = String(format: "%02x%02x", 0x5a ^ g.index, 0xc3 ^ n)
        return CommandResult.run("ip", ["netns", "exec", g.netns, "ping", "-n", "-q", "-c", "\(count)", "-W", "1", "-s", "1200",
                                        "-p", pattern, "-I", "eth\(n)", "10.\(77 + n).0.1"], timeout: 10).ok
    }

    /// Guest `g`'s first round: the NICs answer (ARP settled), a write lands.
    func warmUp() throws {
        for g in guests {
            for n in 0..<2 {
                var ok = false
                for _ in 0..<10 where !ok { ok = ping(g, n) }
                guard ok else { throw SoakFailure("\(g.name) eth\(n): no ping before the soak") }
            }
            try writeRound(g, disk: 0, round: 0)
            try writeRound(g, disk: 1, round: 0)
        }
    }

    /// 4 checksummed blocks to disk `d` of `g`, a flush, then one earlier block read back.
    func writeRound(_ g: Guest, disk d: Int, round: Int, client: NBDClient? = nil) throws {
        let c = try client ?? NBDClient(socket: g.disks[d].socket, timeoutSeconds: 60)
        var written: [Int: Int] = [:]
        for k in 0..<4 {
            let block = (round * 7 + k * 61 + g.index) % Self.blocksPerDisk
            let seed = ((g.index * 2 + d) << 24) | (round << 4) | k
            try c.write(blockPattern(seed), at: UInt64(block * 4096))
            written[block] = seed
        }
        try c.flush()
        writes.add(written.count, ordering: .relaxed)
        acknowledged.withLock { for (b, s) in written { $0[g.index][d][b] = s } }
        if let (b, s) = acknowledged.withLock({ $0[g.index][d].randomElement() }) {
            let back = try c.read(at: UInt64(b * 4096), length: 4096)
            if back != blockPattern(s) { problem("\(g.name) \(g.disks[d].vdev) round \(round): block \(b) read back wrong") }
        }
    }

    /// Runs the workers for `seconds`; returns what went wrong.
    func run(seconds: Double) -> [String] {
        let deadline = Date().addingTimeInterval(seconds)
        var threads: [TestThread] = []
        for g in guests {
            threads.append(TestThread { self.guestWorker(g, until: deadline) })
        }
        threads.append(TestThread { self.detachWorker(until: deadline) })
        threads.append(TestThread { self.chaosWorker(until: deadline) })
        for t in threads { t.join() }
        return problems.withLock { $0 }
    }

    func guestWorker(_ g: Guest, until deadline: Date) {
        var round = 1
        do {
            let client = try NBDClient(socket: g.disks[0].socket, timeoutSeconds: 60)
            while Date() < deadline {
                try writeRound(g, disk: 0, round: round, client: client)
                if ping(g, 0) { pings.add(1, ordering: .relaxed) }
                round += 1
            }
        } catch {
            problem("\(g.name) xvda round \(round): \(error)")
        }
    }

    /// Round robin over the guests: detach xvdb and eth1, attach them again,
    /// check xvdb's flushed blocks and write more.
    func detachWorker(until deadline: Date) {
        var round = 1
        while Date() < deadline {
            var g = guests[round % guests.count]
            let d = g.disks[1]
            let det = xenctl("block-detach", g.name, d.vdev)
            guard det.ok else { problem("block-detach \(g.name) \(d.vdev): \(det)"); return }
            if FileManager.default.fileExists(atPath: d.socket) { problem("\(g.name) \(d.vdev): socket left after detach") }
            let att = attach { self.xenctl("block-attach", g.name, "format=raw, vdev=\(d.vdev), access=rw, target=\(d.image)") }
            guard att.ok, let socket = Self.uri(in: att.out, vdev: d.vdev) else { problem("block-attach \(g.name): \(att)"); return }
            g.disks[1].socket = socket
            guests[g.index] = g
            do {
                let c = try NBDClient(socket: socket, timeoutSeconds: 60)
                for (b, s) in acknowledged.withLock({ $0[g.index][1] }) {
                    if try c.read(at: UInt64(b * 4096), length: 4096) != blockPattern(s) {
                        problem("\(g.name) \(d.vdev) after re-attach \(round): block \(b) lost")
                    }
                }
                try writeRound(g, disk: 1, round: round, client: c)
            } catch {
                problem("\(g.name) \(d.vdev) after re-attach \(round): \(error)")
                return
            }
            let ndet = xenctl("network-detach", g.name, "1")
            guard ndet.ok else { problem("network-detach \(g.name) 1: \(ndet)"); return }
            let natt = attach { self.xenctl("network-attach", g.name, "mac=\(g.mac[1]), bridge=\(self.bridge)") }
            guard natt.ok, natt.out.contains("nic eth1") else { problem("network-attach \(g.name): \(natt)"); return }
            do { try configureNIC(g, 1) } catch { problem("\(error)"); return }
            cycles.add(1, ordering: .relaxed)
            round += 1
        }
    }

    /// An attach may meet a backend the chaos thread just killed: the
    /// toolstack then reports that the frontend did not connect and removes
    /// the device. Retry while the supervisor restarts it (bounded).
    func attach(_ body: () -> CommandResult) -> CommandResult {
        var r = body()
        for _ in 0..<3 where !r.ok && r.err.contains("connect") {
            attachRetries.add(1, ordering: .relaxed)
            _ = waitForServices(seconds: 30)
            r = body()
        }
        return r
    }

    /// Kills blkback or netback (SIGKILL) every 2-4 s; the supervisor restarts it.
    func chaosWorker(until deadline: Date) {
        while Date() < deadline {
            // Pacing, not synchronisation: the next kill comes 2-4 s after a restart.
            var p = pollfd(fd: -1, events: 0, revents: 0)
            _ = poll(&p, 0, Int32.random(in: 2000...4000))
            guard Date() < deadline else { break }
            let victim = Bool.random() ? "blkback" : "netback"
            guard let s = ServiceStatus.read(runDir: run)?.first(where: { $0.name == victim }), s.pid > 0 else {
                problem("\(victim) not in the supervisor's status")
                return
            }
            kill(s.pid, SIGKILL)
            if ProcessInfo.processInfo.environment["XEN_SOAK_TRACE"] != nil { print("killed \(victim) \(s.pid) at \(Date())") }
            kills.add(1, ordering: .relaxed)
            guard waitForServices(seconds: 30, replacing: [victim: s.pid]) else {
                problem("\(victim) not restarted within 30 s")
                return
            }
        }
    }

    /// Waits until every service runs (with a new pid where given).
    @discardableResult
    func waitForServices(seconds: Double, replacing old: [String: Int32] = [:]) -> Bool {
        eventually(seconds: seconds, every: 1) {
            guard let all = ServiceStatus.read(runDir: self.run), all.count == 4 else { return false }
            return all.allSatisfy { $0.state == "running" && $0.pid > 0 && $0.pid != old[$0.name] }
        }
    }

    func store() throws -> XenBusClient { try XenBusClient.connect(socketPath: Toolstack(runDir: run).xenstoreSocket) }

    /// Devices whose backend or frontend is not Connected after `seconds`.
    func unconnectedDevices(within seconds: Double) -> [String] {
        guard waitForServices(seconds: seconds), let xs = try? store() else { return ["services or xenstored not up"] }
        defer { xs.close() }
        var missing: [String] = []
        _ = eventually(seconds: seconds, every: 1) {
            missing = []
            for g in self.guests {
                for (type, ids) in [("vbd", ["51712", "51728"]), ("vif", ["0", "1"])] {
                    for id in ids {
                        let be = "/local/domain/0/backend/\(type)/\(g.domid)/\(id)"
                        let fe = "/local/domain/\(g.domid)/device/\(type)/\(id)"
                        let states = [be, fe].map { ((try? xs.readIfExists($0 + "/state")) ?? nil) ?? "-" }
                        if states != ["4", "4"] { missing.append("\(g.name) \(type) \(id): \(states)") }
                    }
                }
            }
            return missing.isEmpty
        }
        return missing
    }

    /// Acknowledged and flushed blocks that are not in their image (read
    /// through the guest's export and straight from the file).
    func lostBlocks() -> [String] {
        var lost: [String] = []
        let acked = acknowledged.withLock { $0 }
        for g in guests {
            for (d, disk) in g.disks.enumerated() {
                var client: NBDClient?
                // A read through the guest that fails (a deaf queue answers
                // nothing) is reported once; the export is not read further,
                // so a broken disk costs one timeout, not one per block.
                do { client = try NBDClient(socket: disk.socket, timeoutSeconds: 20) } catch {
                    let log = (try? String(contentsOfFile: run + "/logs/guest-\(g.name).log", encoding: .utf8)) ?? ""
                    lost.append("\(g.name) \(disk.vdev): no export at \(disk.socket): \(error); guest log: \(log.suffix(2000))")
                }
                let fd = open(disk.image, O_RDONLY | O_CLOEXEC)
                defer { close(fd) }
                for (b, s) in acked[g.index][d] {
                    var got = [UInt8](repeating: 0, count: 4096)
                    _ = got.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 4096, off_t(b * 4096)) }
                    if got != blockPattern(s) { lost.append("\(g.name) \(disk.vdev) block \(b) (image)") }
                    if let c = client {
                        do {
                            if try c.read(at: UInt64(b * 4096), length: 4096) != blockPattern(s) {
                                lost.append("\(g.name) \(disk.vdev) block \(b) (through the guest)")
                            }
                        } catch {
                            lost.append("\(g.name) \(disk.vdev) block \(b) (through the guest): \(error); not read further")
                            client = nil
                        }
                    }
                }
            }
        }
        return lost
    }

    func deafNICs() -> [String] {
        var deaf: [String] = []
        for g in guests {
            for n in 0..<2 {
                // The first ping after a NIC came back may wait for ARP.
                var ok = false
                for _ in 0..<5 where !ok { ok = ping(g, n) }
                if !ok {
                    let log = (try? String(contentsOfFile: run + "/logs/guest-\(g.name).log", encoding: .utf8)) ?? ""
                    let addr = CommandResult.run("ip", ["-n", g.netns, "-br", "addr"]).out
                    deaf.append("\(g.name) eth\(n) (addresses: \(addr); guest log: \(log.suffix(1500)))")
                }
            }
        }
        return deaf
    }

    func destroyGuests() throws {
        for g in guests {
            let r = xenctl("destroy", g.name)
            guard r.ok else { throw SoakFailure("destroy \(g.name): \(r)") }
        }
    }

    /// Descriptors and guest mappings of each daemon, by service name.
    struct Resources: CustomStringConvertible {
        var descriptors: [String: Int] = [:]
        var guestMappings: [String: Int] = [:]
        var residentKiB: [String: Int] = [:]
        var description: String { "fds \(descriptors.sorted { $0.key < $1.key }) mappings \(guestMappings.sorted { $0.key < $1.key }) rss KiB \(residentKiB.sorted { $0.key < $1.key })" }
    }

    func daemonResources() -> Resources {
        var r = Resources()
        guard let hv = ServiceStatus.read(runDir: run)?.first(where: { $0.name == "xenhv" }) else { return r }
        for s in ServiceStatus.read(runDir: run) ?? [] where s.pid > 0 {
            r.descriptors[s.name] = ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(s.pid)/fd")) ?? []).count
            // Mappings of our guests' memory (objects named xen-<xenhv pid>-d<domid>-).
            let maps = (try? String(contentsOfFile: "/proc/\(s.pid)/maps", encoding: .utf8)) ?? ""
            let names = guests.map { "xen-\(hv.pid)-d\($0.domid)-" }
            r.guestMappings[s.name] = maps.split(separator: "\n").filter { l in names.contains { l.contains($0) } }.count
            let status = (try? String(contentsOfFile: "/proc/\(s.pid)/status", encoding: .utf8)) ?? ""
            r.residentKiB[s.name] = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") }
                .flatMap { Int($0.split(separator: " ").dropFirst().first ?? "") } ?? 0
        }
        return r
    }

    /// Waits (bounded) until every daemon is back to `idle`'s descriptors and
    /// holds no guest mapping; returns what is still off.
    func waitForIdle(_ idle: Resources, seconds: Double) -> [String] {
        var off: [String] = []
        _ = eventually(seconds: seconds, every: 1) {
            let now = self.daemonResources()
            off = []
            for (name, n) in idle.descriptors where now.descriptors[name] != n {
                off.append("\(name): \(now.descriptors[name] ?? -1) descriptors, \(n) when idle")
            }
            for (name, n) in now.guestMappings where n != 0 { off.append("\(name): \(n) mappings of destroyed guests") }
            return off.isEmpty
        }
        return off
    }

    func summary(idle: Resources) -> String {
        let now = daemonResources()
        return "system soak: \(guestCount) guests x 2 disks x 2 NICs, \(ProcessInfo.processInfo.environment["XEN_SYSTEM_SOAK_SECONDS"] ?? "20") s; "
            + "\(writes.load(ordering: .relaxed)) flushed block writes, \(pings.load(ordering: .relaxed)) pings, "
            + "\(cycles.load(ordering: .relaxed)) detach/attach cycles (disk + NIC, \(attachRetries.load(ordering: .relaxed)) attaches retried), "
            + "\(kills.load(ordering: .relaxed)) backend kills; "
            + "idle \(idle), after \(now)"
    }

    func tearDown() {
        _ = xenctl("down")
        for pid in processesMentioning(run) { kill(pid, SIGKILL) }
        for g in guests where !g.netns.isEmpty { _ = CommandResult.run("ip", ["netns", "del", g.netns]) }
        _ = CommandResult.run("ip", ["link", "del", veth])
        _ = CommandResult.run("ip", ["netns", "del", peer])
        _ = CommandResult.run(bin + "/xen-netlink", ["bridge-del", bridge])
        if ProcessInfo.processInfo.environment["XEN_SOAK_KEEP"] == nil { try? FileManager.default.removeItem(atPath: run) }
    }
}

struct SoakFailure: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// Processes whose command line mentions `text`.
func processesMentioning(_ text: String) -> [Int32] {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    return entries.compactMap { Int32($0) }.filter { pid in
        guard let d = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
        return String(decoding: d.map { $0 == 0 ? 32 : $0 }, as: UTF8.self).contains(text)
    }
}
