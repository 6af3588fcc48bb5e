// Release-mode blkback benchmarks (scripts/bench-blkback): null mode to isolate
// ring and grant cost (in-process frontend), then 4 KiB random read/write and
// 1 MiB sequential read issued by a pvguest guest (pvguest-load) against the
// blkback daemon, each against fio (libaio, O_DIRECT) on the same image file,
// and blkback's resident size (GuestMode.swift).
import ArgumentParser
import BlkBack
import BlkFrontKit
import Foundation
import Glibc
import Logging
import XenHV
import XenRing
import XenTestKit

@main
struct BlkBackBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "blkback-bench",
        abstract: "blkback through its rings: null mode, and file I/O against fio on the same image.")

    @Option(help: "Seconds per measurement.") var seconds = 3.0
    @Option(help: "Image file for the file benchmarks (created and filled if missing or of another size).")
    var image = "/var/tmp/blkback-bench.img"
    @Option(help: "Image size in MiB.") var imageMiB = 1024
    @Option(help: "Requests in flight per queue in null mode.") var nullDepth = 128
    @Flag(help: "Only the null-mode benchmarks.") var nullOnly = false
    @Flag(help: "Only the file benchmarks.") var fileOnly = false
    @Flag(help: "Keep the image file afterwards.") var keepImage = false
    @Option(help: "Only the file loads whose name contains this (e.g. 'randread QD32').") var only: String?
    @Option(help: "Busy polling of the in-process blkback before it sleeps, in microseconds (0: sleep at once, as Linux blkback); --in-process loads only: the daemon that serves pvguest-load never spins.")
    var busyPoll = 0
    @Option(help: "Busy polling of the in-process frontend before it sleeps, in microseconds (null mode and --in-process loads; not pvguest-load).")
    var frontBusyPoll = 0
    @Option(help: "Persistent grants the in-process blkback keeps per ring (Linux's default: 1056); --in-process loads only: the daemon keeps Linux's default.")
    var persistentLimit = BlkifLimits.persistentGrantsPerRing

    @Option(help: "Ring page order pvguest-load's blkfront asks for (Linux blkfront's default: 0).")
    var guestRingOrder = 0
    @Option(help: "Segments per ring request of pvguest-load's blkfront (Linux's xen_blkif_max_segments; 256: a 1 MiB I/O is one request).")
    var indirectSegments = 256

    @Flag(help: "Also the file loads with the in-process test frontend (BlkFrontKit) instead of a pvguest guest.")
    var inProcess = false
    @Flag(help: "Skip the memory figures.") var skipMemory = false
    @Option(help: "Each rings/fio comparison this many times (the ratio's range is printed).") var rounds = 1
    @Option(help: "Seconds of the sustained run whose blkback resident size is sampled at start and end.")
    var long = 10.0
    @Option(help: "Guests (one disk each) connected for the per-disk memory figure.") var memoryDisks = 4
    @Option(help: "Rounds of attaching and detaching those guests.") var memoryRounds = 3

    func validate() throws {
        guard seconds > 0, long >= 3, rounds >= 1, memoryDisks >= 1, memoryRounds >= 1 else {
            throw ValidationError("--seconds > 0, --long >= 3, --rounds >= 1, --memory-disks >= 1")
        }
        guard persistentLimit == BlkifLimits.persistentGrantsPerRing || inProcess else {
            throw ValidationError("--persistent-limit applies to the in-process blkback only: add --in-process")
        }
        guard busyPoll == 0 || inProcess else {
            throw ValidationError("--busy-poll applies to the in-process blkback only: add --in-process")
        }
        guard frontBusyPoll == 0 || inProcess || !fileOnly else {
            throw ValidationError("--front-busy-poll applies to the in-process frontend only: add --in-process, or run null mode")
        }
    }

    func run() throws {
        try InterruptCleanup.run(measure)
    }

    func measure() throws {
        // The in-process xenstored of the private dom0 logs every domain at info.
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = .warning
            return h
        }
        var log = Logger(label: "blkback-bench")
        log.logLevel = .warning
        let env = try BenchEnvironment()
        frontSpinNs = UInt64(frontBusyPoll) * 1000
        if !fileOnly {
            print("== null mode: 4 KiB reads, grants mapped (persistent), no disk; depth \(nullDepth) per queue")
            for queues in [1, 2] {
                let r = try runNull(env, queues: queues, depth: nullDepth, seconds: seconds, logger: log)
                print(String(format: "null %d queue(s): %@ IOPS  p50 %@  p99 %@  CPU %.0f%%  (goal >= 1M IOPS on one queue)",
                             queues, fmt(r.iops), us(r.p50), us(r.p99), r.cpu))
            }
        }
        if nullOnly { return }
        let path = image
        let imageMade = keepImage ? nil : InterruptCleanup.register { unlink(path) }
        try prepareImage(image, mib: imageMiB)
        defer {
            if let imageMade, InterruptCleanup.unregister(imageMade) { unlink(image) }
        }
        let loads: [(String, Bool, Int, Int, Bool, String)] = [
            ("4k randread QD1 (per-I/O overhead)", false, 4096, 1, true, "randread"),
            ("4k randread QD32", false, 4096, 32, true, "randread"),
            ("4k randwrite QD32", true, 4096, 32, true, "randwrite"),
            ("1M seqread QD8", false, 1 << 20, 8, false, "read"),
        ].filter { l in only.map { l.0.contains($0) } ?? true }
        let rig = try GuestRig()
        rig.ringPageOrder = guestRingOrder
        rig.indirectSegments = indirectSegments
        print("== file: \(image) (\(imageMiB) MiB), O_DIRECT; load generator: pvguest-load, a guest process running")
        print("   pvguest's blkfront (1 queue, ring order \(guestRingOrder), \(indirectSegments) segments per request) against the blkback daemon;")
        print("   baseline: fio --ioengine=libaio --direct=1 --numjobs=1 on the same file, same bs and depth, same run")
        print("   blkback pid \(rig.blkback)")
        fflush(nil)
        var ratios: [String: [Double]] = [:]
        let disk = DiskStat(image: image)
        for round in 1...rounds {
            if rounds > 1 { print("-- round \(round) of \(rounds)") }
            for (name, write, bs, qd, random, fioRW) in loads {
                let spec = "\(write ? "write" : "read"):\(bs >= 1 << 20 ? "\(bs >> 20)m" : "\(bs >> 10)k"):\(random ? "rand" : "seq"):\(qd):\(seconds)"
                // Alternate which side runs first, so a drifting background load favours neither.
                var fio = Measured(iops: 0, mbps: 0, p50: 0, p99: 0)
                var fioDisk = 0.0
                func measureFio() throws {
                    (fio, fioDisk) = try DiskStat.meanLatency(disk) { try runFio(image: image, rw: fioRW, bs: bs, depth: qd, seconds: seconds) }
                }
                if round % 2 == 0 { try measureFio() }
                let (ours, oursDisk) = try DiskStat.meanLatency(disk) { try rig.load([spec], image: image)[0] }
                if round % 2 == 1 { try measureFio() }
                print("\(name):")
                print("  rings: \(line(ours))  [pvguest-load \(spec); CPU: guest + blkback]")
                print("         \(rig.lastPath)")
                print("  fio:   \(line(fio))")
                if let disk, oursDisk > 0, fioDisk > 0 {
                    // Little's law: requests in the block layer = IOPS x time each spent there.
                    print(String(format: "  disk %@ (block layer, allocation to completion): rings %@ per request, %.1f in flight; fio %@, %.1f in flight",
                                 disk.name, us(oursDisk), ours.iops * oursDisk / 1e9, us(fioDisk), fio.iops * fioDisk / 1e9))
                }
                print(String(format: "  ratio rings/fio: IOPS %.2f  MB/s %.2f  p50 %.2fx  p99 %.2fx",
                             ours.iops / fio.iops, ours.mbps / fio.mbps, ours.p50 / fio.p50, ours.p99 / fio.p99))
                ratios[name, default: []].append(ours.iops / fio.iops)
            }
        }
        if rounds > 1 {
            print("== ratio ranges over \(rounds) rounds (rings/fio IOPS; odd rounds run the rings first, even rounds fio)")
            for (name, _, _, _, _, _) in loads {
                let r = (ratios[name] ?? []).sorted()
                guard !r.isEmpty else { continue }
                let median = r.count % 2 == 1 ? r[r.count / 2] : (r[r.count / 2 - 1] + r[r.count / 2]) / 2
                print(String(format: "  %@: %.2f - %.2f, median %.2f", name, r.first!, r.last!, median))
            }
        }
        if inProcess {
            print("== file, in-process frontend (BlkFrontKit) against an in-process VirtualBlockDevice")
            for (name, write, bs, qd, random, fioRW) in loads {
                let ours = try runFile(env, image: image, write: write, bs: bs, depth: qd, random: random,
                                       seconds: seconds, persistentLimit: persistentLimit, busyPoll: busyPoll, logger: log)
                let fio = try runFio(image: image, rw: fioRW, bs: bs, depth: qd, seconds: seconds)
                print("\(name):")
                print("  rings: \(line(ours))  [persistent grants per ring: \(persistentLimit)]")
                print("  fio:   \(line(fio))")
                print(String(format: "  ratio rings/fio: IOPS %.2f  MB/s %.2f  p50 %.2fx  p99 %.2fx",
                             ours.iops / fio.iops, ours.mbps / fio.mbps, ours.p50 / fio.p50, ours.p99 / fio.p99))
            }
        }
        if !skipMemory { try memory(rig) }
    }

    /// blkback's resident size: idle, per connected disk, and over a sustained run.
    func memory(_ rig: GuestRig) throws {
        print("== memory: the blkback daemon's resident size (/proc/PID/status; own = RssAnon + RssFile,")
        print("   guest pages = RssShmem, the grant mappings of rings and I/O buffers)")
        print("started, no disk yet:    \(rig.initialResident.text)")
        // The last load's guest is detached once blkback is back to its first descriptor count.
        _ = rig.awaitDescriptors(rig.initialDescriptors, seconds: 10)
        let idle = rig.resident
        let idleDescriptors = rig.descriptors
        print("idle after the loads:    \(idle.text)")
        var guests: [GuestRig.Guest] = []
        defer { for g in guests { rig.stop(g) } }
        // Two rounds of attach and detach: the second shows whether detaching gave back what attaching took.
        for cycle in 1...memoryRounds {
            for i in 0..<memoryDisks {
                let img = rig.dom0.dir + "/mem\(i).img"
                let fd = open(img, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
                ftruncate(fd, 64 << 20)
                close(fd)
                let dir = rig.dom0.dir + "/nbd\(i)"
                guests.append(try rig.start("pvguest", image: img, arguments: ["--nbd-dir", dir], readyPrefix: "pvguest ready"))
            }
            guard rig.awaitDevices(memoryDisks) else { throw BlkBackError.badConfiguration("blkback did not connect every disk") }
            let connected = rig.resident
            print("round \(cycle), \(memoryDisks) disks connected: \(connected.text)")
            if cycle == 1 {
                print(String(format: "per connected disk (pvguest: 2 queues, ring order 1): own %.0f KiB, guest pages %.0f KiB  (goal <= 2048 KiB own)",
                             Double(connected.own - idle.own) / Double(memoryDisks),
                             Double(connected.shmem - idle.shmem) / Double(memoryDisks)))
            }
            for g in guests { rig.stop(g) }
            guests.removeAll()
            // Detached when blkback is back to its idle descriptors; a destroyed domain's three
            // shared-object descriptors may stay until XenHV's next lookup miss evicts them.
            _ = rig.awaitDescriptors(idleDescriptors, seconds: 5)
            print("round \(cycle), after detaching them: \(rig.resident.text); descriptors \(rig.descriptors) (idle \(idleDescriptors))")
        }
        // A sustained load; blkback's size sampled one second in and one second before the end.
        var first = Resident(pid: 0), last = Resident(pid: 0)
        let spec = "read:4k:rand:32:\(long)"
        let r = try rig.load([spec], image: image) { _ in
            usleep(1_000_000)
            first = rig.resident
            usleep(UInt32((long - 2) * 1e6))
            last = rig.resident
        }[0]
        print("sustained \(spec) (\(fmt(r.iops)) IOPS): at 1 s \(first.text)")
        print("   at \(Int(long) - 1) s: \(last.text)")
        print(String(format: "   change: own %+.0f KiB, guest pages %+.0f KiB over %.0f s",
                     Double(last.own - first.own), Double(last.shmem - first.shmem), long - 2))
        print("after the run:           \(rig.resident.text)")
    }
}

struct Measured {
    var iops: Double
    var mbps: Double
    /// Latencies in nanoseconds.
    var p50: Double
    var p99: Double
    /// CPU time used per wall-clock second, in percent (all threads: frontend and backend).
    var cpu: Double = 0
}

func cpuSeconds() -> Double {
    var u = rusage()
    getrusage(RUSAGE_SELF.rawValue, &u)
    return Double(u.ru_utime.tv_sec) + Double(u.ru_utime.tv_usec) / 1e6 + Double(u.ru_stime.tv_sec) + Double(u.ru_stime.tv_usec) / 1e6
}

func line(_ m: Measured) -> String {
    String(format: "%@ IOPS  %.1f MB/s  p50 %@  p99 %@  CPU %.0f%%", fmt(m.iops), m.mbps, us(m.p50), us(m.p99), m.cpu)
}

func fmt(_ v: Double) -> String {
    if v >= 1e6 { return String(format: "%.2fM", v / 1e6) }
    if v >= 1e3 { return String(format: "%.1fk", v / 1e3) }
    return String(format: "%.1f", v)
}
func us(_ ns: Double) -> String { String(format: "%.1f us", ns / 1000) }

@inline(__always) func now() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

func selfDirectory() -> String {
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buf, buf.count - 1)
    return (String(cString: Array(buf[0..<max(0, n)]) + [0]) as NSString).deletingLastPathComponent
}

/// A private xenhv for the run, stopped at exit.
final class BenchEnvironment {
    let dir: String
    let pid: pid_t
    let dom0: Hypervisor
    private let out: CInt
    private var interrupted: InterruptCleanup.Token?

    init() throws {
        dir = NSTemporaryDirectory() + "blkback-bench-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let socket = dir + "/xenhv.sock"
        var p: [CInt] = [-1, -1]
        guard pipe(&p) == 0 else { throw HypervisorError.system(call: "pipe", errno: errno) }
        _ = fcntl(p[0], F_SETFD, FD_CLOEXEC)
        pid = try ProcessLauncher.spawn(selfDirectory() + "/xenhv", arguments: ["--socket", socket, "--log-level", "error"],
                                        descriptors: [(p[1], 1)])
        close(p[1])
        out = p[0]
        var line = [UInt8]()
        var c: UInt8 = 0
        while read(out, &c, 1) == 1, c != 10 { line.append(c) }
        guard String(decoding: line, as: UTF8.self).hasPrefix("xenhv ready") else {
            throw HypervisorError.protocolViolation("xenhv did not start")
        }
        dom0 = try Hypervisor.connect(socketPath: socket)
        let (xenhv, dir) = (pid, dir)
        interrupted = InterruptCleanup.register {
            InterruptCleanup.stop(xenhv)
            try? FileManager.default.removeItem(atPath: dir)
        }
    }

    /// A guest domain held in this process (the frontends run here, on their own threads).
    private var guests = 0
    func guest(pages: UInt32) throws -> Hypervisor {
        guests += 1
        let d = try dom0.createDomain(pages: pages, name: "bench\(guests)")
        return try Hypervisor.guest(descriptor: d.guestDescriptor)
    }

    deinit {
        close(out)
        guard interrupted.map({ InterruptCleanup.unregister($0) }) ?? true else { return }
        kill(pid, SIGTERM)
        var st: Int32 = 0
        waitpid(pid, &st, 0)
        try? FileManager.default.removeItem(atPath: dir)
    }
}

/// Latency samples, preallocated so recording never allocates.
final class Samples: @unchecked Sendable {
    let capacity: Int
    let buf: UnsafeMutablePointer<UInt32>
    var count = 0
    init(capacity: Int) {
        self.capacity = capacity
        buf = .allocate(capacity: capacity)
    }
    deinit { buf.deallocate() }
    @inline(__always) func add(_ ns: UInt64) {
        guard count < capacity else { return }
        buf[count] = UInt32(truncatingIfNeeded: min(ns, UInt64(UInt32.max)))
        count += 1
    }
    func percentiles() -> (Double, Double) {
        guard count > 0 else { return (0, 0) }
        var b = UnsafeMutableBufferPointer(start: buf, count: count)
        b.sort()
        return (Double(b[count / 2]), Double(b[min(count - 1, count * 99 / 100)]))
    }
}

nonisolated(unsafe) var frontSpinNs: UInt64 = 0

/// One queue's closed loop: `depth` requests always in flight; each response
/// is timed and its slot resubmitted at once, all of a wake-up's resubmissions
/// published together.
func drive(_ front: BlkFront<BlkifRing>, queue: Int, op: UInt8, bs: Int, depth: Int, random: Bool,
           sectors: UInt64, seconds: Double, samples: Samples) throws -> (ops: UInt64, ns: UInt64) {
    var reqs: [BlkRequest] = []
    for i in 0..<depth {
        let b = try front.makeBuffer(pages: max(1, bs / 4096))
        var q = try front.rwRequest(op, sector: 0, buffer: b, bytes: bs)
        q.id = UInt64(i)
        reqs.append(q)
    }
    let stride = UInt64(bs / 512)
    let slots = sectors / stride
    var rng: UInt64 = 0x9E37_79B9_7F4A_7C15 &+ UInt64(queue)
    var seq: UInt64 = 0
    func nextSector() -> UInt64 {
        if random {
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17
            return (rng % slots) * stride
        }
        defer { seq = (seq + 1) % slots }
        return seq * stride
    }
    let start = UnsafeMutablePointer<UInt64>.allocate(capacity: depth)
    defer { start.deallocate() }
    let t0 = now()
    let deadline = t0 + UInt64(seconds * 1e9)
    for i in 0..<depth {
        reqs[i].sector = nextSector()
        start[i] = now()
        _ = front.enqueue(reqs[i], queue: queue)
    }
    try front.publish(queue: queue)
    var ops: UInt64 = 0
    var outstanding = depth
    var stopping = false
    while outstanding > 0 {
        var got = false
        while let r = try front.pollResponse(queue: queue) {
            got = true
            let i = Int(r.id)
            let t = now()
            samples.add(t - start[i])
            guard r.status == 0 else { throw BlkBackError.badConfiguration("request failed with \(r.status)") }
            ops += 1
            if stopping || t >= deadline {
                stopping = true
                outstanding -= 1
                continue
            }
            reqs[i].sector = nextSector()
            start[i] = t
            _ = front.enqueue(reqs[i], queue: queue)
        }
        if got {
            try front.publish(queue: queue)
            continue
        }
        if frontSpinNs > 0 {
            let until = now() + frontSpinNs
            var found = false
            while now() < until { if try front.hasResponses(queue: queue) { found = true; break } }
            if found { continue }
        }
        if try front.finalCheck(queue: queue) { continue }
        _ = front.waitEvent(queue: queue, ms: 2000)
    }
    return (ops, now() - t0)
}

/// Runs `queues` frontends (one thread each) against one device.
func runQueues(_ env: BenchEnvironment, device: VirtualBlockDevice, queues: Int, order: Int, op: UInt8, bs: Int,
               depth: Int, random: Bool, seconds: Double,
               persistentLimit: Int = BlkifLimits.persistentGrantsPerRing) throws -> Measured {
    let pagesPerSlot = max(1, bs / 4096) + 1
    let framesPerQueue = depth * pagesPerSlot + (1 << order) + 16
    let guest = try env.guest(pages: UInt32(queues * framesPerQueue + 4096))
    // One frontend object per queue, each with its own frames and grant refs, so
    // each queue's thread owns its ring state outright.
    var fronts: [BlkFront<BlkifRing>] = []
    for q in 0..<queues {
        fronts.append(try BlkFront<BlkifRing>(
            guest: guest, queues: 1, ringPageOrder: order, grantFrames: 64,
            firstFrame: UInt32(16 + q * framesPerQueue), firstRef: GrantRef(8 + q * framesPerQueue)))
    }
    var config = fronts[0].config(limit: persistentLimit)
    config.queues = fronts.flatMap { $0.config().queues }
    try device.connect(hypervisor: env.dom0, frontend: config)
    defer { device.disconnect() }
    let samples = (0..<queues).map { _ in Samples(capacity: 1 << 23) }
    let results = UnsafeMutablePointer<(ops: UInt64, ns: UInt64)>.allocate(capacity: queues)
    defer { results.deallocate() }
    let errors = UnsafeMutablePointer<Int>.allocate(capacity: queues)
    errors.initialize(repeating: 0, count: queues)
    defer { errors.deallocate() }
    let group = DispatchGroup()
    nonisolated(unsafe) let r = results, e = errors
    let sectors = device.sectors
    let cpu0 = cpuSeconds()
    for q in 0..<queues {
        let s = samples[q]
        let front = fronts[q]
        let t = Thread {
            do { r[q] = try drive(front, queue: 0, op: op, bs: bs, depth: depth, random: random,
                                  sectors: sectors, seconds: seconds, samples: s) } catch {
                print("queue \(q): \(error)")
                e[q] = 1
            }
            group.leave()
        }
        group.enter()
        t.start()
        if queues == 1 { group.wait() }
    }
    group.wait()
    let cpu = cpuSeconds() - cpu0
    guard (0..<queues).allSatisfy({ errors[$0] == 0 }) else { throw BlkBackError.badConfiguration("a queue failed") }
    var ops: UInt64 = 0
    var ns: UInt64 = 0
    for q in 0..<queues { ops += results[q].ops; ns = max(ns, results[q].ns) }
    let all = Samples(capacity: samples.reduce(0) { $0 + $1.count })
    for s in samples { for i in 0..<s.count { all.add(UInt64(s.buf[i])) } }
    let (p50, p99) = all.percentiles()
    let secs = Double(ns) / 1e9
    return Measured(iops: Double(ops) / secs, mbps: Double(ops) * Double(bs) / secs / 1e6, p50: p50, p99: p99,
                    cpu: cpu / secs * 100)
}

func runNull(_ env: BenchEnvironment, queues: Int, depth: Int, seconds: Double, logger: Logger) throws -> Measured {
    let dev = try VirtualBlockDevice(name: "null", backing: BackingOptions(nullSectors: 1 << 31), maxQueues: 4, logger: logger)
    defer { dev.close() }
    let order = depth <= 32 ? 0 : depth <= 64 ? 1 : depth <= 128 ? 2 : depth <= 256 ? 3 : 4
    return try runQueues(env, device: dev, queues: queues, order: order, op: BlkifOp.read, bs: 4096,
                         depth: depth, random: true, seconds: seconds)
}

func runFile(_ env: BenchEnvironment, image: String, write: Bool, bs: Int, depth: Int, random: Bool,
             seconds: Double, persistentLimit: Int, busyPoll: Int, logger: Logger) throws -> Measured {
    let dev = try VirtualBlockDevice(name: "file", backing: BackingOptions(path: image), maxQueues: 1,
                                     busyPollMicroseconds: busyPoll, logger: logger)
    defer { dev.close() }
    guard dev.usesDirectIO else { throw BlkBackError.badConfiguration("\(image): no O_DIRECT here") }
    return try runQueues(env, device: dev, queues: 1, order: depth <= 32 ? 0 : 1, op: write ? BlkifOp.write : BlkifOp.read,
                         bs: bs, depth: depth, random: random, seconds: seconds, persistentLimit: persistentLimit)
}

/// Creates the image filled with data (so reads hit real blocks), unless it is there at the right size.
func prepareImage(_ path: String, mib: Int) throws {
    var st = stat()
    if stat(path, &st) == 0, Int(st.st_size) == mib << 20, Int(st.st_blocks) * 512 >= mib << 20 { return }
    let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    guard fd >= 0 else { throw BlkBackError.system(call: "open \(path)", errno: errno) }
    defer { close(fd) }
    var chunk = [UInt8](repeating: 0, count: 1 << 20)
    for m in 0..<mib {
        for i in stride(from: 0, to: chunk.count, by: 512) { chunk[i] = UInt8(truncatingIfNeeded: m &+ i >> 9) | 1 }
        guard chunk.withUnsafeBytes({ pwrite(fd, $0.baseAddress, $0.count, off_t(m) << 20) }) == chunk.count else {
            throw BlkBackError.system(call: "pwrite", errno: errno)
        }
    }
    fsync(fd)
}

/// fio with libaio and O_DIRECT on the same file, same block size and depth.
func runFio(image: String, rw: String, bs: Int, depth: Int, seconds: Double) throws -> Measured {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/fio")
    p.arguments = [
        "--name=bench", "--filename=\(image)", "--ioengine=libaio", "--direct=1", "--rw=\(rw)", "--bs=\(bs)",
        "--iodepth=\(depth)", "--runtime=\(Int(seconds.rounded(.up)))", "--time_based", "--numjobs=1",
        "--lat_percentiles=1", "--randrepeat=0", "--output-format=json",
    ]
    let pipe = Pipe()
    p.standardOutput = pipe
    try p.run()
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    guard let json = try JSONSerialization.jsonObject(with: data) as? [String: Any],
          let job = (json["jobs"] as? [[String: Any]])?.first,
          let side = job[rw.contains("write") ? "write" : "read"] as? [String: Any],
          let iops = side["iops"] as? Double, let bw = side["bw_bytes"] as? Double
    else { throw BlkBackError.badConfiguration("cannot read fio's output") }
    let lat = (side["lat_ns"] as? [String: Any])?["percentile"] as? [String: Any]
    func pick(_ k: String) -> Double { (lat?[k] as? Double) ?? Double((lat?[k] as? Int) ?? 0) }
    let cpu = ((job["usr_cpu"] as? Double) ?? 0) + ((job["sys_cpu"] as? Double) ?? 0)
    return Measured(iops: iops, mbps: bw / 1e6, p50: pick("50.000000"), p99: pick("99.000000"), cpu: cpu)
}

/// The block layer's own counters for the disk under the image
/// (/sys/dev/block/MAJ:MIN/stat): requests completed and the time they spent
/// from allocation to completion. They tell a slower disk from a disk left
/// idle: a load whose requests each take longer there is served more slowly
/// by the device itself, whatever our path does between them.
struct DiskStat {
    let path: String
    let name: String

    init?(image: String) {
        var st = stat()
        guard stat(image, &st) == 0 else { return nil }
        let dev = UInt64(st.st_dev)
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & ~UInt64(0xfff))
        let minor = (dev & 0xff) | ((dev >> 12) & ~UInt64(0xff))
        path = "/sys/dev/block/\(major):\(minor)/stat"
        guard access(path, R_OK) == 0 else { return nil }
        let link = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/sys/dev/block/\(major):\(minor)")) ?? "\(major):\(minor)"
        name = String(link.split(separator: "/").last ?? "")
    }

    /// (requests completed, milliseconds they spent) for reads and writes together.
    func sample() -> (requests: UInt64, milliseconds: UInt64) {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return (0, 0) }
        let f = text.split(separator: " ", omittingEmptySubsequences: true).compactMap { UInt64($0) }
        guard f.count >= 8 else { return (0, 0) }
        return (f[0] + f[4], f[3] + f[7])
    }

    /// Runs `body` and returns the mean time the disk's requests spent in the
    /// block layer meanwhile, in nanoseconds (0 when none completed, or no disk).
    static func meanLatency<T>(_ disk: DiskStat?, _ body: () throws -> T) rethrows -> (T, Double) {
        guard let disk else { return (try body(), 0) }
        let a = disk.sample()
        let r = try body()
        let b = disk.sample()
        let n = b.requests &- a.requests
        return (r, n == 0 ? 0 : Double(b.milliseconds &- a.milliseconds) * 1e6 / Double(n))
    }
}
