import Foundation
import Glibc
import NBD
import Synchronization
import Testing
import XenBus
import XenHV
import XenStore
import XenTestKit

/// Issue 4: kill -9 blkback during writes, restart it. pvguest's blkfront
/// reconnects and resubmits what was in flight; the NBD client sees no error,
/// and every write acknowledged before the last acknowledged flush is in the
/// image. Real processes throughout: xenhv, blkback, pvguest; the NBD client
/// is NBD's small pipelined one, which records every acknowledgement.
@Suite struct BackendRestartTests {
    static let root = DiskPathTests.root

    /// One `blkback --hypervisor … --xenstore …` process.
    struct BlkbackProcess {
        let pid: pid_t

        init(dom0: Dom0Harness, build: String, log: String) throws {
            var out: [CInt] = [-1, -1]
            guard pipe(&out) == 0 else { throw HypervisorError.system(call: "pipe", errno: errno) }
            _ = fcntl(out[0], F_SETFD, FD_CLOEXEC)
            let logFD = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
            defer { close(logFD) }
            pid = try ProcessLauncher.spawn(build + "/blkback",
                                            arguments: ["--hypervisor", dom0.hypervisorSocket, "--xenstore", dom0.xenstoreSocket],
                                            descriptors: [(out[1], 1), (logFD, 2)])
            close(out[1])
            // Bounded: the line comes, or EOF when blkback exits.
            let line = ProcessLauncher.readLine(out[0])
            close(out[0])
            guard line.hasPrefix("blkback ready") else {
                throw HypervisorError.protocolViolation("blkback did not start: '\(line)'")
            }
        }

        func kill(_ signal: Int32) {
            _ = Glibc.kill(pid, signal)
            var st: Int32 = 0
            waitpid(pid, &st, 0)
        }
    }

    /// The bytes of write `i`: its index, then a xorshift stream seeded by it.
    static func pattern(_ i: Int, _ length: Int) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: length)
        var x = UInt64(i) &* 0x9E37_79B9_7F4A_7C15 | 1
        for k in stride(from: 0, to: length, by: 8) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            withUnsafeBytes(of: (k == 0 ? UInt64(i) : x).littleEndian) { for j in 0..<8 where k + j < length { b[k + j] = $0[j] } }
        }
        return b
    }

    struct WriteOp { let offset: UInt64; let length: Int }

    /// What the client saw, for the checks at the end.
    struct Record {
        var acked = Set<Int>()          // write indices acknowledged with no error
        var errors: [String] = []
        /// For each acknowledged flush: the writes acknowledged before it was sent.
        var durable = Set<Int>()
        var flushesAcked = 0
        var inFlightAtKill = Set<Int>()
    }

    final class LogBuffer: Sendable {
        let bytes = Mutex<[UInt8]>([])
    }

    /// dom0 (xenhv, xenstored), a blkback process, and a pvguest process with
    /// one 64 MiB disk xvda; pvguest's log is collected. Torn down at deinit.
    final class Rig {
        let dir: String
        let img: String
        let build: String
        let dom0: Dom0Harness
        var blkback: BlkbackProcess
        let domain: Hypervisor.CreatedDomain
        let dev: XenBusDevice
        let fe: String
        let guest: pid_t
        let stdoutLog = LogBuffer()
        let drained = DispatchSemaphore(value: 0)
        var exported = false

        /// `beforeGuest` runs once blkback is up and the disk is in the store,
        /// before pvguest starts; with `awaitReady` false the rig does not wait
        /// for pvguest's ready line (its disk may be left connecting).
        init(beforeGuest: (Dom0Harness, BlkbackProcess, XenBusDevice) throws -> Void = { _, _, _ in },
             awaitReady: Bool = true) throws {
            var template = Array("/tmp/pvrestart-XXXXXX".utf8CString)
            dir = String(cString: mkdtemp(&template)!)
            img = DiskPathTests.image(dir, "xvda.img", size: 64 << 20)
            build = Dom0Harness.buildDirectory(packageRoot: BackendRestartTests.root)
            do {
                dom0 = try Dom0Harness(buildDirectory: build)
                blkback = try BlkbackProcess(dom0: dom0, build: build, log: dir + "/blkback.log")
            } catch {
                try? FileManager.default.removeItem(atPath: dir)
                throw error
            }
            domain = try dom0.prepareGuest(name: "pv", pages: 16384)  // 64 MiB, as scripts/run
            dev = XenBusDevice(type: "vbd", frontendDomid: XenStore.DomID(domain.domid), devid: 51712)
            fe = "/local/domain/\(domain.domid)/device/vbd/51712"
            try Self.createDisk(dom0, dev, img)
            try beforeGuest(dom0, blkback, dev)
            var out: [CInt] = [-1, -1]
            _ = pipe(&out)
            _ = fcntl(out[0], F_SETFD, FD_CLOEXEC)
            let guestLog = open(dir + "/pvguest.log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
            guest = try ProcessLauncher.spawn(build + "/pvguest", arguments: ["--nbd-dir", dir],
                                              environment: ["XENHV_GUEST_FD": "3"],
                                              descriptors: [(out[1], 1), (guestLog, 2), (domain.guestDescriptor, 3)])
            close(out[1])
            close(guestLog)
            close(domain.guestDescriptor)
            try dom0.hypervisor.attachProcess(guest, to: domain.domid)
            while awaitReady {
                let line = ProcessLauncher.readLine(out[0])
                if line.isEmpty || line.hasPrefix("pvguest ready") { break }
                if line.hasPrefix("disk xvda") { exported = true }
            }
            // The rest of pvguest's stdout (its log lines) is collected until it exits.
            let outFD = out[0]
            let sink = stdoutLog, done = drained
            Thread {
                var buf = [UInt8](repeating: 0, count: 4096)
                while true {
                    let n = read(outFD, &buf, buf.count)
                    if n <= 0 { break }
                    sink.bytes.withLock { $0 += buf[0..<n] }
                }
                close(outFD)
                done.signal()
            }.start()
        }

        /// The disk's directories, as the toolstack writes them.
        static func createDisk(_ dom0: Dom0Harness, _ dev: XenBusDevice, _ img: String) throws {
            try dom0.xenstore.createDevice(dev, backend: ["params": img, "mode": "w", "type": "file", "dev": "xvda",
                                                          "device-type": "disk", "discard-enable": "1"],
                                           frontend: ["virtual-device": "51712", "device-type": "disk"])
        }

        /// pvguest's log so far.
        var guestLog: String {
            String(decoding: stdoutLog.bytes.withLock { $0 }, as: UTF8.self)
                + ((try? String(contentsOfFile: dir + "/pvguest.log", encoding: .utf8)) ?? "")
        }

        /// Stops pvguest (destroying its domain) and returns everything it logged.
        func stopGuest() -> String {
            try? dom0.hypervisor.destroyDomain(domain.domid)
            _ = drained.wait(timeout: .now() + 10)
            drained.signal()
            return String(decoding: stdoutLog.bytes.withLock { $0 }, as: UTF8.self)
                + ((try? String(contentsOfFile: dir + "/pvguest.log", encoding: .utf8)) ?? "")
        }

        deinit {
            _ = stopGuest()
            var st: Int32 = 0
            waitpid(guest, &st, 0)
            blkback.kill(SIGTERM)
            try? FileManager.default.removeItem(atPath: dir)
        }
    }

    @Test(.timeLimit(.minutes(3)))
    func killNineBlkbackDuringWritesAndRestart() throws {
        let rig = try Rig()
        let dom0 = rig.dom0, dev = rig.dev, img = rig.img, dir = rig.dir, build = rig.build
        guard rig.exported else {
            Issue.record("pvguest exported no xvda; its log:\n\(rig.stopGuest().suffix(3000))")
            return
        }
        let client = try NBDClient(socket: dir + "/xvda.sock")
        #expect(client.size == 64 << 20)

        // The workload: 1200 distinct writes of 4 KiB to 48 KiB (some split
        // over two ring requests), a flush every 16, queue depth 8.
        let sizes = [4096, 8192, 65536, 4096, 49152, 12288]
        var ops: [WriteOp] = []
        var offset: UInt64 = 0
        for i in 0..<1200 {
            let len = sizes[i % sizes.count]
            ops.append(WriteOp(offset: offset, length: len))
            offset += UInt64(len)
        }
        #expect(offset <= client.size)
        // blkback dies twice, so the device recovers from a recovered state too.
        let killAt = 300, killsAt: Set = [killAt, 800]
        var record = Record()
        let flushBase: UInt64 = 1 << 32
        var flushSnapshots: [UInt64: Set<Int>] = [:]
        var outstanding = Set<UInt64>()
        var next = 0, sentSinceFlush = 0, flushes: UInt64 = 0
        var kills = 0, recovering = 0, sentDuringRecovery = 0, killedAt = Set<Int>()
        let fe = rig.fe
        let depth = 8
        do {
            while next < ops.count || !outstanding.isEmpty {
                while outstanding.count < depth && next < ops.count {
                    if sentSinceFlush == 16 {
                        flushes += 1
                        flushSnapshots[flushBase + flushes] = record.acked
                        try client.send(type: 3, handle: flushBase + flushes, offset: 0, length: 0)
                        outstanding.insert(flushBase + flushes)
                        sentSinceFlush = 0
                        continue
                    }
                    let op = ops[next]
                    try client.send(type: 1, handle: UInt64(next), offset: op.offset, length: UInt32(op.length),
                                    data: Self.pattern(next, op.length))
                    outstanding.insert(UInt64(next))
                    next += 1
                    sentSinceFlush += 1
                }
                let r = try client.reply()
                guard outstanding.remove(r.handle) != nil else {
                    record.errors.append("reply for unknown handle \(r.handle)")
                    break
                }
                if r.error != 0 {
                    record.errors.append("handle \(r.handle): error \(r.error)")
                } else if r.handle >= flushBase {
                    record.flushesAcked += 1
                    record.durable = flushSnapshots[r.handle] ?? []
                } else {
                    record.acked.insert(Int(r.handle))
                }
                if killsAt.contains(record.acked.count) && !killedAt.contains(record.acked.count) {
                    killedAt.insert(record.acked.count)
                    // Mid-stream: up to `depth` - 1 requests are in flight; refill first so more are.
                    while outstanding.count < depth && next < ops.count {
                        try client.send(type: 1, handle: UInt64(next), offset: ops[next].offset,
                                        length: UInt32(ops[next].length), data: Self.pattern(next, ops[next].length))
                        outstanding.insert(UInt64(next))
                        next += 1
                        sentSinceFlush += 1
                    }
                    rig.blkback.kill(SIGKILL)
                    kills += 1
                    record.inFlightAtKill.formUnion(outstanding.filter { $0 < flushBase }.map { Int($0) })
                    // The frontend notices (its port went unbound) and starts over: Closed.
                    // Requests sent from now on arrive while it reconnects, and must wait.
                    if Dom0Harness.wait(dom0.xenstore, state: fe, seconds: 10, { $0 == .closed }) == .closed { recovering += 1 }
                    if !outstanding.contains(where: { $0 >= flushBase }) {
                        flushes += 1
                        flushSnapshots[flushBase + flushes] = record.acked
                        try client.send(type: 3, handle: flushBase + flushes, offset: 0, length: 0)
                        outstanding.insert(flushBase + flushes)
                        sentSinceFlush = 0
                    }
                    let before = outstanding.count
                    while outstanding.count < depth + 4 && next < ops.count {
                        try client.send(type: 1, handle: UInt64(next), offset: ops[next].offset,
                                        length: UInt32(ops[next].length), data: Self.pattern(next, ops[next].length))
                        outstanding.insert(UInt64(next))
                        next += 1
                        sentSinceFlush += 1
                    }
                    sentDuringRecovery += outstanding.count - before
                    rig.blkback = try BlkbackProcess(dom0: dom0, build: build, log: dir + "/blkback.log")
                }
            }
        } catch {
            record.errors.append("client: \(error)")
        }
        #expect(kills == 2)
        #expect(recovering == kills, "the frontend did not go Closed to reconnect")
        #expect(sentDuringRecovery > 0)
        #expect(record.errors.isEmpty, "\(record.errors.prefix(10))")
        #expect(!record.inFlightAtKill.isEmpty, "nothing was in flight when blkback died")
        #expect(record.inFlightAtKill.isSubset(of: record.acked), "in flight at the kill and never acknowledged")
        #expect(record.acked.count == ops.count)

        // Every write acknowledged before the last acknowledged flush is in the image,
        // byte for byte (and, the run having completed, every acknowledged one).
        let last = record.durable
        #expect(last.count > killAt, "the last acknowledged flush covers only \(last.count) writes")
        var corrupt: [Int] = []
        let h = try FileHandle(forReadingFrom: URL(fileURLWithPath: img))
        for i in record.acked.sorted() {
            try h.seek(toOffset: ops[i].offset)
            let got = [UInt8](try h.read(upToCount: ops[i].length) ?? Data())
            if got != Self.pattern(i, ops[i].length) { corrupt.append(i) }
        }
        try h.close()
        #expect(corrupt.isEmpty, "\(corrupt.count) writes differ in the image, e.g. \(corrupt.prefix(8)); durable: \(last.intersection(corrupt).count)")

        guard record.errors.isEmpty else { return }
        // New I/O works on the same connection: a write past the workload, a flush, a read back.
        let tail = offset + 4096
        let fresh = Self.pattern(99_999, 8192)
        try client.send(type: 1, handle: 7, offset: tail, length: 8192, data: fresh)
        let w = try client.reply()
        try client.send(type: 3, handle: 8, offset: 0, length: 0)
        let f = try client.reply()
        // A 64 KiB read: one indirect request (16 segments) when the backend offers them.
        let big = killAt + 2
        #expect(ops[big].length == 65536)
        try client.send(type: 0, handle: 9, offset: ops[big].offset, length: UInt32(ops[big].length))
        let r = try client.reply { _ in ops[big].length }
        #expect(w.handle == 7 && w.error == 0 && f.handle == 8 && f.error == 0)
        #expect(r.handle == 9 && r.error == 0 && r.data == Self.pattern(big, ops[big].length))
        #expect(try DiskPathTests.bytes(img, at: tail, count: 8192) == fresh)

        // The frontend went through a reconnect (and says so), and both ends are Connected again.
        #expect(Dom0Harness.wait(dom0.xenstore, state: fe, seconds: 5) { $0 == .connected } == .connected)
        #expect(Dom0Harness.wait(dom0.xenstore, state: dev.backendPath, seconds: 5) { $0 == .connected } == .connected)
        let logs = rig.stopGuest()
        // blkback offers 256 indirect segments and the guest has the memory: large requests went indirect.
        #expect(logs.contains("32 segments per request (indirect)"), "pvguest log:\n\(logs.suffix(3000))")
        // One queue per CPU, as far as blkback offers (it offers one per dom0 CPU).
        let offered = Int((try? dom0.xenstore.readIfExists(dev.backendPath + "/multi-queue-max-queues")) ?? nil ?? "1") ?? 1
        let queues = max(1, min(offered, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))), 16))
        #expect(logs.contains("\(queues) queue(s) of"), "pvguest log:\n\(logs.suffix(3000))")
        #expect(logs.components(separatedBy: "reconnected to").count - 1 == kills, "pvguest log:\n\(logs.suffix(3000))")
    }

    /// The store path of recovery: the backend's state leaves Connected (here the
    /// toolstack moves it to Closing, as a failing backend's xenbus_dev_fatal
    /// does) while the backend process lives on and its port stays bound.
    @Test(.timeLimit(.minutes(2)))
    func backendLeavingConnectedMakesTheFrontendReconnect() throws {
        let rig = try Rig()
        guard rig.exported else {
            Issue.record("pvguest exported no xvda; its log:\n\(rig.stopGuest().suffix(3000))")
            return
        }
        let client = try NBDClient(socket: rig.dir + "/xvda.sock")
        let a = Self.pattern(1, 65536), b = Self.pattern(2, 8192)
        try client.send(type: 1, handle: 1, offset: 0, length: 65536, data: a)
        let ra = try client.reply()
        #expect(ra.handle == 1 && ra.error == 0)

        try rig.dom0.xenstore.write(rig.dev.backendPath + "/state", "\(XenBus.XenbusState.closing.rawValue)")
        #expect(Dom0Harness.wait(rig.dom0.xenstore, state: rig.fe, seconds: 10) { $0 == .closed } == .closed)
        // Sent while the frontend reconnects: it waits, then completes.
        try client.send(type: 1, handle: 2, offset: 1 << 20, length: 8192, data: b)
        try client.send(type: 3, handle: 3, offset: 0, length: 0)
        // Replies may come in either order (the write and the flush can be on different queues).
        let r2 = try client.reply(), r3 = try client.reply()
        #expect(Set([r2.handle, r3.handle]) == [2, 3] && r2.error == 0 && r3.error == 0)
        #expect(Dom0Harness.wait(rig.dom0.xenstore, state: rig.fe, seconds: 5) { $0 == .connected } == .connected)
        #expect(Dom0Harness.wait(rig.dom0.xenstore, state: rig.dev.backendPath, seconds: 5) { $0 == .connected } == .connected)
        try client.send(type: 0, handle: 4, offset: 0, length: 65536)
        let r4 = try client.reply { _ in 65536 }
        #expect(r4.error == 0 && r4.data == a)
        #expect(try DiskPathTests.bytes(rig.img, at: 0, count: 65536) == a)
        #expect(try DiskPathTests.bytes(rig.img, at: 1 << 20, count: 8192) == b)
        let logs = rig.stopGuest()
        #expect(logs.contains("lost (backend state is") && logs.contains("reconnected to"), "pvguest log:\n\(logs.suffix(3000))")
    }

    /// The soak's hang: blkback killed between its InitWait and its Connected,
    /// after the frontend published its ring and went Initialised. Nothing the
    /// frontend can see tells it that backend died (the restarted blkback's
    /// InitWait is the value it already read, and the port it allocated was
    /// never bound), so the restarted blkback must connect to that ring, which
    /// never carried a request — not wait, as it did, for a restart that only
    /// came with the frontend's 30 s handshake timeout.
    @Test(.timeLimit(.minutes(2)))
    func blkbackKilledBetweenInitWaitAndConnectedConnectsOnRestart() throws {
        let rig = try Rig(beforeGuest: { dom0, blkback, dev in
            // blkback offers the disk, then stops before it can see the frontend.
            guard Dom0Harness.wait(dom0.xenstore, state: dev.backendPath, seconds: 10, { $0 == .initWait }) == .initWait else {
                throw HypervisorError.protocolViolation("blkback did not offer the disk")
            }
            _ = Glibc.kill(blkback.pid, SIGSTOP)
        }, awaitReady: false)
        #expect(Dom0Harness.wait(rig.dom0.xenstore, state: rig.fe, seconds: 20) { $0 == .initialised } == .initialised)
        #expect(try rig.dom0.xenstore.read(rig.dev.backendPath + "/state") == "\(XenBus.XenbusState.initWait.rawValue)")
        rig.blkback.kill(SIGKILL)
        let restarted = Date()
        rig.blkback = try BlkbackProcess(dom0: rig.dom0, build: rig.build, log: rig.dir + "/blkback.log")
        // Well inside the frontend's 30 s handshake timeout.
        #expect(Dom0Harness.wait(rig.dom0.xenstore, state: rig.dev.backendPath, seconds: 10) { $0 == .connected } == .connected)
        #expect(Dom0Harness.wait(rig.dom0.xenstore, state: rig.fe, seconds: 10) { $0 == .connected } == .connected)
        #expect(Date().timeIntervalSince(restarted) < 10)

        // The disk works through the ring the dead blkback never connected.
        let socket = rig.dir + "/xvda.sock"
        var deadline = 200
        while access(socket, F_OK) != 0 && deadline > 0 {
            var p = pollfd(fd: -1, events: 0, revents: 0)
            _ = poll(&p, 0, 50)
            deadline -= 1
        }
        let client = try NBDClient(socket: socket)
        let a = Self.pattern(7, 65536)
        try client.send(type: 1, handle: 1, offset: 4096, length: 65536, data: a)
        let r1 = try client.reply()
        try client.send(type: 3, handle: 2, offset: 0, length: 0)
        let r2 = try client.reply()
        #expect(r1.error == 0 && r2.error == 0)
        try client.send(type: 0, handle: 3, offset: 4096, length: 65536)
        let r3 = try client.reply { _ in 65536 }
        #expect(r3.error == 0 && r3.data == a)
        #expect(try DiskPathTests.bytes(rig.img, at: 4096, count: 65536) == a)
        let blkbackLog = (try? String(contentsOfFile: rig.dir + "/blkback.log", encoding: .utf8)) ?? ""
        #expect(blkbackLog.contains("never carried a request; connecting"), "blkback log:\n\(blkbackLog.suffix(3000))")
        let logs = rig.stopGuest()
        #expect(!logs.contains("did not connect") && !logs.contains("lost ("), "pvguest log:\n\(logs.suffix(3000))")
    }

    /// The toolstack replaces the disk (detach, attach) while blkback is dead
    /// and the frontend is reconnecting: the reconnecting device stops at once
    /// (it must not handshake on the new device's directories, nor wait out
    /// its 30 s steps), and the guest brings the new device up on the
    /// restarted blkback; what was flushed before is read back through it.
    @Test(.timeLimit(.minutes(2)))
    func diskReplacedWhileTheFrontendReconnectsComesUpAnew() throws {
        let rig = try Rig()
        guard rig.exported else {
            Issue.record("pvguest exported no xvda; its log:\n\(rig.stopGuest().suffix(3000))")
            return
        }
        let a = Self.pattern(5, 65536)
        do {
            let client = try NBDClient(socket: rig.dir + "/xvda.sock")
            try client.send(type: 1, handle: 1, offset: 0, length: 65536, data: a)
            let r1 = try client.reply()
            try client.send(type: 3, handle: 2, offset: 0, length: 0)
            let r2 = try client.reply()
            #expect(r1.error == 0 && r2.error == 0)
        }
        rig.blkback.kill(SIGKILL)
        // The frontend noticed and is reconnecting (Closed, waiting for a backend's Closed).
        #expect(Dom0Harness.wait(rig.dom0.xenstore, state: rig.fe, seconds: 10) { $0 == .closed } == .closed)
        try rig.dom0.xenstore.destroyDevice(rig.dev)
        try Rig.createDisk(rig.dom0, rig.dev, rig.img)
        let replaced = Date()
        rig.blkback = try BlkbackProcess(dom0: rig.dom0, build: rig.build, log: rig.dir + "/blkback.log")
        #expect(Dom0Harness.wait(rig.dom0.xenstore, state: rig.dev.backendPath, seconds: 15) { $0 == .connected } == .connected)
        #expect(Dom0Harness.wait(rig.dom0.xenstore, state: rig.fe, seconds: 15) { $0 == .connected } == .connected)
        #expect(Date().timeIntervalSince(replaced) < 15)
        // The new device's export (the old one's socket went with it).
        var exported = false
        for _ in 0..<200 where !exported {
            exported = rig.guestLog.components(separatedBy: "vbd/51712: disk xvda").count - 1 == 2
            if !exported {
                var p = pollfd(fd: -1, events: 0, revents: 0)
                _ = poll(&p, 0, 50)
            }
        }
        #expect(exported, "pvguest log:\n\(rig.guestLog.suffix(3000))")
        let client = try NBDClient(socket: rig.dir + "/xvda.sock")
        try client.send(type: 0, handle: 3, offset: 0, length: 65536)
        let r3 = try client.reply { _ in 65536 }
        #expect(r3.error == 0 && r3.data == a)
        let logs = rig.stopGuest()
        // The old device was removed (its reconnect stopped), never reconnected.
        #expect(logs.contains("vbd/51712: removed") && !logs.contains("reconnected to"),
                "pvguest log:\n\(logs.suffix(3000))")
    }
}
