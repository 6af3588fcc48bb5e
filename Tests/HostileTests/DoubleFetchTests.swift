import BlkBack
import BlkFrontKit
import CXen
import Foundation
import Glibc
import Synchronization
import Testing
import XenBus
import XenHV
import XenRing
import XenStore
import XenTestKit

/// The ring slot of one published request, rewritten by a racing thread.
/// Sound to send: the pointer is into guest memory the test keeps mapped for
/// the racer's whole life, and only the racer writes through it while armed.
struct SlotPointer: @unchecked Sendable {
    var base: UnsafeMutableRawPointer
}

extension Hostile {
    /// XSA-155: a frontend that keeps rewriting a request after publishing it.
    /// Each field flips between the value the request was built with and one
    /// that validation must refuse, so whatever instant blkback copies the
    /// slot at, the copy is either valid (and then exactly the built request's
    /// effect must reach the image) or refused (and nothing may reach it). A
    /// backend that validated one read of the slot and acted on another would
    /// write past the end (the file grows), into a block of a refused request,
    /// or from a grant it never validated.
    @Suite struct DoubleFetchTests {
        @Test func blkifRequestsRewrittenAfterPublishingActOnlyOnValidatedValues() throws {
            let d = try HostileDom0()
            let h = try d.guest("racer"), g = try d.guest("bystander")
            let disk = try XenBusDisk(d.s, guest: h, bytes: 4 << 20)
            let other = try XenBusDisk(d.s, guest: g, bytes: 1 << 20)
            let worker = try DiskWorker(other)
            worker.start()
            let imageSize = disk.imageSize
            let capacity = disk.sectors

            let buf = try disk.front.makeBuffer(pages: 1)
            // Fields of blkif_request as the C header lays them out.
            typealias Req = blkif_request
            let opOff = MemoryLayout<Req>.offset(of: \.operation)!
            let nrOff = MemoryLayout<Req>.offset(of: \.nr_segments)!
            let sectorOff = MemoryLayout<Req>.offset(of: \.sector_number)!
            let segOff = MemoryLayout<Req>.offset(of: \.seg)!
            // A ref granted to another domain: never mappable by dom0.
            let foreignRef: GrantRef = 7000
            h.hypervisor.grantTable!.grantAccess(foreignRef, to: g.domid, frame: buf.firstFrame, readOnly: false)
            let goodRef = buf.refs[0]
            let badSector = capacity + 8

            let ring = SlotPointer(base: disk.front.ringRegion().unsafeBaseAddress)
            let generation = Atomic<Int>(0), acked = Atomic<Int>(0), quit = Atomic<Bool>(false), started = Atomic<Int>(0)
            let target = Atomic<Int>(0)  // slot offset | (request index << 32)
            let flips = Atomic<Int>(0)
            let racer = TestThread {
                var seen = 0
                var x: UInt64 = 0x9E37_79B9_7F4A_7C15
                var n = 0
                while !quit.load(ordering: .acquiring) {
                    let gen = generation.load(ordering: .acquiring)
                    if gen == seen { continue }
                    let t = target.load(ordering: .acquiring)
                    let slot = ring.base + (t & 0xFFFF_FFFF)
                    let idx = UInt32(truncatingIfNeeded: t >> 32)
                    let good = (sector: UInt64(8 + 8 * Int(idx)), gref: goodRef)
                    let rspProd = (ring.base + 8).assumingMemoryBound(to: UInt32.self)
                    while cxen_load_acquire_u32(rspProd) == idx && !quit.load(ordering: .relaxed) {
                        x ^= x << 13; x ^= x >> 7; x ^= x << 17
                        // Each field is the bad value about one time in seven.
                        let bad = { (k: UInt64) in (x >> (k * 3)) & 7 == 0 }
                        cxen_store_release_u8((slot + opOff).assumingMemoryBound(to: UInt8.self), bad(0) ? 99 : UInt8(BLKIF_OP_WRITE))
                        cxen_store_release_u8((slot + nrOff).assumingMemoryBound(to: UInt8.self), bad(1) ? 200 : 1)
                        cxen_store_release_u64((slot + sectorOff).assumingMemoryBound(to: UInt64.self), bad(2) ? badSector : good.sector)
                        cxen_store_release_u32((slot + segOff).assumingMemoryBound(to: UInt32.self), bad(3) ? foreignRef : good.gref)
                        cxen_store_release_u8((slot + segOff + 5).assumingMemoryBound(to: UInt8.self), bad(4) ? 0xFF : 7)
                        n += 1
                        started.store(gen, ordering: .relaxed)
                    }
                    seen = gen
                    acked.store(gen, ordering: .releasing)
                }
                flips.store(n, ordering: .releasing)
            }

            let requests = 400
            var statuses: [Int16] = []
            for i in 0..<requests {
                try disk.front.fill(buf, with: blockPattern(i))
                let idx = disk.front.queues[0].ring.reqProdPvt
                var q = try disk.front.rwRequest(BlkifOp.write, sector: UInt64(8 + 8 * i), buffer: buf, bytes: 4096)
                q.id = UInt64(i) << 16
                #expect(disk.front.enqueue(q))
                #expect(idx == UInt32(i))  // one request in flight: slot index = request index = rsp_prod before
                target.store(disk.slotOffset(idx) | (Int(idx) << 32), ordering: .releasing)
                generation.store(i + 1, ordering: .releasing)
                // Publish only once the racer is rewriting the slot.
                #expect(eventually(seconds: 10, every: 1) { started.load(ordering: .relaxed) == i + 1 })
                try disk.front.publish()
                // The racer rewrites bytes 0-1 (the response's id) too: only the status is the backend's.
                let r = try disk.front.waitResponse()
                statuses.append(r.status)
                #expect(eventually(seconds: 10, every: 1) { acked.load(ordering: .acquiring) == i + 1 })
            }
            quit.store(true, ordering: .releasing)
            racer.join()

            // Every request: OKAY and exactly its 4 KiB at its block, or refused and its block untouched.
            let image = disk.imageBytes(offset: 0, count: imageSize)
            #expect(disk.imageSize == imageSize, "a write went past the end of the disk")
            var ok = 0, refused = 0, wrong: [Int] = []
            for i in 0..<requests {
                let block = Array(image[(8 + 8 * i) * 512..<(16 + 8 * i) * 512])
                if statuses[i] == 0 {
                    ok += 1
                    if block != blockPattern(i) { wrong.append(i) }
                } else {
                    refused += 1
                    if block.contains(where: { $0 != 0 }) { wrong.append(i) }
                    #expect(statuses[i] == BlkifStatus.error.rawValue || statuses[i] == BlkifStatus.notSupported.rawValue)
                }
            }
            #expect(wrong.isEmpty, "requests whose effect was not the validated one: \(wrong.prefix(10))")
            // Nothing outside the blocks the requests named.
            let usedEnd: Int = (8 + 8 * requests) * 512
            let head: ArraySlice<UInt8> = image[0..<4096], tail: ArraySlice<UInt8> = image[usedEnd...]
            #expect(!head.contains { $0 != 0 })
            #expect(!tail.contains { $0 != 0 })
            // The race really happened both ways.
            #expect(ok > 0 && refused > 0, "ok \(ok), refused \(refused), flips \(flips.load(ordering: .acquiring))")

            // The ring still serves well-formed requests, with zeroed padding.
            try disk.front.fill(buf, with: blockPattern(9999))
            let last = try disk.answer(try disk.front.rwRequest(BlkifOp.write, sector: 0, buffer: buf, bytes: 4096))
            #expect(last.status == 0 && last.paddingZero)
            #expect(disk.imageBytes(offset: 0, count: 4096) == blockPattern(9999))
            #expect(d.device(disk.dev)?.stoppedQueues.isEmpty == true)

            let w = worker.stop()
            #expect(w.failures.isEmpty, "\(w.failures)")
            #expect(w.ops > 0)
            print("double fetch: \(ok) acted on, \(refused) refused, \(flips.load(ordering: .acquiring)) rewrites; bystander \(w.ops) round trips")
        }
        /// The same with INDIRECT requests: the racer rewrites the slot's
        /// nr_segments and sector and, in the granted indirect page, segment
        /// grant refs and last_sect, after publishing. blkback copies the
        /// indirect page once too (its segments are validated on the copy).
        @Test func indirectSegmentsRewrittenAfterPublishingActOnlyOnValidatedValues() throws {
            let d = try HostileDom0()
            let h = try d.guest("racer", pages: 2048), g = try d.guest("bystander")
            let disk = try XenBusDisk(d.s, guest: h, bytes: 8 << 20)
            let worker = try DiskWorker(try XenBusDisk(d.s, guest: g, bytes: 1 << 20))
            worker.start()
            let imageSize = disk.imageSize
            let pages = 12, sectorsPer = 8 * 12
            let buf = try disk.front.makeBuffer(pages: pages, indirect: true)
            typealias Req = blkif_request_indirect
            let nrOff = MemoryLayout<Req>.offset(of: \.nr_segments)!
            let sectorOff = MemoryLayout<Req>.offset(of: \.sector_number)!
            let foreignRef: GrantRef = 7000
            h.hypervisor.grantTable!.grantAccess(foreignRef, to: g.domid, frame: buf.firstFrame, readOnly: false)
            let badSector = disk.sectors + 8
            let ring = SlotPointer(base: disk.front.ringRegion().unsafeBaseAddress)
            let indirect = SlotPointer(base: disk.front.memory.unsafeBaseAddress + Int(buf.indirectFrames[0]) * 4096)
            let refs = buf.refs
            let generation = Atomic<Int>(0), acked = Atomic<Int>(0), quit = Atomic<Bool>(false), started = Atomic<Int>(0)
            let target = Atomic<Int>(0)
            let racer = TestThread {
                var seen = 0
                var x: UInt64 = 0x2545_F491_4F6C_DD1D
                while !quit.load(ordering: .acquiring) {
                    let gen = generation.load(ordering: .acquiring)
                    if gen == seen { continue }
                    let t = target.load(ordering: .acquiring)
                    let slot = ring.base + (t & 0xFFFF_FFFF)
                    let idx = UInt32(truncatingIfNeeded: t >> 32)
                    let goodSector = UInt64(8 + sectorsPer * Int(idx))
                    let rspProd = (ring.base + 8).assumingMemoryBound(to: UInt32.self)
                    while cxen_load_acquire_u32(rspProd) == idx && !quit.load(ordering: .relaxed) {
                        x ^= x << 13; x ^= x >> 7; x ^= x << 17
                        let bad = { (k: UInt64) in (x >> (k * 3)) & 15 == 0 }
                        cxen_store_release_u16((slot + nrOff).assumingMemoryBound(to: UInt16.self), bad(0) ? 300 : UInt16(pages))
                        cxen_store_release_u64((slot + sectorOff).assumingMemoryBound(to: UInt64.self), bad(1) ? badSector : goodSector)
                        let k = Int((x >> 20) % UInt64(pages))
                        let seg = indirect.base + k * 8
                        cxen_store_release_u32(seg.assumingMemoryBound(to: UInt32.self), bad(2) ? foreignRef : refs[k])
                        cxen_store_release_u8((seg + 5).assumingMemoryBound(to: UInt8.self), bad(3) ? 0xFF : 7)
                        started.store(gen, ordering: .relaxed)
                    }
                    seen = gen
                    acked.store(gen, ordering: .releasing)
                }
            }
            let requests = 100
            try #require((8 + sectorsPer * requests) * 512 <= imageSize)
            var statuses: [Int16] = []
            func pattern(_ i: Int) -> [UInt8] { (0..<pages).flatMap { blockPattern(i * 100 + $0) } }
            for i in 0..<requests {
                try disk.front.fill(buf, with: pattern(i))
                let idx = disk.front.queues[0].ring.reqProdPvt
                // rwRequest writes the indirect page's segments afresh.
                let q = try disk.front.rwRequest(BlkifOp.write, sector: UInt64(8 + sectorsPer * i), buffer: buf, bytes: pages * 4096)
                #expect(q.isIndirect)
                #expect(disk.front.enqueue(q))
                target.store(disk.slotOffset(idx) | (Int(idx) << 32), ordering: .releasing)
                generation.store(i + 1, ordering: .releasing)
                #expect(eventually(seconds: 10, every: 1) { started.load(ordering: .relaxed) == i + 1 })
                try disk.front.publish()
                statuses.append(try disk.front.waitResponse().status)
                #expect(eventually(seconds: 10, every: 1) { acked.load(ordering: .acquiring) == i + 1 })
            }
            quit.store(true, ordering: .releasing)
            racer.join()

            let image = disk.imageBytes(offset: 0, count: imageSize)
            #expect(disk.imageSize == imageSize, "a write went past the end of the disk")
            var ok = 0, refused = 0, wrong: [Int] = []
            for i in 0..<requests {
                let start = (8 + sectorsPer * i) * 512
                let block = Array(image[start..<start + pages * 4096])
                if statuses[i] == 0 {
                    ok += 1
                    if block != pattern(i) { wrong.append(i) }
                } else {
                    refused += 1
                    if block.contains(where: { $0 != 0 }) { wrong.append(i) }
                }
            }
            #expect(wrong.isEmpty, "requests whose effect was not the validated one: \(wrong.prefix(10))")
            let usedEnd: Int = (8 + sectorsPer * requests) * 512
            let tail: ArraySlice<UInt8> = image[usedEnd...]
            #expect(!tail.contains { $0 != 0 })
            #expect(ok > 0 && refused > 0, "ok \(ok), refused \(refused)")
            #expect(d.device(disk.dev)?.stoppedQueues.isEmpty == true)
            let w = worker.stop()
            #expect(w.failures.isEmpty, "\(w.failures)")
            #expect(w.ops > 0)
            print("indirect double fetch: \(ok) acted on, \(refused) refused")
        }
    }
}
