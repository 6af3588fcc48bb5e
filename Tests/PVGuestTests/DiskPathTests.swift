import BlkBack
import Foundation
import Glibc
import NBD
import Testing
import XenBus
import XenHV
import XenStore
import XenTestKit

/// The whole disk path with real parts: qemu-io (NBD client) -> pvguest's NBD
/// server -> blkfront -> blkif ring and grants -> blkback -> a raw image file.
@Suite struct DiskPathTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path

    /// A dom0 with blkback, one guest process (pvguest) with the given disks.
    final class Rig {
        let dom0: Dom0Harness
        let blkback: BlkbackService
        let domain: Hypervisor.CreatedDomain
        let guest: pid_t
        /// vdev -> NBD URI, as pvguest printed them.
        var disks: [String: String] = [:]

        init(disks spec: [(vdev: String, devid: Int, image: String, mode: String)], guestArguments: [String] = [], pages: UInt32 = 4096) throws {
            let build = Dom0Harness.buildDirectory(packageRoot: DiskPathTests.root)
            dom0 = try Dom0Harness(buildDirectory: build)
            blkback = BlkbackService(hypervisor: try dom0.dom0Hypervisor(), xenbus: try dom0.dom0XenStore(),
                                     logger: .init(label: "blkback"))
            try blkback.start()
            domain = try dom0.prepareGuest(name: "pv", pages: pages)
            for d in spec {
                let dev = XenBusDevice(type: "vbd", frontendDomid: XenStore.DomID(domain.domid), devid: d.devid)
                try dom0.xenstore.createDevice(dev, backend: ["params": d.image, "mode": d.mode, "type": "file",
                                                              "dev": d.vdev, "device-type": "disk", "discard-enable": "1"],
                                               frontend: ["virtual-device": "\(d.devid)", "device-type": "disk"])
            }
            let k = try dom0.startKernel(domain, "pvguest", arguments: ["--nbd-dir", dom0.dir] + guestArguments, buildDirectory: build)
            guest = k.pid
            for line in k.lines {
                let w = line.split(separator: " ")
                if w.first == "disk", let uri = w.last { disks[String(w[1])] = String(uri) }
            }
        }

        deinit {
            try? dom0.hypervisor.destroyDomain(domain.domid)  // kills pvguest
            var st: Int32 = 0
            waitpid(guest, &st, 0)
            blkback.stop()
        }
    }

    /// A writable `xvda` of `size` bytes in a directory of its own (removed
    /// with this), served to a pvguest run with `guestArguments`.
    final class OneDisk {
        let dir: String, img: String, rig: Rig
        /// The export's NBD URI, and its socket.
        let uri: String, socket: String

        init(size: off_t, guestArguments: [String], pages: UInt32 = 4096) throws {
            var template = Array("/tmp/pvdisk-XXXXXX".utf8CString)
            dir = String(cString: mkdtemp(&template)!)
            img = DiskPathTests.image(dir, "xvda.img", size: size)
            do {
                rig = try Rig(disks: [("xvda", 51712, img, "w")], guestArguments: guestArguments, pages: pages)
                guard let uri = rig.disks["xvda"], let socket = uri.split(separator: "=").last.map(String.init) else {
                    throw HypervisorError.protocolViolation("pvguest exported \(rig.disks)")
                }
                self.uri = uri
                self.socket = socket
            } catch {
                try? FileManager.default.removeItem(atPath: dir)
                throw error
            }
        }

        deinit { try? FileManager.default.removeItem(atPath: dir) }
    }

    static func image(_ dir: String, _ name: String, size: off_t) -> String {
        let p = dir + "/" + name
        #expect(FileManager.default.createFile(atPath: p, contents: nil))
        truncate(p, size)
        return p
    }

    static func qemuIO(_ uri: String, _ commands: [String], readOnly: Bool = false) throws -> (Int32, String) {
        let r = CommandResult.run("/usr/bin/qemu-io", ["-f", "raw"] + (readOnly ? ["-r"] : []) + [uri] + commands.flatMap { ["-c", $0] })
        return (r.status, r.out + r.err)
    }

    static func bytes(_ path: String, at offset: UInt64, count: Int) throws -> [UInt8] {
        let h = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
        defer { try? h.close() }
        try h.seek(toOffset: offset)
        return [UInt8](try h.read(upToCount: count) ?? Data())
    }

    static func allocatedBlocks(_ path: String) -> Int {
        var st = stat()
        stat(path, &st)
        return Int(st.st_blocks)
    }

    @Test func qemuIOWritesLandInTheImageAndReadBack() throws {
        var template = Array("/tmp/pvdisk-XXXXXX".utf8CString)
        let dir = String(cString: mkdtemp(&template)!)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let img = Self.image(dir, "xvda.img", size: 64 << 20)
        let ro = Self.image(dir, "xvdb.img", size: 8 << 20)
        let rig = try Rig(disks: [("xvda", 51712, img, "w"), ("xvdb", 51728, ro, "r")])
        guard let a = rig.disks["xvda"], let b = rig.disks["xvdb"] else {
            Issue.record("pvguest exported \(rig.disks)")
            return
        }

        let (rc, out) = try Self.qemuIO(a, [
            "write -P 0xa5 0 65536",
            "write -P 0x5a 1048576 131072",
            "write -P 0x33 40960000 4096",
            "flush",
            "read -P 0xa5 0 65536",
            "read -P 0x5a 1048576 131072",
            "read -P 0 65536 4096",
        ])
        #expect(rc == 0 && !out.contains("failed") && !out.contains("error"), "\(out)")
        // Each write landed at its offset in the image file.
        #expect(try Self.bytes(img, at: 0, count: 65536) == [UInt8](repeating: 0xA5, count: 65536))
        #expect(try Self.bytes(img, at: 1_048_576, count: 131_072) == [UInt8](repeating: 0x5A, count: 131_072))
        #expect(try Self.bytes(img, at: 40_960_000, count: 4096) == [UInt8](repeating: 0x33, count: 4096))
        #expect(try Self.bytes(img, at: 65536, count: 4096) == [UInt8](repeating: 0, count: 4096))

        // Discard punches a hole: the image's allocated blocks shrink.
        let (rc2, out2) = try Self.qemuIO(a, ["write -P 0x77 8388608 2097152", "flush"])
        #expect(rc2 == 0, "\(out2)")
        let before = Self.allocatedBlocks(img)
        let (rc3, out3) = try Self.qemuIO(a, ["discard 8388608 2097152", "flush", "read -P 0 8388608 2097152"])
        #expect(rc3 == 0 && !out3.contains("failed"), "\(out3)")
        #expect(Self.allocatedBlocks(img) <= before - 2097152 / 512, "blocks \(before) -> \(Self.allocatedBlocks(img))")

        // Write-zeroes (NBD_CMD_WRITE_ZEROES, zeros written through the ring) across 1 MiB chunks.
        let (rc6, out6) = try Self.qemuIO(a, ["write -P 0x66 16777216 3145728", "write -z 16781312 2097152", "flush"])
        #expect(rc6 == 0 && !out6.contains("failed"), "\(out6)")
        #expect(try Self.bytes(img, at: 16_781_312, count: 2_097_152) == [UInt8](repeating: 0, count: 2_097_152))
        #expect(try Self.bytes(img, at: 16_777_216, count: 4096) == [UInt8](repeating: 0x66, count: 4096))
        #expect(try Self.bytes(img, at: 18_878_464, count: 1_044_480) == [UInt8](repeating: 0x66, count: 1_044_480))

        // A read-only disk reads, and refuses writes with an error.
        let (rc4, out4) = try Self.qemuIO(b, ["read -P 0 0 4096"], readOnly: true)
        #expect(rc4 == 0, "\(out4)")
        let (rc5, out5) = try Self.qemuIO(b, ["write -P 1 0 4096"])
        #expect(rc5 != 0 && out5.contains("Permission denied"), "\(out5)")
        #expect(try Self.bytes(ro, at: 0, count: 4096) == [UInt8](repeating: 0, count: 4096))
        // A flush of a read-only disk has nothing to make durable: it succeeds
        // (blkback refuses FLUSH_DISKCACHE there, as Linux does; blkfront does not send it).
        if let socket = b.split(separator: "=").last.map(String.init) {
            let client = try NBDClient(socket: socket, timeoutSeconds: 20)
            #expect(throws: Never.self) { try client.flush() }
        }
    }

    /// FUA writes from several NBD connections, more than the ring has slots:
    /// each one's cache flush waits for a slot, and is not submitted from the
    /// completion path that frees them (it would wait for itself there).
    /// Online resize reaches the guest's export: an image grown under the
    /// connected disk is the new size for NBD clients connecting after
    /// (blkfront re-reads `sectors` on the backend's state event).
    @Test func aGrownImageIsTheExportsNewSize() throws {
        let d = try OneDisk(size: 8 << 20, guestArguments: [])
        #expect(try NBDClient(socket: d.socket, timeoutSeconds: 10).size == 8 << 20)
        #expect(truncate(d.img, 24 << 20) == 0)
        #expect(eventually(seconds: 10, every: 500) { (try? NBDClient(socket: d.socket, timeoutSeconds: 10))?.size == 24 << 20 },
                "the export kept its old size")
        let (rc, out) = try Self.qemuIO(d.uri, ["write -P 0x7e 20M 4096", "read -P 0x7e 20M 4096"])
        #expect(rc == 0 && !out.contains("error"), "\(out)")
    }

    /// Two disks whose backends give the same name (`dev`, which the backend
    /// directory holds): each gets a socket of its own, the second under its
    /// device id, and each export reaches its own image. Before, the second
    /// socket replaced the first, so the first disk's clients wrote to the
    /// second's backend.
    @Test func twoDisksNamedAlikeKeepTheirOwnExports() throws {
        var template = Array("/tmp/pvdisk-XXXXXX".utf8CString)
        let dir = String(cString: mkdtemp(&template)!)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let images = [Self.image(dir, "one.img", size: 8 << 20), Self.image(dir, "two.img", size: 8 << 20)]
        let rig = try Rig(disks: [("xvda", 51712, images[0], "w"), ("xvda", 51728, images[1], "w")])
        #expect(Set(rig.disks.keys).count == 2 && rig.disks.keys.contains("xvda"), "\(rig.disks)")
        #expect(Set(rig.disks.values).count == 2)
        let patterns: [UInt8] = [0x11, 0x22]
        for ((_, uri), p) in zip(rig.disks.sorted(by: { $0.key < $1.key }), patterns) {
            let (rc, out) = try Self.qemuIO(uri, ["write -P \(p) 0 4096", "flush"])
            #expect(rc == 0, "\(out)")
        }
        // Each image holds one export's pattern throughout (as sets of byte values).
        let held = try images.map { Set(try Self.bytes($0, at: 0, count: 4096)) }
        #expect(Set(held) == Set(patterns.map { Set([$0]) }), "each image got one export's write")
    }

    @Test func fuaWritesPastTheRingsSlotsAllComplete() throws {
        // One page of ring: 32 slots against 8 connections of 16 requests each.
        let disk = try OneDisk(size: 16 << 20, guestArguments: ["--ring-page-order", "0"])
        let (img, socket) = (disk.img, disk.socket)
        let clients = try (0..<8).map { _ in try NBDClient(socket: socket, timeoutSeconds: 20) }
        let perClient = 40
        for (c, client) in clients.enumerated() {
            for i in 0..<perClient {
                let block = c * perClient + i
                try client.send(type: NBDClient.Command.write.rawValue, flags: 1, handle: UInt64(block),
                                offset: UInt64(block) * 4096, length: 4096, data: [UInt8](repeating: UInt8(block & 0xFF), count: 4096))
            }
        }
        for client in clients {
            for _ in 0..<perClient {
                let r = try client.reply()
                #expect(r.error == 0, "write \(r.handle): error \(r.error)")
            }
        }
        for block in [0, 39, 40, 319] {
            #expect(try Self.bytes(img, at: UInt64(block) * 4096, count: 4096) == [UInt8](repeating: UInt8(block & 0xFF), count: 4096))
        }
    }

    /// Large write-zeroes beside large writes from several connections, more
    /// than the ring has slots: every part is submitted from the connection's
    /// own thread, never from the completion path (which would wait there
    /// for a slot only it frees), so all complete, and the bytes are right.
    @Test func writeZeroesPastTheRingsSlotsAllComplete() throws {
        // One page of ring: 32 slots; a 2 MiB request is 16 parts of 128 KiB.
        let disk = try OneDisk(size: 64 << 20, guestArguments: ["--ring-page-order", "0"])
        let (img, socket) = (disk.img, disk.socket)
        let mib: UInt64 = 1 << 20
        let clients = try (0..<4).map { _ in try NBDClient(socket: socket, timeoutSeconds: 20) }
        // Client c owns 16 MiB at c * 16 MiB: 2 MiB written with a pattern, then 2 MiB zeroed, four times.
        for (c, client) in clients.enumerated() {
            for i in 0..<4 {
                let base = UInt64(c) * 16 * mib + UInt64(i) * 4 * mib
                try client.send(type: NBDClient.Command.write.rawValue, handle: UInt64(2 * i), offset: base,
                                length: UInt32(2 * mib), data: [UInt8](repeating: UInt8(0x40 + c), count: Int(2 * mib)))
                try client.send(type: NBDClient.Command.writeZeroes.rawValue, flags: i == 3 ? 1 : 0, handle: UInt64(2 * i + 1),
                                offset: base + 2 * mib, length: UInt32(2 * mib))
            }
        }
        for client in clients {
            for _ in 0..<8 {
                let r = try client.reply()
                #expect(r.error == 0, "request \(r.handle): error \(r.error)")
            }
        }
        // The image started as zeros: zeros over data, once more.
        try clients[0].write([UInt8](repeating: 0x99, count: 4096), at: 2 * mib)
        try clients[0].send(type: NBDClient.Command.writeZeroes.rawValue, handle: 99, offset: 2 * mib, length: 4096)
        #expect(try clients[0].reply().error == 0)
        for c in 0..<4 {
            for i in 0..<4 {
                let base = UInt64(c) * 16 * mib + UInt64(i) * 4 * mib
                #expect(try Self.bytes(img, at: base + 2 * mib - 4096, count: 4096) == [UInt8](repeating: UInt8(0x40 + c), count: 4096))
                #expect(try Self.bytes(img, at: base + 2 * mib, count: Int(2 * mib)).allSatisfy { $0 == 0 })
            }
        }
    }

    /// Linux's xen_blkif_max_segments: with 256 segments per request a 1 MiB
    /// write is one indirect ring request; at the default 32 it is eight of
    /// 128 KiB. Either way the bytes land where they were written.
    @Test(arguments: [(32, 8), (256, 1)])
    func indirectSegmentsSetTheLargestRingRequest(segments: Int, requests: UInt64) throws {
        // Ring order 0 (32 slots a queue) and 160 MiB: each queue's slots of 257 pages fit in half of it.
        let disk = try OneDisk(size: 16 << 20, guestArguments: ["--ring-page-order", "0", "--blk-indirect-segments", "\(segments)"],
                               pages: 40960)
        let (img, rig, a) = (disk.img, disk.rig, disk.uri)
        func written() -> (requests: UInt64, sectors: UInt64) {
            rig.blkback.withDevices { d in
                let s = d.values.first?.stats
                return (s?.writeRequests ?? 0, s?.sectorsWritten ?? 0)
            }
        }
        let before = written()
        let (rc, out) = try Self.qemuIO(a, ["write -P 0xc3 2097152 1048576"])
        #expect(rc == 0 && !out.contains("failed"), "\(out)")
        let after = written()
        #expect(after.requests - before.requests == requests, "write requests \(before.requests) -> \(after.requests)")
        #expect(after.sectors - before.sectors == 2048)
        #expect(try Self.bytes(img, at: 2_097_152, count: 1_048_576) == [UInt8](repeating: 0xC3, count: 1_048_576))
        let (rc2, out2) = try Self.qemuIO(a, ["read -P 0xc3 2097152 1048576", "read -P 0 1048576 1048576"])
        #expect(rc2 == 0 && !out2.contains("failed"), "\(out2)")
    }

    @Test func pvguestRefusesAnIndirectSegmentCountOutOfRange() throws {
        let build = Dom0Harness.buildDirectory(packageRoot: Self.root)
        for bad in ["10", "513", "x"] {
            let r = CommandResult.run(build + "/pvguest", ["--blk-indirect-segments", bad])
            #expect(r.status != 0 && r.err.contains("--blk-indirect-segments"), "\(bad): \(r.err)")
        }
    }
}
