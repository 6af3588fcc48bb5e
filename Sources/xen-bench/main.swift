// Release-mode benchmarks of the hypervisor core. Each prints its baseline,
// measured in the same run, and the ratio. See scripts/bench-core.
import ArgumentParser
import CXen
import Foundation
import Glibc
import XenHV
import XenRing

@main
struct XenBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "xen-bench",
        abstract: "Benchmarks of the hypervisor core against same-run baselines.",
        subcommands: [All.self, Ring.self, Notify.self, Grant.self, Memory.self, Peer.self],
        defaultSubcommand: All.self)
}

struct Options: ParsableArguments {
    @Option(help: "Requests per ring measurement.") var requests = 5_000_000
    @Option(help: "Round trips per ping-pong / latency measurement.") var roundTrips = 100_000
    @Option(help: "Map+unmap iterations per grant measurement.") var iterations = 20_000
    @Option(help: "Guests for the memory measurement.") var guests = 64
    @Option(help: "Pages per guest for the memory measurement (65536 = 256 MiB).") var guestPages = 65536
}

struct All: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run every benchmark.")
    @OptionGroup var o: Options
    func run() throws {
        let env = try BenchEnvironment()
        try ringBenchmarks(env, o)
        try notifyBenchmark(env, o)
        try grantBenchmarks(env, o)
        try memoryBenchmark(env, o)
    }
}
struct Ring: ParsableCommand {
    @OptionGroup var o: Options
    func run() throws { try ringBenchmarks(try BenchEnvironment(), o) }
}
struct Notify: ParsableCommand {
    @OptionGroup var o: Options
    func run() throws { try notifyBenchmark(try BenchEnvironment(), o) }
}
struct Grant: ParsableCommand {
    @OptionGroup var o: Options
    func run() throws { try grantBenchmarks(try BenchEnvironment(), o) }
}
struct Memory: ParsableCommand {
    @OptionGroup var o: Options
    func run() throws { try memoryBenchmark(try BenchEnvironment(), o) }
}

// MARK: - Environment

func now() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}


func pct(_ sorted: [UInt64], _ p: Double) -> UInt64 { sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))] }

func fmt(_ v: Double) -> String {
    if v >= 1e6 { return String(format: "%.2fM", v / 1e6) }
    if v >= 1e3 { return String(format: "%.1fk", v / 1e3) }
    return String(format: "%.1f", v)
}

/// A private xenhv started for the run, stopped at exit.
final class BenchEnvironment {
    let dir: String
    let socket: String
    let pid: pid_t
    let hv: Hypervisor
    let stdoutFD: CInt

    init() throws {
        dir = NSTemporaryDirectory() + "xen-bench-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        socket = dir + "/xenhv.sock"
        var p: [CInt] = [-1, -1]
        guard pipe(&p) == 0 else { throw HypervisorError.system(call: "pipe", errno: errno) }
        _ = fcntl(p[0], F_SETFD, FD_CLOEXEC)
        pid = try ProcessLauncher.spawn(ProcessLauncher.executableDirectory + "/xenhv", arguments: ["--socket", socket, "--log-level", "error"],
                                        descriptors: [(p[1], 1)])
        close(p[1])
        stdoutFD = p[0]
        var line = [UInt8]()
        var c: UInt8 = 0
        while read(stdoutFD, &c, 1) == 1, c != 10 { line.append(c) }
        guard String(decoding: line, as: UTF8.self).hasPrefix("xenhv ready") else {
            throw HypervisorError.protocolViolation("xenhv did not start")
        }
        hv = try Hypervisor.connect(socketPath: socket)
    }

    deinit {
        kill(pid, SIGTERM)
        var st: Int32 = 0
        waitpid(pid, &st, 0)
        try? FileManager.default.removeItem(atPath: dir)
    }

    /// A guest domain whose process is another xen-bench in peer mode.
    func spawnPeer(_ mode: String, pages: UInt32, args: [String], name: String) throws -> (Hypervisor.CreatedDomain, pid_t, CInt, CInt) {
        let d = try hv.createDomain(pages: pages, name: name)
        var toChild: [CInt] = [-1, -1], fromChild: [CInt] = [-1, -1]
        guard pipe(&toChild) == 0, pipe(&fromChild) == 0 else { throw HypervisorError.system(call: "pipe", errno: errno) }
        for fd in toChild + fromChild { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        let pid = try ProcessLauncher.spawn(
            ProcessLauncher.executableDirectory + "/xen-bench", arguments: ["peer", mode] + args,
            environment: ["XENHV_GUEST_FD": "3"],
            descriptors: [(toChild[0], 0), (fromChild[1], 1), (d.guestDescriptor, 3)])
        close(toChild[0]); close(fromChild[1]); close(d.guestDescriptor)
        try hv.attachProcess(pid, to: d.domid)
        return (d, pid, toChild[1], fromChild[0])
    }
}


// MARK: - Ring round trips

let ringPages = 16  // order 4: 512 blkif slots

/// Frontend side, in the guest peer: pushes `n` requests and collects the
/// responses. Modes: "batch" (notification suppression), "always" (notify on
/// every push), "pingpong" (one request per round trip).
func frontend(mode: String, n: Int, ch: EventChannel, ring: SharedRing<BlkifRing>) throws -> UInt64 {
    var front = FrontRing(attaching: ring, at: 0)
    var req = blkif_request()
    req.operation = UInt8(BLKIF_OP_READ)
    var sent = 0, received = 0
    let t0 = now()
    if mode == "pingpong" {
        while received < n {
            req.id = UInt64(sent)
            front.enqueue(req); sent += 1
            front.pushRequests()
            try ch.notify()
            while try front.nextResponse() == nil { ch.wait() }
            received += 1
        }
        return now() - t0
    }
    let always = mode == "always"
    while received < n {
        while sent < n {
            req.id = UInt64(sent)
            guard front.enqueue(req) else { break }
            sent += 1
        }
        let notify = front.pushRequestsAndCheckNotify()
        if notify || always { try ch.notify() }
        var got = 0
        while try front.nextResponse() != nil { got += 1 }
        received += got
        if got == 0, received < n, sent == n || front.isFull {
            if try !front.finalCheckForResponses() { ch.wait() }
        }
    }
    return now() - t0
}

/// Backend side, in this process: answers `n` requests.
func backend(mode: String, n: Int, ch: EventChannel, ring: SharedRing<BlkifRing>) throws {
    var back = BackRing(attaching: ring)
    var done = 0
    var rsp = blkif_response()
    let always = mode == "always" || mode == "pingpong"
    while done < n {
        var got = 0
        while let r = try back.nextRequest() {
            rsp.id = r.id
            back.enqueue(rsp)
            got += 1
        }
        done += got
        if got > 0 {
            let notify = back.pushResponsesAndCheckNotify()
            if notify || always { try ch.notify() }
        }
        if done < n, try !back.finalCheckForRequests() { ch.wait() }
    }
}

func ringBenchmarks(_ env: BenchEnvironment, _ o: Options) throws {
    print("== Ring round trips between two processes (blkif ring, \(BlkifRing.entries(pages: ringPages)) slots, event-channel wake-ups)")
    let base = try eventfdPingPong(roundTrips: o.roundTrips)
    print("  baseline: bare eventfd ping-pong between two processes: \(fmt(base)) round trips/s")
    for (mode, n, label) in [("pingpong", o.roundTrips, "one request per round trip, notify every time"),
                             ("always", o.requests, "batched, notification suppression OFF"),
                             ("batch", o.requests, "batched, notification suppression ON")] {
        let (d, pid, toChild, fromChild) = try env.spawnPeer("ring", pages: 64, args: [mode, "\(n)"], name: "ring-\(mode)")
        let hello = ProcessLauncher.readLine(fromChild).split(separator: " ")  // "ready PORT REF0"
        let port = EventPort(hello[1])!, ref0 = GrantRef(hello[2])!
        let refs = (0..<GrantRef(ringPages)).map { ref0 + $0 }
        let mapping = try env.hv.mapGrantsContiguous(domid: d.domid, refs: refs, writable: true).get()
        let ch = try env.hv.bindInterdomain(remote: d.domid, remotePort: port)
        _ = ch.consume()
        let ring = try mapping.region.ring(BlkifRing.self, pages: ringPages)
        ProcessLauncher.writeLine(toChild, "go")
        guard ProcessLauncher.readLine(fromChild) == "initialised" else { throw HypervisorError.protocolViolation("peer failed") }
        try backend(mode: mode, n: n, ch: ch, ring: ring)
        let ns = Double(ProcessLauncher.readLine(fromChild).split(separator: " ")[1])!
        let rate = Double(n) / (ns / 1e9)
        if mode == "pingpong" {
            print("  ring ping-pong (\(label)): \(fmt(rate)) round trips/s   ratio to eventfd ping-pong: \(String(format: "%.2f", rate / base))")
        } else {
            print("  ring \(label): \(fmt(rate)) requests/s   (goal >= 5M/s)")
        }
        var st: Int32 = 0
        waitpid(pid, &st, 0)
        env.hv.unmapGrants(mapping)
        try ch.close()
        try env.hv.destroyDomain(d.domid)
        close(toChild); close(fromChild)
    }
}

/// Two processes bouncing one eventfd token each way.
func eventfdPingPong(roundTrips: Int) throws -> Double {
    let a = cxen_eventfd(0, 0), b = cxen_eventfd(0, 0)
    var out: [CInt] = [-1, -1]
    guard pipe(&out) == 0 else { throw HypervisorError.system(call: "pipe", errno: errno) }
    _ = fcntl(out[0], F_SETFD, FD_CLOEXEC)
    let pid = try ProcessLauncher.spawn(ProcessLauncher.executableDirectory + "/xen-bench", arguments: ["peer", "eventfd", "\(roundTrips)"],
                                        descriptors: [(a, 3), (b, 4), (out[1], 1)])
    close(out[1])
    var v: UInt64 = 0, one: UInt64 = 1
    let t0 = now()
    for _ in 0..<roundTrips {
        _ = write(a, &one, 8)
        _ = read(b, &v, 8)
    }
    let ns = now() - t0
    var st: Int32 = 0
    waitpid(pid, &st, 0)
    close(a); close(b); close(out[0])
    return Double(roundTrips) / (Double(ns) / 1e9)
}

// MARK: - Notify-to-wake latency

func notifyBenchmark(_ env: BenchEnvironment, _ o: Options) throws {
    print("== Event-channel notify-to-wake latency (one way, two processes)")
    // Baseline: a bare eventfd write + blocking read, timestamp in shared memory.
    let base = try latencyBaseline(o.roundTrips)
    let (d, pid, toChild, fromChild) = try env.spawnPeer("latency", pages: 16, args: ["\(o.roundTrips)"], name: "latency")
    let hello = ProcessLauncher.readLine(fromChild).split(separator: " ")  // "ready PORT REF"
    let m = try env.hv.mapGrant(domid: d.domid, ref: GrantRef(hello[2])!, writable: true).get()
    let ch = try env.hv.bindInterdomain(remote: d.domid, remotePort: EventPort(hello[1])!)
    _ = ch.consume()
    ProcessLauncher.writeLine(toChild, "go")
    var lat: [UInt64] = []
    lat.reserveCapacity(o.roundTrips)
    for _ in 0..<o.roundTrips {
        ch.wait()
        let t = now()
        lat.append(t - (try m.region.load(UInt64.self, at: 0)))
        try ch.notify()
    }
    lat.sort()
    var st: Int32 = 0
    waitpid(pid, &st, 0)
    env.hv.unmapGrant(m)
    try ch.close()
    try env.hv.destroyDomain(d.domid)
    close(toChild); close(fromChild)
    let p50 = pct(lat, 0.5), p99 = pct(lat, 0.99)
    print("  baseline: eventfd write + wake: p50 \(base.p50) ns, p99 \(base.p99) ns")
    print("  event channel notify + wake:    p50 \(p50) ns, p99 \(p99) ns")
    print(String(format: "  ratio p50: %.2f, p99: %.2f   (goal p50 <= 1.2)", Double(p50) / Double(base.p50), Double(p99) / Double(base.p99)))
}

func latencyBaseline(_ n: Int) throws -> (p50: UInt64, p99: UInt64) {
    let a = cxen_eventfd(0, 0), b = cxen_eventfd(0, 0)
    let shm = try SharedMemory(creating: "bench-latency", size: 4096)
    var out: [CInt] = [-1, -1]
    guard pipe(&out) == 0 else { throw HypervisorError.system(call: "pipe", errno: errno) }
    _ = fcntl(out[0], F_SETFD, FD_CLOEXEC)
    let pid = try ProcessLauncher.spawn(ProcessLauncher.executableDirectory + "/xen-bench", arguments: ["peer", "eventfd-latency", "\(n)"],
                                        descriptors: [(a, 3), (b, 4), (shm.fd.rawValue, 5), (out[1], 1)])
    close(out[1])
    var lat: [UInt64] = []
    lat.reserveCapacity(n)
    var v: UInt64 = 0, one: UInt64 = 1
    for _ in 0..<n {
        _ = read(a, &v, 8)
        let t = now()
        lat.append(t - shm.base!.load(as: UInt64.self))
        _ = write(b, &one, 8)
    }
    var st: Int32 = 0
    waitpid(pid, &st, 0)
    close(a); close(b); close(out[0])
    lat.sort()
    return (pct(lat, 0.5), pct(lat, 0.99))
}

// MARK: - Grant map/unmap and copy

func grantBenchmarks(_ env: BenchEnvironment, _ o: Options) throws {
    print("== Grant map + unmap and grant copy (guest and backend in one process, real xenhv)")
    let d = try env.hv.createDomain(pages: 256, name: "grant-bench")
    let guest = try Hypervisor.guest(descriptor: d.guestDescriptor)
    let gt = guest.grantTable!
    for r in 0..<32 { gt.grantAccess(GrantRef(r + 8), to: 0, frame: UInt32(r + 16), readOnly: false) }
    let refs = (0..<32).map { GrantRef($0 + 8) }
    for batch in [1, 32] {
        let iters = max(1, o.iterations / batch)
        let t0 = now()
        for _ in 0..<iters {
            let maps = env.hv.mapGrants(domid: d.domid, refs: Array(refs.prefix(batch)), writable: true)
            for case .success(let m) in maps { env.hv.unmapGrant(m) }
        }
        let per = Double(now() - t0) / Double(iters * batch)
        print(String(format: "  map + unmap, batch of %2d: %.0f ns per page", batch, per))
    }
    let buf = UnsafeMutableRawPointer.allocate(byteCount: 8192, alignment: 4096)
    defer { buf.deallocate() }
    var ops = [GrantCopy(source: .grant(domid: d.domid, ref: 8, offset: 0), dest: .local(buf), length: 4096)]
    env.hv.copyGrants(&ops)  // warm the lazy mapping
    let n = o.iterations * 5
    var t0 = now()
    for _ in 0..<n { env.hv.copyGrants(&ops) }
    let copyNs = Double(now() - t0) / Double(n)
    let src = try guest.memory!.region.slice(offset: 16 * 4096, length: 4096)
    t0 = now()
    for _ in 0..<n {
        try src.withUnsafeBytes(offset: 0, count: 4096) { (buf + 4096).copyMemory(from: $0.baseAddress!, byteCount: 4096) }
    }
    let memcpyNs = Double(now() - t0) / Double(n)
    print(String(format: "  baseline: memcpy of 4 KiB: %.0f ns", memcpyNs))
    print(String(format: "  grant copy of 4 KiB: %.0f ns   ratio: %.2f", copyNs, copyNs / memcpyNs))
    try env.hv.destroyDomain(d.domid)
}

// MARK: - Memory

func rss(_ pid: pid_t) -> Int {
    guard let s = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return 0 }
    for line in s.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        return Int(line.split(separator: " ")[1]) ?? 0
    }
    return 0
}

func memoryBenchmark(_ env: BenchEnvironment, _ o: Options) throws {
    print("== xenhv resident size")
    let idle = rss(env.pid)
    var made: [DomID] = []
    for i in 0..<o.guests {
        let d = try env.hv.createDomain(pages: UInt32(o.guestPages), name: "mem-\(i)")
        close(d.guestDescriptor)
        made.append(d.domid)
    }
    let loaded = rss(env.pid)
    print("  idle: \(idle / 1024) MiB; with \(o.guests) guests of \(o.guestPages * 4 / 1024) MiB: \(loaded / 1024) MiB (\(loaded) KiB)   (goal < 64 MiB)")
    for d in made { try env.hv.destroyDomain(d) }
}

// MARK: - Peer processes

struct Peer: ParsableCommand {
    static let configuration = CommandConfiguration(shouldDisplay: false)
    @Argument var mode: String
    @Argument var rest: [String] = []

    func run() throws {
        switch mode {
        case "eventfd":
            let n = Int(rest[0])!
            var v: UInt64 = 0, one: UInt64 = 1
            for _ in 0..<n { _ = read(3, &v, 8); _ = write(4, &one, 8) }
        case "eventfd-latency":
            let n = Int(rest[0])!
            let shm = try SharedMemory(adopting: 5, size: 4096, writable: true)
            var v: UInt64 = 0, one: UInt64 = 1
            for _ in 0..<n {
                shm.base!.storeBytes(of: now(), as: UInt64.self)
                _ = write(3, &one, 8)
                _ = read(4, &v, 8)
            }
        case "ring":
            let hv = try Hypervisor.guestFromEnvironment()
            let mode = rest[0], n = Int(rest[1])!
            let firstFrame = 8
            for i in 0..<ringPages {
                hv.grantTable!.grantAccess(GrantRef(100 + i), to: 0, frame: UInt32(firstFrame + i), readOnly: false)
            }
            let port = try hv.allocUnbound(remote: 0)
            let ch = try hv.channel(port)
            let ring = try hv.memory!.region.ring(BlkifRing.self, pages: ringPages, offset: firstFrame * 4096)
            ring.initialize()
            ProcessLauncher.writeLine(1, "ready \(port) 100")
            _ = ProcessLauncher.readLine(0)
            _ = ch.consume()
            ProcessLauncher.writeLine(1, "initialised")
            let ns = try frontend(mode: mode, n: n, ch: ch, ring: ring)
            ProcessLauncher.writeLine(1, "done \(ns)")
        case "latency":
            let hv = try Hypervisor.guestFromEnvironment()
            let n = Int(rest[0])!
            hv.grantTable!.grantAccess(9, to: 0, frame: 5, readOnly: false)
            let port = try hv.allocUnbound(remote: 0)
            let ch = try hv.channel(port)
            let page = try hv.memory!.region.slice(offset: 5 * 4096, length: 4096)
            ProcessLauncher.writeLine(1, "ready \(port) 9")
            _ = ProcessLauncher.readLine(0)
            _ = ch.consume()
            for _ in 0..<n {
                try page.store(now(), at: 0)
                try ch.notify()
                ch.wait()
            }
        default:
            throw ValidationError("unknown peer mode \(mode)")
        }
    }
}
