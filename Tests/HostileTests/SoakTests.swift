import BlkBack
import BlkFrontKit
import Foundation
import Glibc
import Synchronization
import Testing
import XenBus
import XenHV
import XenRing
import XenStore
import XenTestKit

extension Hostile {
    /// A bounded soak (XEN_SOAK_SECONDS, default 4): guests attaching and
    /// detaching disks in a loop, each attach writing checksummed blocks and
    /// flushing. At the end no acknowledged and flushed write is lost, every
    /// ring grant is free again, dom0 holds as many descriptors as after the
    /// first attach, and none of a domain's once it died.
    @Suite struct SoakTests {
        static var seconds: Double {
            ProcessInfo.processInfo.environment["XEN_SOAK_SECONDS"].flatMap(Double.init) ?? 4
        }

        @Test func disksAttachedAndDetachedInALoopLoseNoFlushedWrite() throws {
            let d = try HostileDom0()
            let guests = try (0..<3).map { try d.guest("soak\($0)", pages: 2048) }
            // Each guest's image exists before the count: it persists across attaches.
            for g in guests { _ = try XenBusDisk.create(d.s, guest: g, bytes: 2 << 20); try d.s.xenstore.destroyDevice(
                XenBusDevice(type: "vbd", frontendDomid: XenStore.DomID(g.domid), devid: 51712)) }
            _ = eventually(seconds: 10, every: 1) { d.blkback.deviceNames.isEmpty }
            // Descriptors of each domain's shared objects (memfds named after the domain).
            func objectsOf(_ g: Dom0Harness.Guest) -> Int { openDescriptors().values.filter { $0.contains("xen-\(d.s.xenhvPID)-d\(g.domid)-") }.count }
            let coldObjects = guests.map(objectsOf)
            // One attach per guest first: dom0 keeps each live domain's memory, grant
            // table and private area (and two eventfds) open from its first map on.
            for g in guests { try XenBusDisk(d.s, guest: g, bytes: 2 << 20, slot: 9).detach(d.s, backend: d.blkback) }
            // Other suites open and close descriptors concurrently: count the ones that
            // are this dom0's (its hypervisor's memfds, its images and sockets).
            func ours() -> [Int32: String] {
                openDescriptors().filter { $0.value.contains("xen-\(d.s.xenhvPID)-") || $0.value.hasPrefix(d.s.dir) }
            }
            let before = ours()
            let fdsBefore = before.count
            let deadline = Date().addingTimeInterval(Self.seconds)
            let cyclesDone = Atomic<Int>(0)
            let problems = Mutex<[String]>([])
            // Block -> the seed of the last acknowledged, flushed write, per guest.
            let acknowledged = Mutex<[[Int: Int]]>(Array(repeating: [:], count: guests.count))
            var threads: [TestThread] = []
            for (gi, g) in guests.enumerated() {
                threads.append(TestThread {
                    var cycle = 0
                    while Date() < deadline {
                        do {
                            // Fronts reuse one of 8 frame/ref slots: detach must have released them.
                            let disk = try XenBusDisk(d.s, guest: g, bytes: 2 << 20, slot: cycle % 8)
                            let buf = try disk.front.makeBuffer(pages: 1)
                            var written: [Int: Int] = [:]
                            for k in 0..<8 {
                                let block = (cycle * 5 + k * 3) % 128, seed = gi * 1_000_000 + cycle * 100 + k
                                try disk.front.fill(buf, with: blockPattern(seed))
                                let w = try disk.front.roundTrip(disk.front.rwRequest(BlkifOp.write, sector: UInt64(block * 8), buffer: buf, bytes: 4096))
                                if w.status == 0 { written[block] = seed } else { problems.withLock { $0.append("guest \(gi) write \(w.status)") } }
                            }
                            guard try disk.front.flush() == 0 else { throw BlkBackError.badConfiguration("flush failed") }
                            acknowledged.withLock { for (b, s) in written { $0[gi][b] = s } }
                            // Read back one earlier block of this guest.
                            if let (b, s) = acknowledged.withLock({ $0[gi].randomElement() }) {
                                let r = try disk.front.roundTrip(disk.front.rwRequest(BlkifOp.read, sector: UInt64(b * 8), buffer: buf, bytes: 4096))
                                let back = try disk.front.contents(buf, count: 4096)
                                if r.status != 0 || back != blockPattern(s) {
                                    problems.withLock { $0.append("guest \(gi) cycle \(cycle): block \(b) wrong") }
                                }
                            }
                            try disk.detach(d.s, backend: d.blkback)
                            for r in disk.front.queues[0].ringRefs where !disk.front.endAccess(r) {
                                problems.withLock { $0.append("guest \(gi) cycle \(cycle): ring ref \(r) still mapped") }
                            }
                            cycle += 1
                            cyclesDone.add(1, ordering: .relaxed)
                        } catch {
                            problems.withLock { $0.append("guest \(gi) cycle \(cycle): \(error)") }
                            return
                        }
                    }
                })
            }
            for t in threads { t.join() }
            #expect(problems.withLock { $0 }.isEmpty, "\(problems.withLock { $0 })")
            #expect(cyclesDone.load(ordering: .relaxed) >= guests.count)
            // Every acknowledged, flushed block is in its image.
            for (gi, g) in guests.enumerated() {
                let image = d.s.dir + "/disk-\(g.domid)-51712.img"
                let fd = open(image, O_RDONLY | O_CLOEXEC)
                defer { close(fd) }
                for (b, s) in acknowledged.withLock({ $0[gi] }) {
                    var got = [UInt8](repeating: 0, count: 4096)
                    _ = got.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 4096, off_t(b * 4096)) }
                    #expect(got == blockPattern(s), "guest \(gi) block \(b) lost")
                }
            }
            #expect(d.blkback.deviceNames.isEmpty)
            let after = ours()
            let fdsAfter = after.count
            let extra = after.filter { before[$0.key] != $0.value }.map { "\($0.key) \($0.value)" }.sorted()
            #expect(fdsAfter == fdsBefore, "descriptors \(fdsBefore) -> \(fdsAfter): \(extra)")
            // Domains gone: at its next map (another guest's disk), dom0 lets go of
            // what it held for them (Hypervisor evicts dead domains lazily).
            #expect(zip(guests.map(objectsOf), coldObjects).allSatisfy { $0 > $1 })
            for g in guests { try d.s.hypervisor.destroyDomain(g.domid) }
            let late = try d.guest("late")
            try XenBusDisk(d.s, guest: late, bytes: 1 << 20).detach(d.s, backend: d.blkback)
            let left = guests.map(objectsOf)
            #expect(zip(left, coldObjects).allSatisfy { $0 <= $1 }, "dead domains' objects still open: \(left) vs \(coldObjects)")
            print("soak: \(cyclesDone.load(ordering: .relaxed)) attach/detach cycles over \(guests.count) guests in \(Self.seconds) s; descriptors \(fdsBefore) -> \(fdsAfter)")
        }
    }
}
