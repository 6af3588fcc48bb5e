import BlkBack
import BlkFrontKit
import CXen
import Foundation
import Glibc
import Testing
import XenBus
import XenHV
import XenRing
import XenStore
import XenTestKit

extension Hostile {
    /// Grants a frontend lies about, over the real XenBus handshake, while a
    /// second guest's disk keeps working on the same daemons.
    @Suite struct GrantTests {
        /// GTF_writing (bit 4): set by the hypervisor core while dom0 maps the grant writable.
        static let gtfWriting: UInt16 = 1 << 4

        @Test func badGrantsAreRefusedAndTheRingKeepsServing() throws {
            let d = try HostileDom0()
            let h = try d.guest("liar"), g = try d.guest("bystander")
            let disk = try XenBusDisk(d.s, guest: h)
            let worker = try DiskWorker(try XenBusDisk(d.s, guest: g, bytes: 1 << 20))
            worker.start()
            let gt = h.hypervisor.grantTable!
            let good = try disk.front.makeBuffer(pages: 1)
            try disk.front.fill(good, with: blockPattern(1))
            #expect(try disk.front.roundTrip(disk.front.rwRequest(BlkifOp.write, sector: 0, buffer: good, bytes: 4096)).status == 0)
            let frame = try disk.front.allocFrames(1)
            let marker = [UInt8](repeating: 0x5C, count: 4096)

            func one(_ op: UInt8, _ ref: GrantRef) -> BlkRequest {
                var q = BlkRequest()
                q.operation = op
                q.id = disk.front.newID()
                q.sector = 0
                q.nrSegments = 1
                q.setDirectSegment(0, BlkSegment(gref: ref, firstSect: 0, lastSect: 7))
                return q
            }
            func expectRefused(_ q: BlkRequest, _ what: String) throws {
                try disk.front.page(frame).write(marker.withUnsafeBytes { $0 }, at: 0)
                let r = try disk.answer(q)
                #expect(r.status == BlkifStatus.error.rawValue, "\(what)")
                #expect(r.paddingZero, "\(what): response padding")
                #expect(try disk.front.page(frame).bytes(at: 0, count: 4096) == marker, "\(what): page untouched")
                #expect(disk.imageBytes(offset: 0, count: 4096) == blockPattern(1), "\(what): image untouched")
                // The same ring then serves a good read.
                try disk.front.page(good.firstFrame).fill(0, at: 0, count: 4096)
                let ok = try disk.front.roundTrip(disk.front.rwRequest(BlkifOp.read, sector: 0, buffer: good, bytes: 4096))
                let back = try disk.front.contents(good, count: 4096)
                #expect(ok.status == 0 && back == blockPattern(1), "\(what): ring serves")
            }

            // Refs past the guest's grant table, and past any table Xen allows (64 frames × 512).
            let tableRefs = GrantRef(try h.hypervisor.queryGrantTableSize().frames) * 512
            for ref in [tableRefs, tableRefs + 1, 64 * 512, 0xFFFF_FFFF] as [GrantRef] {
                try expectRefused(one(BlkifOp.read, ref), "read into ref \(ref) out of range")
                try expectRefused(one(BlkifOp.write, ref), "write from ref \(ref) out of range")
            }
            // Granted, then revoked before the request.
            gt.grantAccess(6000, to: 0, frame: frame, readOnly: false)
            #expect(gt.endAccess(6000))
            try expectRefused(one(BlkifOp.read, 6000), "read into a revoked grant")
            try expectRefused(one(BlkifOp.write, 6000), "write from a revoked grant")
            // Granted to the other guest, not to the backend.
            gt.grantAccess(6001, to: g.domid, frame: frame, readOnly: false)
            try expectRefused(one(BlkifOp.read, 6001), "read into a grant for another domain")
            try expectRefused(one(BlkifOp.write, 6001), "write from a grant for another domain")
            // Read-only: the backend must write into it for a READ.
            gt.grantAccess(6002, to: 0, frame: frame, readOnly: true)
            try expectRefused(one(BlkifOp.read, 6002), "read into a read-only grant")
            // A grant whose type bits are not permit_access, and one with garbage flags.
            gt.writeRawEntry(6003, flags: 2, domid: 0, frame: frame)  // GTF_transfer
            try expectRefused(one(BlkifOp.read, 6003), "read into a transfer grant")
            gt.writeRawEntry(6004, flags: 0xFFE0, domid: 0, frame: frame)
            try expectRefused(one(BlkifOp.write, 6004), "write from an entry with no type")
            // A frame past the guest's memory.
            gt.grantAccess(6005, to: 0, frame: 0x7FFF_FFFF, readOnly: false)
            let far = try disk.answer(one(BlkifOp.read, 6005))
            #expect(far.status == BlkifStatus.error.rawValue && far.paddingZero, "grant of a frame past the guest's memory")
            // After all that, every entry the backend touched is free again.
            for ref: GrantRef in [6001, 6002, 6005] { #expect(gt.endAccess(ref), "ref \(ref) left busy") }
            #expect(gt.flags(6003) & (Self.gtfWriting | 1 << 3) == 0)
            #expect(d.device(disk.dev)?.stoppedQueues.isEmpty == true)

            let w = worker.stop()
            #expect(w.failures.isEmpty, "\(w.failures)")
            #expect(w.ops > 0)
        }

        /// A grant revoked while its request is in flight. Without persistent
        /// grants blkback maps nothing: the READ goes to its bounce pages and
        /// a grant copy moves the data at completion, which pins the grant
        /// (GTF_writing) only for that copy. A page whose revoke succeeded is
        /// never written again, and the copy refused on it answers the request
        /// ERROR; every page can be revoked once the response is out; requests
        /// not revoked read the right bytes.
        @Test func grantsRevokedWhileInFlight() throws {
            let d = try HostileDom0()
            let h = try d.guest("revoker"), g = try d.guest("bystander")
            let disk = try XenBusDisk(d.s, guest: h, persistent: false)
            let worker = try DiskWorker(try XenBusDisk(d.s, guest: g, bytes: 1 << 20))
            worker.start()
            let gt = h.hypervisor.grantTable!
            let pages = 64
            let buf = try disk.front.makeBuffer(pages: pages, indirect: true)
            let last = buf.refs[pages - 1], lastFrame = buf.firstFrame + UInt32(pages - 1)
            let marker = [UInt8](repeating: 0x5C, count: 4096)
            var revokedCount = 0, revokedErrors = 0, refusedDuringCopy = 0
            for round in 0..<40 {
                try disk.front.memory.fill(0xAA, at: Int(buf.firstFrame) * 4096, count: pages * 4096)
                let q = try disk.front.rwRequest(BlkifOp.read, sector: 0, buffer: buf, bytes: pages * 4096)
                try disk.front.push(q)
                var revoked = false
                if round % 2 == 0 {
                    // Straight after publishing: the read is in flight (or its copy under way).
                    if gt.endAccess(last) { revoked = true; revokedCount += 1 } else { refusedDuringCopy += 1 }
                }
                if revoked { try disk.front.page(lastFrame).write(marker.withUnsafeBytes { $0 }, at: 0) }
                let r = try disk.front.waitResponse()
                #expect(r.id == q.id)
                if revoked {
                    #expect(try disk.front.page(lastFrame).bytes(at: 0, count: 4096) == marker,
                            "round \(round): a revoked page was written")
                    if r.status != 0 { revokedErrors += 1 }
                } else {
                    #expect(r.status == 0, "round \(round)")
                    #expect(try disk.front.contents(buf, count: pages * 4096).allSatisfy { $0 == 0 }, "round \(round): data")
                }
                // Response out: every page of the request can be revoked now, then granted again.
                for (i, ref) in buf.refs.enumerated() where !(revoked && ref == last) {
                    #expect(gt.endAccess(ref), "round \(round): ref \(ref) still held after the response")
                    gt.grantAccess(ref, to: 0, frame: buf.firstFrame + UInt32(i), readOnly: false)
                }
                if revoked { gt.grantAccess(last, to: 0, frame: lastFrame, readOnly: false) }
            }
            // A revoke straight after the push lands before the completion's copy
            // (the disk takes far longer than the revoke): that copy is refused.
            #expect(revokedErrors > 0, "no revoked read was ever answered ERROR")
            print("revoke in flight: revoked \(revokedCount) (\(revokedErrors) answered ERROR), refused during a copy \(refusedDuringCopy)")
            #expect(try disk.front.read(sector: 0, bytes: 4096).status == 0)
            let w = worker.stop()
            #expect(w.failures.isEmpty, "\(w.failures)")
            #expect(w.ops > 0)
        }
    }
}
