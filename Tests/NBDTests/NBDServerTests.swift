import Foundation
import Glibc
import NBD
import Synchronization
import Testing
import XenHV
import XenTestKit

/// The NBD server against real clients: Debian's nbdinfo (libnbd) and qemu-io.
@Suite struct NBDServerTests {
    struct Served {
        let dir: String
        let socket: String
        let server: NBDServer
        let device: MemoryBlockDevice
        var uri: String { "nbd+unix:///disk?socket=\(socket)" }
    }

    func serve(size: UInt64 = 64 << 20, readOnly: Bool = false) throws -> Served {
        let dev = MemoryBlockDevice(size: size, readOnly: readOnly)
        let s = try serve(dev)
        return Served(dir: s.dir, socket: s.socket, server: s.server, device: dev)
    }

    func finish(_ s: Served) {
        s.server.stop()
        try? FileManager.default.removeItem(atPath: s.dir)
    }

    /// Runs a tool; returns (exit status, stdout + stderr).
    func run(_ tool: String, _ args: [String]) throws -> (Int32, String) {
        let r = CommandResult.run(tool, args)
        return (r.status, r.out + r.err)
    }

    /// qemu-io on `uri` running `commands` (each a -c).
    func qemuIO(_ uri: String, _ commands: [String]) throws -> (Int32, String) {
        try run("/usr/bin/qemu-io", ["-f", "raw", uri] + commands.flatMap { ["-c", $0] })
    }

    @Test func nbdinfoSeesTheExport() throws {
        let s = try serve(size: 48 << 20)
        defer { finish(s) }
        let (rc, out) = try run("/usr/bin/nbdinfo", ["--json", s.uri])
        #expect(rc == 0, "\(out)")
        #expect(out.contains("\"export-size\": \(48 << 20)"))
        #expect(out.contains("\"can_trim\": true"))
        #expect(out.contains("\"can_zero\": true"))
        #expect(out.contains("\"is_read_only\": false"))
        #expect(out.contains("\"block_size_minimum\": 512"))
        let (rc2, list) = try run("/usr/bin/nbdinfo", ["--list", "nbd+unix://?socket=\(s.socket)"])
        #expect(rc2 == 0)
        #expect(list.contains("export=\"disk\"") || list.contains("disk"))
    }

    @Test func qemuIOWritesLandAndReadBack() throws {
        let s = try serve()
        defer { finish(s) }
        let (rc, out) = try qemuIO(s.uri, [
            "write -P 0xab 4096 8192", "write -P 0xcd 1048576 65536",
            "read -P 0xab 4096 8192", "read -P 0xcd 1048576 65536", "read -P 0 0 4096",
            "flush", "discard 4096 4096", "read -P 0 4096 4096", "read -P 0xab 8192 4096",
        ])
        #expect(rc == 0, "\(out)")
        #expect(!out.contains("Pattern verification failed"), "\(out)")
        #expect(!out.lowercased().contains("error"), "\(out)")
        // The bytes really are in the device.
        var b = [UInt8](repeating: 0, count: 4)
        b.withUnsafeMutableBytes { buf in s.device.read(at: 1048576, into: buf) { _ in } }
        #expect(b == [0xCD, 0xCD, 0xCD, 0xCD])
    }

    /// NBD_CMD_WRITE_ZEROES, offered on writable exports: the range reads
    /// back as zeros and nothing around it changes, across the 1 MiB chunks
    /// zeros are written in, on a device that completes within the call (the
    /// RAM disk) and on one that completes on a thread of its own (as
    /// blkfront). Out of range is ENOSPC; FAST_ZERO, never offered (zeroing
    /// is writing zeros here), EINVAL; a read-only export offers none and
    /// answers EPERM. qemu-io's `write -z` goes through it.
    @Test func writeZeroesZeroesTheRangeOnly() throws {
        let devices: [any BlockDevice] = [MemoryBlockDevice(size: 8 << 20), OneCompletionThread(size: 8 << 20)]
        for dev in devices {
            let s = try serve(dev)
            defer { s.server.stop(); try? FileManager.default.removeItem(atPath: s.dir) }
            let c = try NBDClient(socket: s.socket, timeoutSeconds: 10)
            try c.write([UInt8](repeating: 0xA5, count: 4 << 20), at: 1 << 20)
            let start: UInt64 = (1 << 20) + 512, length: UInt32 = (2 << 20) + 4096  // three chunks
            let zeroes = NBDClient.Command.writeZeroes.rawValue
            try c.send(type: zeroes, flags: 1 /* FUA */, handle: 1, offset: start, length: length)
            let r = try c.reply()
            #expect(r.handle == 1 && r.error == 0)
            let back = try c.read(at: 1 << 20, length: 4 << 20)
            let lo = Int(start) - (1 << 20), hi = lo + Int(length)
            #expect(back[lo..<hi].allSatisfy { $0 == 0 }, "not zeroed")
            #expect(back[..<lo].allSatisfy { $0 == 0xA5 } && back[hi...].allSatisfy { $0 == 0xA5 }, "zeroed outside the range")
            // Refused ones leave their range as it was.
            let kept = [UInt8](repeating: 0x5C, count: 4096)
            try c.write(kept, at: 0)
            try c.write(kept, at: (8 << 20) - 4096)
            for (flags, offset, len, expected) in [(UInt16(0), UInt64((8 << 20) - 4096), UInt32(8192), UInt32(28)),
                                                   (UInt16(1 << 4), UInt64(0), UInt32(4096), UInt32(22))] {
                try c.send(type: zeroes, flags: flags, handle: 2, offset: offset, length: len)
                let e = try c.reply()
                #expect(e.handle == 2 && e.error == expected, "flags \(flags) offset \(offset): \(e.error)")
            }
            #expect(try c.read(at: 0, length: 4096) == kept)
            #expect(try c.read(at: (8 << 20) - 4096, length: 4096) == kept)
        }

        let ro = try serve(readOnly: true)
        defer { finish(ro) }
        let (_, info) = try run("/usr/bin/nbdinfo", ["--json", ro.uri])
        #expect(info.contains("\"can_zero\": false"), "\(info)")
        let c = try NBDClient(socket: ro.socket, timeoutSeconds: 10)
        try c.send(type: NBDClient.Command.writeZeroes.rawValue, handle: 3, offset: 0, length: 4096)
        #expect(try c.reply().error == 1)

        let q = try serve()
        defer { finish(q) }
        let (rc, out) = try qemuIO(q.uri, [
            "write -P 0x11 0 3M", "write -z 4096 2M",
            "read -P 0 4096 2M", "read -P 0x11 0 4096", "read -P 0x11 2101248 1044480",
        ])
        #expect(rc == 0 && !out.contains("Pattern verification failed") && !out.lowercased().contains("error"), "\(out)")
    }

    @Test func readOnlyExportRefusesWrites() throws {
        let s = try serve(readOnly: true)
        defer { finish(s) }
        let (rc, out) = try run("/usr/bin/qemu-io", ["-f", "raw", "-r", s.uri, "-c", "read -P 0 0 4096"])
        #expect(rc == 0, "\(out)")
        let (_, w) = try qemuIO(s.uri, ["write -P 1 0 4096"])
        #expect(w.contains("read-only") || w.contains("Operation not permitted") || w.contains("Permission denied"), "\(w)")
    }

    @Test func outOfRangeAndGarbageAreRefused() throws {
        let s = try serve(size: 1 << 20)
        defer { finish(s) }
        let (_, out) = try qemuIO(s.uri, ["read 1044480 8192"])
        #expect(out.contains("Input/output error") || out.contains("Invalid argument") || out.contains("out of range") || out.contains("beyond"), "\(out)")
        // A client that sends garbage instead of the handshake is dropped; the server lives on.
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            let b = Array(s.socket.utf8); p.copyBytes(from: b); p[b.count] = 0
        }
        let r = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        #expect(r == 0)
        var hello = [UInt8](repeating: 0, count: 18)
        #expect(read(fd, &hello, 18) == 18)
        let junk: [UInt8] = [0xFF, 0xFF, 0xFF, 0xFF]
        _ = write(fd, junk, 4)
        var one: UInt8 = 0
        #expect(read(fd, &one, 1) == 0)  // closed by the server
        close(fd)
        let (rc, again) = try qemuIO(s.uri, ["read -P 0 0 512"])
        #expect(rc == 0, "\(again)")
    }

    /// A device that completes every operation on one thread of its own, as
    /// pvguest's blkfront does (its completion thread drains the ring).
    final class OneCompletionThread: BlockDevice, @unchecked Sendable {
        // Sound: MemoryBlockDevice's bytes are touched only inside each operation's range.
        let disk: MemoryBlockDevice
        let completions = DispatchQueue(label: "completions")
        init(size: UInt64) { disk = MemoryBlockDevice(size: size) }
        var size: UInt64 { disk.size }
        var isReadOnly: Bool { false }
        var canTrim: Bool { true }
        func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, completion: @escaping @Sendable (Int32?) -> Void) {
            nonisolated(unsafe) let b = buffer
            completions.async { self.disk.read(at: offset, into: b, completion: completion) }
        }
        func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool, completion: @escaping @Sendable (Int32?) -> Void) {
            nonisolated(unsafe) let b = buffer
            completions.async { self.disk.write(at: offset, from: b, fua: fua, completion: completion) }
        }
        func flush(completion: @escaping @Sendable (Int32?) -> Void) { completions.async { completion(nil) } }
        func trim(at offset: UInt64, length: UInt64, completion: @escaping @Sendable (Int32?) -> Void) {
            completions.async { self.disk.trim(at: offset, length: length, completion: completion) }
        }
    }

    func serve(_ device: any BlockDevice) throws -> (dir: String, socket: String, server: NBDServer) {
        let dir = NSTemporaryDirectory() + "nbd-test-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let server = NBDServer(exportName: "disk", device: device)
        try server.listen(unixPath: dir + "/nbd.sock")
        return (dir, dir + "/nbd.sock", server)
    }

    /// A client that pipelines large reads and never reads the replies holds
    /// only its own connection: another client on the same device is served,
    /// and the device's completion thread is never blocked on its socket.
    @Test func aClientThatDoesNotReadItsRepliesStallsOnlyItself() throws {
        let s = try serve(OneCompletionThread(size: 64 << 20))
        defer { s.server.stop(); try? FileManager.default.removeItem(atPath: s.dir) }
        let stuck = try NBDClient(socket: s.socket)
        for i in 0..<64 {
            try stuck.send(type: NBDClient.Command.read.rawValue, handle: UInt64(i), offset: UInt64(i) << 20, length: 1 << 20)
        }
        let other = try NBDClient(socket: s.socket, timeoutSeconds: 10)
        try other.write([UInt8](repeating: 0x5C, count: 4096), at: 4096)
        #expect(try other.read(at: 4096, length: 4096) == [UInt8](repeating: 0x5C, count: 4096))
        try other.flush()
        // The stuck client's replies are all still there once it reads them.
        var answered = Set<UInt64>()
        for _ in 0..<64 { answered.insert(try stuck.reply { _ in 1 << 20 }.handle) }
        #expect(answered == Set(0..<64))
    }

    /// Replies gathered into one send arrive whole and in their own bytes
    /// when the socket takes them a part at a time: pipelined reads of 1 MiB
    /// (far past a Unix socket's buffer) between 512-byte ones, each checked
    /// against the pattern written at its offset.
    @Test func pipelinedReadsArriveWholeThroughPartialSends() throws {
        let s = try serve(size: 32 << 20)
        defer { finish(s) }
        let c = try NBDClient(socket: s.socket, timeoutSeconds: 10)
        let base = (0..<((1 << 20) + 16)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 8) }
        func pattern(_ i: Int) -> [UInt8] { Array(base[i..<(i + (1 << 20))]) }
        for i in 0..<16 { try c.write(pattern(i), at: UInt64(i) << 20) }
        var expected: [UInt64: [UInt8]] = [:]
        for i in 0..<16 {
            try c.send(type: NBDClient.Command.read.rawValue, handle: UInt64(2 * i), offset: UInt64(i) << 20, length: 1 << 20)
            expected[UInt64(2 * i)] = pattern(i)
            let small = UInt64(i) << 20 | 4096
            try c.send(type: NBDClient.Command.read.rawValue, handle: UInt64(2 * i + 1), offset: small, length: 512)
            expected[UInt64(2 * i + 1)] = Array(pattern(i)[4096..<4608])
        }
        for _ in 0..<32 {
            let r = try c.reply { h in h % 2 == 0 ? 1 << 20 : 512 }
            #expect(r.error == 0)
            #expect(r.data == expected.removeValue(forKey: r.handle), "reply \(r.handle)")
        }
        #expect(expected.isEmpty)
    }

    /// A device that notes any zero-length operation it is handed (blkfront
    /// refuses them with EINVAL).
    final class NotesEmpty: BlockDevice, @unchecked Sendable {
        // Sound: `sawEmpty` is atomic; the disk as in OneCompletionThread.
        let disk = MemoryBlockDevice(size: 1 << 20)
        let sawEmpty = Atomic<Bool>(false)
        var size: UInt64 { disk.size }
        var isReadOnly: Bool { false }
        var canTrim: Bool { true }
        func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, completion: @escaping @Sendable (Int32?) -> Void) {
            if buffer.isEmpty { sawEmpty.store(true, ordering: .relaxed) }
            disk.read(at: offset, into: buffer, completion: completion)
        }
        func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool, completion: @escaping @Sendable (Int32?) -> Void) {
            if buffer.isEmpty { sawEmpty.store(true, ordering: .relaxed) }
            disk.write(at: offset, from: buffer, fua: fua, completion: completion)
        }
        func flush(completion: @escaping @Sendable (Int32?) -> Void) { completion(nil) }
        func trim(at offset: UInt64, length: UInt64, completion: @escaping @Sendable (Int32?) -> Void) {
            if length == 0 { sawEmpty.store(true, ordering: .relaxed) }
            disk.trim(at: offset, length: length, completion: completion)
        }
    }

    /// Zero-length reads, writes and discards succeed without reaching the device.
    @Test func zeroLengthRequestsSucceed() throws {
        let dev = NotesEmpty()
        let s = try serve(dev)
        defer { s.server.stop(); try? FileManager.default.removeItem(atPath: s.dir) }
        let c = try NBDClient(socket: s.socket, timeoutSeconds: 10)
        #expect(try c.read(at: 4096, length: 0).isEmpty)
        try c.write([], at: 8192)
        try c.send(type: NBDClient.Command.trim.rawValue, handle: 7, offset: 0, length: 0)
        let r = try c.reply()
        #expect(r.handle == 7 && r.error == 0)
        let reached = dev.sawEmpty.load(ordering: .relaxed)
        #expect(!reached, "a zero-length request reached the device")
    }

    /// A device that records the operations it completed, in order.
    final class Records: BlockDevice, @unchecked Sendable {
        // Sound: `done` is behind its mutex; the disk as in OneCompletionThread.
        let disk = MemoryBlockDevice(size: 1 << 20)
        let done = Mutex<[String]>([])
        var size: UInt64 { disk.size }
        var isReadOnly: Bool { false }
        var canTrim: Bool { true }
        var canFlush: Bool { true }
        func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, completion: @escaping @Sendable (Int32?) -> Void) {
            disk.read(at: offset, into: buffer, completion: completion)
        }
        func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool, completion: @escaping @Sendable (Int32?) -> Void) {
            disk.write(at: offset, from: buffer, fua: fua, completion: completion)
        }
        func flush(completion: @escaping @Sendable (Int32?) -> Void) {
            done.withLock { $0.append("flush") }
            completion(nil)
        }
        func trim(at offset: UInt64, length: UInt64, completion: @escaping @Sendable (Int32?) -> Void) {
            disk.trim(at: offset, length: length) { [self] e in done.withLock { $0.append("trim") }; completion(e) }
        }
    }

    /// A discard with FUA is answered once it is on stable storage (the NBD
    /// spec: no reply to a FUA command before its writes are persisted): the
    /// server flushes after it, as after a FUA write.
    @Test func aDiscardWithFUAIsAnsweredAfterAFlush() throws {
        let dev = Records()
        let s = try serve(dev)
        defer { s.server.stop(); try? FileManager.default.removeItem(atPath: s.dir) }
        let c = try NBDClient(socket: s.socket, timeoutSeconds: 10)
        try c.send(type: NBDClient.Command.trim.rawValue, flags: 1 /* NBD_CMD_FLAG_FUA */, handle: 9, offset: 0, length: 4096)
        let r = try c.reply()
        #expect(r.handle == 9 && r.error == 0)
        #expect(dev.done.withLock { $0 } == ["trim", "flush"], "answered before the discard was flushed")
        try c.send(type: NBDClient.Command.trim.rawValue, handle: 10, offset: 4096, length: 4096)
        #expect(try c.reply().handle == 10)
        #expect(dev.done.withLock { $0 } == ["trim", "flush", "trim"], "a discard without FUA needs no flush")
    }

    /// Past NBDServer.maxConnections a connection is closed at once; the
    /// ones open keep working, and a slot that frees is taken again.
    @Test func connectionsPastTheCapAreRefused() throws {
        let s = try serve(size: 1 << 20)
        defer { finish(s) }
        var open = try (0..<NBDServer.maxConnections).map { _ in try NBDClient(socket: s.socket, timeoutSeconds: 10) }
        #expect(throws: NBDError.self) { _ = try NBDClient(socket: s.socket, timeoutSeconds: 10) }
        #expect(try open[0].read(at: 0, length: 512) == [UInt8](repeating: 0, count: 512))
        open.removeLast()  // closes it; the server notices and frees its slot
        let again = eventually(seconds: 10, every: 1) { (try? NBDClient(socket: s.socket, timeoutSeconds: 10)) != nil }
        #expect(again)
    }

    /// The handshake is bounded as a whole: a client that keeps asking for
    /// the export list, never choosing one, is cut off after the deadline
    /// (a per-call timeout would never fire for it).
    @Test func aHandshakeWithoutEndIsCutOff() throws {
        let s = try serve(size: 1 << 20)
        defer { finish(s) }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in let b = Array(s.socket.utf8); p.copyBytes(from: b); p[b.count] = 0 }
        let r = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        try #require(r == 0)
        var tv = timeval(tv_sec: 30, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var hello = [UInt8](repeating: 0, count: 18)
        try #require(read(fd, &hello, 18) == 18)
        let flags: [UInt8] = [0, 0, 0, 3]
        try #require(write(fd, flags, 4) == 4)
        // NBD_OPT_LIST, again and again: a reply (server + ack) each time, until the server hangs up.
        let list: [UInt8] = Array("IHAVEOPT".utf8) + [0, 0, 0, 3, 0, 0, 0, 0]
        let start = monotonicSeconds()
        var buf = [UInt8](repeating: 0, count: 4096)
        var cutOff = false
        while monotonicSeconds() - start < 30 {
            guard send(fd, list, list.count, Int32(MSG_NOSIGNAL)) == list.count else { cutOff = true; break }
            guard read(fd, &buf, buf.count) > 0 else { cutOff = true; break }
        }
        #expect(cutOff, "still negotiating after 30 s")
        #expect(monotonicSeconds() - start < 20)
    }

    /// The handshake deadline fires after a connection that negotiated and
    /// left: the server (its process) lives on and serves the next client.
    @Test func theHandshakeDeadlineOutlivesItsConnection() throws {
        let dir = NSTemporaryDirectory() + "nbd-test-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let server = NBDServer(exportName: "disk", device: MemoryBlockDevice(size: 1 << 20), handshakeSeconds: 1)
        try server.listen(unixPath: dir + "/nbd.sock")
        defer { server.stop(); try? FileManager.default.removeItem(atPath: dir) }
        for _ in 0..<8 {
            let c = try NBDClient(socket: dir + "/nbd.sock", timeoutSeconds: 10)
            _ = try c.read(at: 0, length: 512)
        }
        // Past every connection's deadline (1 s): their timers have fired.
        let until = monotonicSeconds() + 2
        while monotonicSeconds() < until { var p = pollfd(fd: -1, events: 0, revents: 0); _ = poll(&p, 0, 100) }
        let c = try NBDClient(socket: dir + "/nbd.sock", timeoutSeconds: 10)
        #expect(try c.read(at: 0, length: 512) == [UInt8](repeating: 0, count: 512))
    }
}
