import BlkBack
import BlkFrontKit
import Foundation
import Glibc
import Synchronization
import XenBus
import XenHV
import XenRing
import XenStore

// Hostile-frontend test kit (issue 6): a blkfront attached through the real
// XenBus handshake to an in-process blkback, a well-behaved disk worker that
// proves a second guest keeps working, and the measuring helpers the hostile
// cases share (per-thread CPU, descriptor counts).

/// This process's threads, each with its name (`comm`, as `setName` left it)
/// and the CPU time it has used so far, in seconds. The time is the thread's
/// own CPU clock, exact to the scheduler's nanosecond, where /proc's
/// utime+stime move in 10 ms ticks: too coarse for a share of a core over a
/// fraction of a second.
public func threadCPUTimes() -> [Int32: (name: String, seconds: Double)] {
    var out: [Int32: (name: String, seconds: Double)] = [:]
    for t in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? [] {
        guard let tid = Int32(t) else { continue }
        // MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED) of the kernel's posix-timers.h.
        var ts = timespec()
        guard clock_gettime(clockid_t((~tid) << 3 | 6), &ts) == 0 else { continue }  // it has exited
        let name = (try? String(contentsOfFile: "/proc/self/task/\(t)/comm", encoding: .utf8))?
            .trimmingCharacters(in: .newlines) ?? ""
        out[tid] = (name, Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9)
    }
    return out
}

/// The CPU seconds `threads` used between two ``threadCPUTimes()`` samples
/// (a thread that exited in between counts up to its last sample).
public func cpuSeconds(of threads: Set<Int32>, from before: [Int32: (name: String, seconds: Double)],
                       to after: [Int32: (name: String, seconds: Double)]) -> Double {
    threads.reduce(0) { sum, t in
        guard let b = before[t]?.seconds else { return sum }
        return sum + max(0, (after[t]?.seconds ?? b) - b)
    }
}

/// Where thread `tid` of this process waits, for a failure message: its
/// name, kernel wait channel and system call (number and arguments).
public func threadState(_ tid: Int32) -> String {
    ["comm", "wchan", "syscall"].map {
        (try? String(contentsOfFile: "/proc/self/task/\(tid)/\($0)", encoding: .utf8))?
            .trimmingCharacters(in: .whitespacesAndNewlines) ?? "?"
    }.joined(separator: " ")
}

/// Clock ticks per second (/proc's utime and stime of other processes).
public let clockTicksPerSecond = Double(sysconf(Int32(_SC_CLK_TCK)))

/// The calling thread's CPU time in seconds.
public func threadCPUSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// Runs `body` on a new thread; `join()` waits for it.
public final class TestThread: @unchecked Sendable {
    private let done = DispatchSemaphore(value: 0)
    public init(_ body: @escaping @Sendable () -> Void) {
        let sem = done
        Foundation.Thread { body(); sem.signal() }.start()
    }
    public func join() { done.wait() }
}

/// A blkfront of `guest` attached to the in-process blkback through XenBus:
/// the toolstack's keys, InitWait, the frontend's ring keys, Initialised,
/// Connected. ``frontendKeys`` is what a well-behaved frontend writes; tests
/// that lie write their own.
public final class XenBusDisk: @unchecked Sendable {
    public let dev: XenBusDevice
    public let image: String
    public let front: BlkFront<BlkifRing>
    public let guest: Dom0Harness.Guest
    public let sectors: UInt64

    /// The toolstack's part: an image of `bytes` and the device's directories; waits for InitWait.
    /// An image that already exists is kept as it is (re-attaching a disk).
    public static func create(_ s: Dom0Harness, guest g: Dom0Harness.Guest, devid: Int = 51712,
                              bytes: Int = 4 << 20) throws -> (XenBusDevice, String) {
        let image = s.dir + "/disk-\(g.domid)-\(devid).img"
        if !FileManager.default.fileExists(atPath: image) {
            guard FileManager.default.createFile(atPath: image, contents: nil), truncate(image, off_t(bytes)) == 0 else {
                throw BlkBackError.badConfiguration("cannot create \(image)")
            }
        }
        let dev = XenBusDevice(type: "vbd", frontendDomid: XenStore.DomID(g.domid), devid: devid)
        try s.xenstore.createDevice(dev, backend: ["params": image, "mode": "w", "type": "file",
                                                   "device-type": "disk", "discard-enable": "1"],
                                    frontend: ["virtual-device": "\(devid)", "device-type": "disk"])
        guard Dom0Harness.wait(s.xenstore, state: dev.backendPath, { $0 == .initWait }) == .initWait else {
            throw BlkBackError.badConfiguration("\(dev.backendPath) never reached InitWait")
        }
        return (dev, image)
    }

    /// The ring keys a well-behaved frontend writes (blkif.h).
    public static func frontendKeys(_ front: BlkFront<BlkifRing>, persistent: Bool) -> [String: String] {
        let q = front.queues[0]
        var keys = ["event-channel": "\(q.port)", "protocol": "x86_64-abi", "feature-persistent": persistent ? "1" : "0"]
        if q.ringRefs.count == 1 {
            keys["ring-ref"] = "\(q.ringRefs[0])"
        } else {
            keys["ring-page-order"] = "\(q.ringRefs.count.trailingZeroBitCount)"
            for (i, r) in q.ringRefs.enumerated() { keys["ring-ref\(i)"] = "\(r)" }
        }
        return keys
    }

    /// Writes `keys` in one transaction and switches to Initialised.
    public static func publish(_ g: Dom0Harness.Guest, _ dev: XenBusDevice, _ keys: [String: String]) throws {
        try g.xenstore.transaction { t in
            for (k, v) in keys { try t.write(dev.frontendPath + "/" + k, v) }
        }
        try g.xenstore.switchState(at: dev.frontendPath, to: .initialised)
    }

    /// A frontend's blkif state: its own frames and grant refs (several fronts per guest stay apart).
    public static func makeFront(_ g: Dom0Harness.Guest, slot: Int = 0, ringPageOrder: Int = 0) throws -> BlkFront<BlkifRing> {
        try BlkFront<BlkifRing>(guest: g.hypervisor, queues: 1, ringPageOrder: ringPageOrder,
                                firstFrame: 16 + UInt32(slot) * 192, firstRef: 8 + GrantRef(slot) * 512)
    }

    /// Attaches a disk to `g` and connects a well-behaved frontend to it.
    /// Detaches like a well-behaved frontend and toolstack: Closing, Closed,
    /// the device's directories removed; waits (bounded) until blkback let go.
    public func detach(_ s: Dom0Harness, backend: XenBusBackend<BlkbackDriver>) throws {
        try guest.xenstore.switchState(at: dev.frontendPath, to: .closing)
        _ = Dom0Harness.wait(guest.xenstore, state: dev.backendPath, seconds: 10) { $0 == .closing || $0 == .closed }
        try guest.xenstore.switchState(at: dev.frontendPath, to: .closed)
        _ = Dom0Harness.wait(guest.xenstore, state: dev.backendPath, seconds: 10) { $0 == .closed }
        try s.xenstore.destroyDevice(dev)
        let path = dev.backendPath
        guard eventually(seconds: 10, every: 1, { !backend.deviceNames.contains(path) }) else {
            throw BlkBackError.badConfiguration("\(path) still open after its removal")
        }
        backend.drain()  // its queues have let go of the rings and closed the image
    }

    public init(_ s: Dom0Harness, guest g: Dom0Harness.Guest, devid: Int = 51712, bytes: Int = 4 << 20,
                persistent: Bool = true, slot: Int = 0) throws {
        (dev, image) = try Self.create(s, guest: g, devid: devid, bytes: bytes)
        guest = g
        front = try Self.makeFront(g, slot: slot)
        try Self.publish(g, dev, Self.frontendKeys(front, persistent: persistent))
        guard Dom0Harness.wait(g.xenstore, state: dev.backendPath, { $0 == .connected || $0 == .closing }) == .connected else {
            let why = (try? s.xenstore.readIfExists(dev.backendPath + "/error")) ?? nil
            throw BlkBackError.badConfiguration("\(dev.backendPath) did not connect: \(why ?? "?")")
        }
        try g.xenstore.switchState(at: dev.frontendPath, to: .connected)
        sectors = UInt64(try g.xenstore.read(dev.backendPath + "/sectors")) ?? 0
    }

    /// Bytes of the image as the host sees them.
    public func imageBytes(offset: Int, count: Int) -> [UInt8] {
        let fd = open(image, O_RDONLY | O_CLOEXEC)
        defer { close(fd) }
        var b = [UInt8](repeating: 0, count: count)
        let n = b.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
        return Array(b.prefix(max(0, n)))
    }

    public var imageSize: Int {
        var st = stat()
        stat(image, &st)
        return Int(st.st_size)
    }

    /// Byte offset of ring slot `index` in the ring pages (64-byte header, 112-byte slots).
    public func slotOffset(_ index: UInt32) -> Int { 64 + Int(index & (front.queues[0].ring.size - 1)) * 112 }

    /// Checks a response slot as XSA-216 wants it: padding byte 9 and bytes 12..<112 zero.
    public func responsePaddingIsZero(slot index: UInt32) throws -> Bool {
        let slot = try front.ringRegion().bytes(at: slotOffset(index), count: 112)
        return slot[9] == 0 && slot[12...].allSatisfy { $0 == 0 }
    }

    /// Pushes `q`, returns its status and whether the response's padding was zero.
    public func answer(_ q: BlkRequest) throws -> (status: Int16, paddingZero: Bool) {
        let idx = front.queues[0].ring.reqProdPvt
        let r = try front.roundTrip(q)
        return (r.status, try responsePaddingIsZero(slot: idx))
    }
}

/// A second, well-behaved guest's disk traffic on its own thread: 4 KiB
/// writes of a fresh pattern, each read back and compared, over fixed buffers.
/// ``stop()`` returns how many round trips it made and what went wrong.
public final class DiskWorker: @unchecked Sendable {
    let disk: XenBusDisk
    let running = Atomic<Bool>(true)
    let ops = Atomic<Int>(0)
    let failures = Mutex<[String]>([])
    private var thread: TestThread?
    let wbuf: BlkFront<BlkifRing>.Buffer
    let rbuf: BlkFront<BlkifRing>.Buffer

    public init(_ disk: XenBusDisk) throws {
        self.disk = disk
        wbuf = try disk.front.makeBuffer(pages: 1)
        rbuf = try disk.front.makeBuffer(pages: 1)
    }

    /// One write + read-back of 4 KiB at block `i % 64`; nil or what went wrong.
    public func step(_ i: Int) -> String? {
        let f = disk.front
        let data = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ i &+ ($0 >> 8)) }
        let sector = UInt64(i % 64) * 8
        do {
            try f.fill(wbuf, with: data)
            let w = try f.roundTrip(f.rwRequest(BlkifOp.write, sector: sector, buffer: wbuf, bytes: 4096))
            guard w.status == 0 else { return "write \(i): status \(w.status)" }
            try f.page(rbuf.firstFrame).fill(0, at: 0, count: 4096)
            let r = try f.roundTrip(f.rwRequest(BlkifOp.read, sector: sector, buffer: rbuf, bytes: 4096))
            guard r.status == 0 else { return "read \(i): status \(r.status)" }
            guard try f.contents(rbuf, count: 4096) == data else { return "read \(i): wrong data" }
        } catch {
            return "op \(i): \(error)"
        }
        return nil
    }

    /// Round trips per second over `seconds`, on the calling thread.
    public func throughput(seconds: Double) -> (perSecond: Double, failures: [String]) {
        var n = 0, bad: [String] = []
        let start = Date()
        while Date().timeIntervalSince(start) < seconds {
            if let e = step(n) { bad.append(e); if bad.count > 5 { break } }
            n += 1
        }
        return (Double(2 * n) / Date().timeIntervalSince(start), bad)
    }

    public func start() {
        thread = TestThread { [self] in
            var i = 0
            while running.load(ordering: .acquiring) {
                if let e = step(i) {
                    failures.withLock { $0.append(e) }
                    if failures.withLock({ $0.count }) > 5 { break }
                }
                i += 1
                ops.store(i * 2, ordering: .releasing)
            }
        }
    }

    /// Stops the thread; the number of round trips and the failures seen.
    public func stop() -> (ops: Int, failures: [String]) {
        running.store(false, ordering: .releasing)
        thread?.join()
        thread = nil
        return (ops.load(ordering: .acquiring), failures.withLock { $0 })
    }

}

/// What each open descriptor of this process is (readlink of /proc/self/fd/N), by number.
public func openDescriptors() -> [Int32: String] {
    var out: [Int32: String] = [:]
    for n in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? [] {
        guard let fd = Int32(n), let t = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/" + n) else { continue }
        out[fd] = t
    }
    return out
}
