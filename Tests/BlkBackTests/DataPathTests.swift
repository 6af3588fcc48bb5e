@testable import BlkBack
import BlkFrontKit
import CXen
import Foundation
import Glibc
import Logging
import Testing
import XenHV
import XenRing
import XenTestKit

extension BlkBackIntegration {
    /// The data path end to end: a real xenhv, this process as both dom0 (the
    /// backend) and the guest (the frontend test kit), and an image file checked
    /// with plain pread.
    @Suite struct DataPathTests {
        static let mib = 1 << 20

        /// A connected single-disk setup.
        struct Setup<R: BlkifRingABI> where R.Request: BitwiseCopyable, R.Response: BitwiseCopyable {
            let f: BlkFixture
            let image: String
            let device: VirtualBlockDevice
            let front: BlkFront<R>
        }

        static func setup<R: BlkifRingABI>(
            _ abi: R.Type = BlkifRing.self, bytes: Int = 4 << 20, pattern: Int = 0, readOnly: Bool = false,
            queues: Int = 1, order: Int = 0, persistent: Bool = true, limit: Int = BlkifLimits.persistentGrantsPerRing,
            directIO: Bool = true, sectorSize: Int? = nil, budget: MappingBudget = .process,
            purgeMilliseconds: Int = 100, logger: Logger = quietLogger
        ) throws -> Setup<R> where R.Request: BitwiseCopyable, R.Response: BitwiseCopyable {
            let f = try BlkFixture()
            let image = try f.image(bytes: bytes, pattern: pattern)
            var opts = BackingOptions(path: image, readOnly: readOnly, directIO: directIO)
            opts.sectorSize = sectorSize
            let dev = try VirtualBlockDevice(name: "vbd-test", backing: opts, maxQueues: 4, mappingBudget: budget,
                                             purgeIntervalMilliseconds: purgeMilliseconds, logger: logger)
            let g = try f.guest()
            let front = try BlkFront<R>(guest: g, queues: queues, ringPageOrder: order)
            try dev.connect(hypervisor: f.dom0, frontend: front.config(persistent: persistent, limit: limit))
            return Setup(f: f, image: image, device: dev, front: front)
        }

        @Test func bytesWrittenLandAtTheRightOffsetsAndReadBackEqual() throws {
            let s = try Self.setup(pattern: 64 << 10)
            #expect(s.device.usesDirectIO)
            #expect(s.device.sectors == 8192)
            let a = pattern(4096, seed: 1), b = pattern(512, seed: 2), c = pattern(11 * 4096, seed: 3)
            #expect(try s.front.write(sector: 8, a) == 0)
            #expect(try s.front.write(sector: 8191, b) == 0)  // the last sector
            #expect(try s.front.write(sector: 1000, c) == 0)  // 11 direct segments
            #expect(fileBytes(s.image, offset: 8 * 512, count: 4096) == a)
            #expect(fileBytes(s.image, offset: 8191 * 512, count: 512) == b)
            #expect(fileBytes(s.image, offset: 1000 * 512, count: c.count) == c)
            // Neighbours untouched: the pattern before sector 8 is still there.
            let before = fileBytes(s.image, offset: 0, count: 4096)
            #expect(before == (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 9) })
            #expect(try s.front.read(sector: 8, bytes: 4096) == (0, a))
            #expect(try s.front.read(sector: 8191, bytes: 512) == (0, b))
            #expect(try s.front.read(sector: 1000, bytes: c.count) == (0, c))
            let st = s.device.stats
            #expect(st.writeRequests == 3 && st.readRequests == 3)
            #expect(st.sectorsWritten == 8 + 1 + 88 && st.sectorsRead == 8 + 1 + 88)
            #expect(st.errors == 0)
        }

        @Test func partialSegmentsUseFirstAndLastSect() throws {
            let s = try Self.setup()
            let buf = try s.front.makeBuffer(pages: 2)
            let data = pattern(8192, seed: 9)
            try s.front.fill(buf, with: data)
            // Sectors 2...5 of page 0 and 0...1 of page 1: 6 sectors of the buffer.
            var q = BlkRequest()
            q.operation = BlkifOp.write
            q.id = 77
            q.sector = 100
            q.nrSegments = 2
            q.setDirectSegment(0, BlkSegment(gref: buf.refs[0], firstSect: 2, lastSect: 5))
            q.setDirectSegment(1, BlkSegment(gref: buf.refs[1], firstSect: 0, lastSect: 1))
            #expect(try s.front.roundTrip(q).status == 0)
            #expect(fileBytes(s.image, offset: 100 * 512, count: 2048) == Array(data[1024..<3072]))
            #expect(fileBytes(s.image, offset: 104 * 512, count: 1024) == Array(data[4096..<5120]))
        }

        @Test func indirectReadAndWriteUpTo256Segments() throws {
            let s = try Self.setup(bytes: 8 << 20)
            let big = pattern(256 * 4096, seed: 4)  // 1 MiB, 256 segments
            #expect(try s.front.write(sector: 2048, big) == 0)
            #expect(fileBytes(s.image, offset: 2048 * 512, count: big.count) == big)
            #expect(try s.front.read(sector: 2048, bytes: big.count) == (0, big))
            let small = pattern(3 * 4096, seed: 5)  // indirect with only 3 segments
            #expect(try s.front.write(sector: 16, small, forceIndirect: true) == 0)
            #expect(try s.front.read(sector: 16, bytes: small.count, forceIndirect: true) == (0, small))
            #expect(fileBytes(s.image, offset: 16 * 512, count: small.count) == small)
        }

        @Test func x86_32FrontendOnAMultiPageRing() throws {
            let s = try Self.setup(BlkifX86_32Ring.self, order: 2)
            #expect(s.front.queues[0].ring.size == 128)  // 4 pages of 108-byte slots
            let a = pattern(5 * 4096, seed: 6)
            #expect(try s.front.write(sector: 40, a) == 0)
            #expect(fileBytes(s.image, offset: 40 * 512, count: a.count) == a)
            #expect(try s.front.read(sector: 40, bytes: a.count) == (0, a))
            let big = pattern(40 * 4096, seed: 7)
            #expect(try s.front.write(sector: 400, big) == 0)  // indirect in the i386 layout
            #expect(try s.front.read(sector: 400, bytes: big.count) == (0, big))
            #expect(try s.front.discard(sector: 400, sectors: 8) == 0)
            #expect(try s.front.flush() == 0)
        }

        @Test func manyRequestsInFlightOnAnOrder4Ring() throws {
            let s = try Self.setup(bytes: 16 << 20, order: 4)
            #expect(s.front.queues[0].ring.size == 512)
            let n = 300
            var bufs: [BlkFront<BlkifRing>.Buffer] = []
            var reqs: [BlkRequest] = []
            for i in 0..<n {
                let b = try s.front.makeBuffer(pages: 1)
                try s.front.fill(b, with: pattern(4096, seed: UInt8(truncatingIfNeeded: i)))
                bufs.append(b)
                reqs.append(try s.front.rwRequest(BlkifOp.write, sector: UInt64(i) * 8, buffer: b, bytes: 4096))
            }
            try s.front.pushBatch(reqs)
            var seen = Set<UInt64>()
            for _ in 0..<n {
                let r = try s.front.waitResponse()
                #expect(r.status == 0)
                seen.insert(r.id)
            }
            #expect(seen == Set(reqs.map(\.id)))
            for i in stride(from: 0, to: n, by: 37) {
                #expect(fileBytes(s.image, offset: i * 4096, count: 4096) == pattern(4096, seed: UInt8(truncatingIfNeeded: i)))
            }
        }

        /// A request that waits for bounce pages while the ring's first request
        /// holds them all, when io_submit then refuses that first one: its pages
        /// come free with nothing in flight to wake the queue, and the guest
        /// has no reason to kick again. The waiting request goes at once.
        @Test func aRequestWaitingForBouncePagesGoesWhenIOSubmitRefusedTheirHolder() throws {
            let s = try Self.setup(bytes: 4 << 20, pattern: 1 << 20, persistent: false)
            let expected = fileBytes(s.image, offset: 0, count: 4096)
            let big = try s.front.makeBuffer(pages: 256, indirect: true)
            let small = try s.front.makeBuffer(pages: 1)
            let holder = try s.front.rwRequest(BlkifOp.read, sector: 0, buffer: big, bytes: 1 << 20, forceIndirect: true)
            let waiter = try s.front.rwRequest(BlkifOp.read, sector: 0, buffer: small, bytes: 4096)
            s.device.disk.submitRefusalsForTesting.store(1, ordering: .relaxed)
            try s.front.pushBatch([holder, waiter])
            var status: [UInt64: Int16] = [:]
            for _ in 0..<2 {
                let r = try s.front.waitResponse(timeoutMs: 5_000)
                status[r.id] = r.status
            }
            #expect(status == [holder.id: BlkifStatus.error.rawValue, waiter.id: 0])
            #expect(s.device.stats.outOfRequests == 1, "the second request never waited for bounce pages")
            #expect(try s.front.contents(small, count: 4096) == expected)
        }

        /// FLUSH_DISKCACHE drains: its response comes after every earlier write's.
        @Test func flushAnswersOnlyAfterEarlierWritesCompleted() throws {
            let s = try Self.setup(bytes: 8 << 20, order: 1)
            var reqs: [BlkRequest] = []
            for i in 0..<20 {
                let b = try s.front.makeBuffer(pages: 16)
                try s.front.fill(b, with: pattern(16 * 4096, seed: UInt8(i)))
                reqs.append(try s.front.rwRequest(BlkifOp.write, sector: UInt64(i) * 128, buffer: b, bytes: 16 * 4096))
            }
            var flush = BlkRequest()
            flush.operation = BlkifOp.flushDiskCache
            flush.id = s.front.newID()
            try s.front.pushBatch(reqs + [flush])
            var order: [UInt64] = []
            for _ in 0...reqs.count {
                let r = try s.front.waitResponse()
                #expect(r.status == 0)
                order.append(r.id)
            }
            #expect(order.last == flush.id)
            #expect(s.device.stats.flushRequests == 1)
            for i in 0..<20 {
                #expect(fileBytes(s.image, offset: i * 128 * 512, count: 16 * 4096) == pattern(16 * 4096, seed: UInt8(i)))
            }
        }

        @Test func writeBarrierWithDataIsWritten() throws {
            let s = try Self.setup()
            let b = try s.front.makeBuffer(pages: 1)
            let d = pattern(4096, seed: 11)
            try s.front.fill(b, with: d)
            var q = try s.front.rwRequest(BlkifOp.write, sector: 64, buffer: b, bytes: 4096)
            q.operation = BlkifOp.writeBarrier
            let r = try s.front.roundTrip(q)
            #expect(r.status == 0 && r.operation == BlkifOp.writeBarrier)
            #expect(fileBytes(s.image, offset: 64 * 512, count: 4096) == d)
        }

        /// blkif.h: "All writes issued after the barrier request must not
        /// execute until after the completion of the barrier request." Writes
        /// queued behind a barrier with data are answered after it, though
        /// the barrier's own write (RWF_DSYNC) is the slow one.
        @Test func writesBehindABarrierWaitForItsWrite() throws {
            let s = try Self.setup(bytes: 8 << 20, order: 1)
            let b = try s.front.makeBuffer(pages: 8)
            try s.front.fill(b, with: pattern(8 * 4096, seed: 21))
            var barrier = try s.front.rwRequest(BlkifOp.write, sector: 0, buffer: b, bytes: 8 * 4096)
            barrier.operation = BlkifOp.writeBarrier
            var later: [BlkRequest] = []
            for i in 0..<8 {
                let w = try s.front.makeBuffer(pages: 1)
                try s.front.fill(w, with: pattern(4096, seed: UInt8(30 + i)))
                later.append(try s.front.rwRequest(BlkifOp.write, sector: 1024 + UInt64(i) * 8, buffer: w, bytes: 4096))
            }
            try s.front.pushBatch([barrier] + later)
            var order: [UInt64] = []
            for _ in 0...later.count {
                let r = try s.front.waitResponse()
                #expect(r.status == 0)
                order.append(r.id)
            }
            #expect(order.first == barrier.id, "answered before the barrier: \(order.prefix { $0 != barrier.id })")
            #expect(fileBytes(s.image, offset: 0, count: 8 * 4096) == pattern(8 * 4096, seed: 21))
        }

        @Test func discardPunchesAHole() throws {
            let s = try Self.setup(bytes: 8 << 20)
            let data = pattern(2 * Self.mib, seed: 12)
            #expect(try s.front.write(sector: 0, Array(data[..<Self.mib])) == 0)
            #expect(try s.front.write(sector: 2048, Array(data[Self.mib...])) == 0)
            #expect(try s.front.flush() == 0)
            let before = allocatedBytes(s.image)
            #expect(before >= 2 * Self.mib)
            #expect(try s.front.discard(sector: 0, sectors: 2048) == 0)
            let after = allocatedBytes(s.image)
            #expect(after <= before - Self.mib)
            #expect(try s.front.read(sector: 0, bytes: 4096) == (0, [UInt8](repeating: 0, count: 4096)))
            #expect(try s.front.read(sector: 2048, bytes: 4096) == (0, Array(data[Self.mib..<Self.mib + 4096])))
            // Files have no secure erase (discard-secure=0), so the flag is
            // ignored, as blkif.h says and Linux's dispatch_discard_io does:
            // a plain discard, OKAY, and the block is punched.
            #expect(s.device.features.discardSecure == false)
            let beforeSecure = allocatedBytes(s.image)
            #expect(try s.front.discard(sector: 2048, sectors: 8, secure: true) == 0)
            #expect(allocatedBytes(s.image) <= beforeSecure - 4096)
            #expect(try s.front.read(sector: 2048, bytes: 4096) == (0, [UInt8](repeating: 0, count: 4096)))
            #expect(s.device.stats.discardRequests == 2)
        }

        @Test func readOnlyDiskRefusesWritesButServesReads() throws {
            let s = try Self.setup(pattern: 8192, readOnly: true)
            #expect(s.device.readOnly)
            #expect(s.device.features.info == UInt32(VDISK_READONLY))
            #expect(try s.front.write(sector: 0, pattern(4096, seed: 13)) == BlkifStatus.error.rawValue)
            #expect(try s.front.flush() == BlkifStatus.error.rawValue)
            #expect(try s.front.discard(sector: 0, sectors: 8) == BlkifStatus.error.rawValue)
            let expected = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 9) }
            #expect(fileBytes(s.image, offset: 0, count: 4096) == expected)
            #expect(try s.front.read(sector: 0, bytes: 4096) == (0, expected))
            #expect(s.device.stats.errors == 3)
        }

        /// A filesystem that refuses O_DIRECT: the image is opened buffered,
        /// a log line says so, and data still lands where it should.
        @Test func refusedODirectFallsBackToBufferedIOAndLogsIt() throws {
            let f = try BlkFixture()
            let image = try f.image(bytes: 1 << 20)
            let log = CapturedLog()
            Backing.refuseDirectIOForTesting = true
            let dev: VirtualBlockDevice
            do {
                defer { Backing.refuseDirectIOForTesting = false }
                dev = try VirtualBlockDevice(name: "vbd-nodirect", backing: BackingOptions(path: image), logger: log.logger)
            }
            #expect(!dev.usesDirectIO)
            #expect(log.all.contains { $0.hasPrefix("warning") && $0.contains("refuses O_DIRECT") && $0.contains("buffered") })
            let front = try BlkFront<BlkifRing>(guest: try f.guest())
            try dev.connect(hypervisor: f.dom0, frontend: front.config())
            let a = pattern(8192, seed: 15)
            #expect(try front.write(sector: 5, a) == 0)
            #expect(fileBytes(image, offset: 5 * 512, count: a.count) == a)
            #expect(try front.read(sector: 5, bytes: a.count) == (0, a))
            dev.close()
        }

        @Test func bufferedFallbackServesTheSameData() throws {
            let s = try Self.setup(directIO: false)
            #expect(!s.device.usesDirectIO)
            let a = pattern(8192, seed: 14)
            #expect(try s.front.write(sector: 3, a) == 0)
            #expect(fileBytes(s.image, offset: 3 * 512, count: a.count) == a)
            #expect(try s.front.read(sector: 3, bytes: a.count) == (0, a))
        }
    }
}

/// A loop device over an image file: the block-device paths (BLKGETSIZE64,
/// BLKDISCARD, the secure-discard probe), where this machine has loop devices.
func run(_ tool: String, _ args: [String]) -> (status: Int32, output: String) {
    let r = CommandResult.run(tool, args)
    return (r.status, r.out.trimmingCharacters(in: .whitespacesAndNewlines))
}

let loopDevicesAvailable = getuid() == 0 && FileManager.default.fileExists(atPath: "/dev/loop-control")
    && FileManager.default.fileExists(atPath: "/usr/sbin/losetup")

extension BlkBackIntegration {
    @Suite(.enabled(if: loopDevicesAvailable, "needs root and loop devices")) struct BlockDeviceTests {
        @Test func blockDeviceDataDiscardAndResize() throws {
            let f = try BlkFixture()
            let backingFile = try f.image("loop.img", bytes: 8 << 20)
            let attach = run("/usr/sbin/losetup", ["-f", "--show", backingFile])
            guard attach.status == 0, attach.output.hasPrefix("/dev/loop") else {
                print("BlockDeviceTests: no free loop device here (losetup exit \(attach.status)); skipped")
                return
            }
            let dev = attach.output
            defer { _ = run("/usr/sbin/losetup", ["-d", dev]) }
            let vbd = try VirtualBlockDevice(name: "vbd-loop", backing: BackingOptions(path: dev), logger: quietLogger)
            defer { vbd.close() }
            #expect(vbd.sectors == 16384)
            #expect(vbd.features.discard)
            #expect(!vbd.features.discardSecure)  // loop devices have no secure erase
            let front = try BlkFront<BlkifRing>(guest: try f.guest())
            try vbd.connect(hypervisor: f.dom0, frontend: front.config())
            let data = pattern(1 << 20, seed: 90)
            #expect(try front.write(sector: 2048, data) == 0)
            #expect(try front.flush() == 0)
            #expect(fileBytes(backingFile, offset: 2048 * 512, count: data.count) == data)
            #expect(try front.read(sector: 2048, bytes: 4096) == (0, Array(data[..<4096])))
            let before = allocatedBytes(backingFile)
            #expect(try front.discard(sector: 2048, sectors: 2048) == 0)  // BLKDISCARD
            #expect(allocatedBytes(backingFile) <= before - (1 << 19))
            // No secure erase here: the flag is ignored (blkif.h), a plain discard.
            #expect(try front.discard(sector: 0, sectors: 8, secure: true) == 0)
            // Online resize: grow the file, tell the loop driver, then the VBD.
            #expect(truncate(backingFile, 16 << 20) == 0)
            #expect(run("/usr/sbin/losetup", ["-c", dev]).status == 0)
            #expect(try vbd.resize() == 32768)
            let tail = pattern(4096, seed: 91)
            #expect(try front.write(sector: 32760, tail) == 0)
            #expect(try front.read(sector: 32760, bytes: 4096) == (0, tail))
        }

        /// An image file on a filesystem over 4 KiB-sector storage: O_DIRECT
        /// takes only 4096-aligned offsets there (statx STATX_DIOALIGN says
        /// so), and a guest's 512-byte-aligned I/O goes through the buffered
        /// descriptor instead of failing with EINVAL.
        @Test func anImageOnA4KSectorFilesystemServesUnalignedIO() throws {
            let f = try BlkFixture()
            let backingFile = try f.image("fs4k.img", bytes: 64 << 20)
            let attach = run("/usr/sbin/losetup", ["-f", "--show", "-b", "4096", backingFile])
            guard attach.status == 0, attach.output.hasPrefix("/dev/loop") else {
                print("BlockDeviceTests: no free loop device here (losetup exit \(attach.status)); skipped")
                return
            }
            let dev = attach.output
            defer { _ = run("/usr/sbin/losetup", ["-d", dev]) }
            try #require(run("/usr/sbin/mkfs.ext4", ["-q", dev]).status == 0)
            let mnt = f.dir + "/mnt"
            try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
            try #require(run("/usr/bin/mount", [dev, mnt]).status == 0)
            defer { _ = run("/usr/bin/umount", [mnt]) }
            let image = mnt + "/disk.img"
            let fd = open(image, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
            try #require(fd >= 0 && ftruncate(fd, 8 << 20) == 0)
            close(fd)
            let vbd = try VirtualBlockDevice(name: "vbd-4k", backing: BackingOptions(path: image), logger: quietLogger)
            defer { vbd.close() }
            #expect(vbd.usesDirectIO)
            let front = try BlkFront<BlkifRing>(guest: try f.guest())
            try vbd.connect(hypervisor: f.dom0, frontend: front.config())
            let odd = pattern(4096, seed: 92), even = pattern(8192, seed: 93)
            #expect(try front.write(sector: 1, odd) == 0)    // at 512: not for O_DIRECT here
            #expect(try front.write(sector: 64, even) == 0)  // at 32 KiB: straight through O_DIRECT
            #expect(try front.flush() == 0)
            let readOdd = try front.read(sector: 1, bytes: 4096), readEven = try front.read(sector: 64, bytes: 8192)
            #expect(readOdd.0 == 0 && readOdd.1 == odd, "read at 512: status \(readOdd.0)")
            #expect(readEven.0 == 0 && readEven.1 == even, "read at 32 KiB: status \(readEven.0)")
            let landedOdd = fileBytes(image, offset: 512, count: 4096) == odd
            let landedEven = fileBytes(image, offset: 64 * 512, count: 8192) == even
            #expect(landedOdd && landedEven, "in the image: at 512 \(landedOdd), at 32 KiB \(landedEven)")
        }
    }
}
