import BlkBack
import BlkFrontKit
import CXen
import Glibc
import Testing
import XenHV
import XenRing

extension BlkBackIntegration {
    /// A frontend that lies: every bad request of xen-facts.md's table gets its
    /// status and the same ring then serves a good request; a bogus producer
    /// index stops only its own ring.
    @Suite struct HostileTests {
        typealias Front = BlkFront<BlkifRing>

        /// Pushes `q`, checks its status and that the response slot's padding is zero,
        /// then checks that a good read on the same ring still returns the image's bytes.
        static func expectRefused(_ s: DataPathTests.Setup<BlkifRing>, _ q: BlkRequest, _ status: BlkifStatus,
                                  _ what: String, good: Front.Buffer, expected: [UInt8]) throws {
            let slotIndex = s.front.queues[0].ring.reqProdPvt
            let r = try s.front.roundTrip(q)
            #expect(r.status == status.rawValue, "\(what)")
            #expect(r.operation == (q.isIndirect ? q.indirectOp : q.operation), "\(what)")
            // XSA-216: the 16-byte response's padding and the rest of the 112-byte slot are zero.
            let slot = try s.front.ringRegion().bytes(
                at: 64 + Int(slotIndex & (s.front.queues[0].ring.size - 1)) * 112, count: 112)
            #expect(slot[9] == 0 && slot[12...].allSatisfy { $0 == 0 }, "\(what): response padding")
            let ok = try s.front.roundTrip(s.front.rwRequest(BlkifOp.read, sector: 0, buffer: good, bytes: 4096))
            #expect(ok.status == 0, "\(what): ring still serves")
            #expect(try s.front.contents(good, count: 4096) == expected, "\(what): good read")
            try s.front.page(good.firstFrame).fill(0, at: 0, count: 4096)
        }

        @Test func everyBadRequestGetsItsErrorAndTheRingKeepsServing() throws {
            let s = try DataPathTests.setup(bytes: 1 << 20, pattern: 8192)
            let expected = fileBytes(s.image, offset: 0, count: 4096)
            let good = try s.front.makeBuffer(pages: 1)
            let buf = try s.front.makeBuffer(pages: 12)
            let page = BlkSegment(gref: buf.refs[0], firstSect: 0, lastSect: 7)
            func rw(_ op: UInt8, sector: UInt64 = 0, _ segs: [BlkSegment], claimed: Int? = nil) -> BlkRequest {
                var q = BlkRequest()
                q.operation = op
                q.id = s.front.newID()
                q.sector = sector
                q.nrSegments = claimed ?? segs.count
                for (i, g) in segs.prefix(11).enumerated() { q.setDirectSegment(i, g) }
                return q
            }
            let sectors = s.device.sectors  // 2048
            let e = BlkifStatus.error
            try Self.expectRefused(s, rw(BlkifOp.read, []), e, "nr_segments 0 on read", good: good, expected: expected)
            try Self.expectRefused(s, rw(BlkifOp.write, []), e, "nr_segments 0 on write", good: good, expected: expected)
            try Self.expectRefused(s, rw(BlkifOp.read, Array(repeating: page, count: 11), claimed: 12), e,
                                   "12 direct segments", good: good, expected: expected)
            try Self.expectRefused(s, rw(BlkifOp.read, Array(repeating: page, count: 11), claimed: 255), e,
                                   "255 direct segments", good: good, expected: expected)
            try Self.expectRefused(s, rw(BlkifOp.read, [BlkSegment(gref: buf.refs[0], firstSect: 4, lastSect: 3)]), e,
                                   "first_sect > last_sect", good: good, expected: expected)
            try Self.expectRefused(s, rw(BlkifOp.read, [page, BlkSegment(gref: buf.refs[1], firstSect: 0, lastSect: 8)]), e,
                                   "last_sect > 7", good: good, expected: expected)
            try Self.expectRefused(s, rw(BlkifOp.read, sector: sectors - 7, [page]), e, "range past the end",
                                   good: good, expected: expected)
            try Self.expectRefused(s, rw(BlkifOp.write, sector: .max - 2, [page]), e, "range overflowing",
                                   good: good, expected: expected)
            try Self.expectRefused(s, rw(BlkifOp.read, [BlkSegment(gref: 4000, firstSect: 0, lastSect: 7)]), e,
                                   "grant never granted", good: good, expected: expected)
            let ro = try s.front.makeBuffer(pages: 1, readOnly: true)
            try Self.expectRefused(s, rw(BlkifOp.read, [BlkSegment(gref: ro.refs[0], firstSect: 0, lastSect: 7)]), e,
                                   "read into a read-only grant", good: good, expected: expected)
            // A read-only grant is fine as the source of a WRITE.
            #expect(try s.front.roundTrip(rw(BlkifOp.write, sector: 1000, [BlkSegment(gref: ro.refs[0], firstSect: 0, lastSect: 7)])).status == 0)

            // Indirect: too many segments, bad inner op, an unmappable indirect page.
            var ind = try s.front.rwRequest(BlkifOp.read, sector: 0, buffer: buf, bytes: 12 * 4096)
            #expect(ind.isIndirect)
            ind.nrSegments = 257
            try Self.expectRefused(s, ind, e, "257 indirect segments", good: good, expected: expected)
            ind.nrSegments = 12
            ind.id = s.front.newID()
            ind.indirectOp = BlkifOp.flushDiskCache
            try Self.expectRefused(s, ind, e, "indirect FLUSH", good: good, expected: expected)
            ind.indirectOp = BlkifOp.read
            ind.id = s.front.newID()
            ind.setIndirectGref(0, 4001)
            try Self.expectRefused(s, ind, e, "unmappable indirect page", good: good, expected: expected)
            // A bad segment inside an indirect page.
            var ind2 = try s.front.rwRequest(BlkifOp.read, sector: 0, buffer: buf, bytes: 12 * 4096)
            try s.front.memory.store(BlkSegment(gref: buf.refs[5], firstSect: 7, lastSect: 2).raw,
                                     at: Int(buf.indirectFrames[0]) * 4096 + 5 * 8)
            ind2.id = s.front.newID()
            try Self.expectRefused(s, ind2, e, "bad segment in an indirect page", good: good, expected: expected)

            // Unknown operations: EOPNOTSUPP.
            for op: UInt8 in [4, 7, 99, 255] {
                var q = BlkRequest()
                q.operation = op
                q.id = s.front.newID()
                try Self.expectRefused(s, q, .notSupported, "operation \(op)", good: good, expected: expected)
            }
            // Discard past the end: ERROR.
            var d = BlkRequest()
            d.operation = BlkifOp.discard
            d.discardSectors = 8
            d.sector = sectors
            d.id = s.front.newID()
            try Self.expectRefused(s, d, e, "discard past the end", good: good, expected: expected)

            // I/O error: the image shrinks under the device (no resize), so a read
            // inside the advertised size comes back short.
            #expect(truncate(s.image, 512 * 1024) == 0)
            try Self.expectRefused(s, rw(BlkifOp.read, sector: 1536, [page]), e, "I/O error (short read)",
                                   good: good, expected: expected)

            let st = s.device.stats
            #expect(st.errors == 16)
            #expect(st.unsupported == 4)
            #expect(s.device.stoppedQueues.isEmpty)
        }

        /// Refusals give back everything they took: many more bad requests
        /// than the ring has slots (some failing after a page was mapped), then
        /// a full ring of good ones, all served.
        @Test func refusedRequestsLeakNoSlotsOrMappings() throws {
            let s = try DataPathTests.setup(bytes: 1 << 20, pattern: 8192)
            let expected = fileBytes(s.image, offset: 0, count: 4096)
            let buf = try s.front.makeBuffer(pages: 2)
            for i in 0..<100 {
                var q = try s.front.rwRequest(BlkifOp.read, sector: 0, buffer: buf, bytes: 8192)
                // First page fine, second never granted: fails after mapping the first.
                q.setDirectSegment(1, BlkSegment(gref: 5000 + GrantRef(i), firstSect: 0, lastSect: 7))
                #expect(try s.front.roundTrip(q).status == BlkifStatus.error.rawValue)
            }
            var bufs: [BlkFront<BlkifRing>.Buffer] = []
            var reqs: [BlkRequest] = []
            for _ in 0..<Int(s.front.queues[0].ring.size) {
                let b = try s.front.makeBuffer(pages: 1)
                bufs.append(b)
                reqs.append(try s.front.rwRequest(BlkifOp.read, sector: 0, buffer: b, bytes: 4096))
            }
            try s.front.pushBatch(reqs)
            for _ in reqs { #expect(try s.front.waitResponse().status == 0) }
            for b in bufs { #expect(try s.front.contents(b, count: 4096) == expected) }
            #expect(s.device.stats.outOfRequests == 0)
        }

        /// The i386 layout: 108-byte slots, 12-byte responses whose padding
        /// (byte 9) and the rest of the slot are zero.
        @Test func x86_32BadRequestsGetErrorsWithZeroedPadding() throws {
            let s = try DataPathTests.setup(BlkifX86_32Ring.self, bytes: 1 << 20, pattern: 8192)
            let expected = fileBytes(s.image, offset: 0, count: 4096)
            let buf = try s.front.makeBuffer(pages: 1)
            var cases: [(BlkRequest, BlkifStatus)] = []
            var q = try s.front.rwRequest(BlkifOp.read, sector: 0, buffer: buf, bytes: 4096)
            q.nrSegments = 0
            cases.append((q, .error))
            q = try s.front.rwRequest(BlkifOp.read, sector: 2047, buffer: buf, bytes: 4096)
            cases.append((q, .error))
            q = try s.front.rwRequest(BlkifOp.read, sector: 0, buffer: buf, bytes: 4096)
            q.setDirectSegment(0, BlkSegment(gref: buf.refs[0], firstSect: 3, lastSect: 9))
            cases.append((q, .error))
            q = BlkRequest()
            q.operation = 42
            q.id = 0xFFFF_FFFF_FFFF_FFFF
            cases.append((q, .notSupported))
            for (bad, status) in cases {
                let idx = s.front.queues[0].ring.reqProdPvt & (s.front.queues[0].ring.size - 1)
                let r = try s.front.roundTrip(bad)
                #expect(r.status == status.rawValue && r.id == bad.id)
                let slot = try s.front.ringRegion().bytes(at: 64 + Int(idx) * 108, count: 108)
                #expect(slot[9] == 0 && slot[12...].allSatisfy { $0 == 0 })
                #expect(try s.front.read(sector: 0, bytes: 4096) == (0, expected))
            }
        }

        @Test func misalignedToTheSectorSizeIsAnError() throws {
            let s = try DataPathTests.setup(bytes: 1 << 20, pattern: 8192, sectorSize: 4096)
            #expect(s.device.features.sectorSize == 4096)
            let expected = fileBytes(s.image, offset: 0, count: 4096)
            let good = try s.front.makeBuffer(pages: 1)
            let b = try s.front.makeBuffer(pages: 1)
            var q = try s.front.rwRequest(BlkifOp.read, sector: 3, buffer: b, bytes: 4096)
            try Self.expectRefused(s, q, .error, "sector not a multiple of 8", good: good, expected: expected)
            q = try s.front.rwRequest(BlkifOp.read, sector: 8, buffer: b, bytes: 2048)
            try Self.expectRefused(s, q, .error, "4 sectors of a 4 KiB-sector disk", good: good, expected: expected)
        }

        @Test func writeToAReadOnlyDiskIsAnErrorAndTheRingGoesOn() throws {
            let s = try DataPathTests.setup(bytes: 1 << 20, pattern: 8192, readOnly: true)
            let expected = fileBytes(s.image, offset: 0, count: 4096)
            let good = try s.front.makeBuffer(pages: 1)
            let b = try s.front.makeBuffer(pages: 1)
            try Self.expectRefused(s, try s.front.rwRequest(BlkifOp.write, sector: 0, buffer: b, bytes: 4096), .error,
                                   "write to a read-only disk", good: good, expected: expected)
            #expect(fileBytes(s.image, offset: 0, count: 4096) == expected)
        }

        /// XSA-332: kicks with no requests get the event channel muted for a
        /// moment instead of a core; requests are served again right after.
        @Test func aStormOfEmptyKicksIsMutedAndTheRingStillServes() throws {
            let s = try DataPathTests.setup(bytes: 1 << 20, pattern: 8192)
            let expected = fileBytes(s.image, offset: 0, count: 4096)
            for _ in 0..<200_000 { try s.front.queues[0].channel.notify() }
            var waited = 0
            while s.device.stats.spuriousStorms == 0 && waited < 10_000 {
                usleep(1000)  // waiting for a condition, with a deadline
                waited += 1
            }
            #expect(s.device.stats.spuriousStorms > 0)
            #expect(try s.front.read(sector: 0, bytes: 4096) == (0, expected))
            #expect(s.device.stoppedQueues.isEmpty)
        }

        /// `req_prod` more than a ring ahead: that ring stops (with a log line and a
        /// reason), the device's other queue keeps serving, nothing crashes.
        @Test func producerOverflowStopsOnlyThatRing() throws {
            let log = CapturedLog()
            let s = try DataPathTests.setup(bytes: 1 << 20, pattern: 8192, queues: 2, logger: log.logger)
            let expected = fileBytes(s.image, offset: 0, count: 4096)
            #expect(try s.front.read(sector: 0, bytes: 4096, queue: 0) == (0, expected))
            let size = s.front.queues[0].ring.size
            let bogus = s.front.queues[0].ring.reqProdPvt &+ size &+ 5
            try s.front.ringRegion(queue: 0).store(bogus, at: 0)  // req_prod
            try s.front.queues[0].channel.notify()
            var waited = 0
            while s.device.stoppedQueues[0] == nil && waited < 10_000 {
                usleep(1000)  // waiting for a condition, with a deadline
                waited += 1
            }
            let why = try #require(s.device.stoppedQueues[0])
            #expect(why.contains("bogus ring requests"))
            #expect(log.all.contains { $0.hasPrefix("error") && $0.contains("queue 0") && $0.contains("bogus ring requests")
                && $0.contains("ring stopped") })
            #expect(s.device.stoppedQueues[1] == nil)
            #expect(try s.front.read(sector: 0, bytes: 4096, queue: 1) == (0, expected))
            #expect(try s.front.pollResponse(queue: 0) == nil)
            // Disconnect still releases everything of the stopped ring.
            s.device.disconnect()
            for r in s.front.queues[0].ringRefs { #expect(s.front.endAccess(r)) }
        }

        /// A frontend without persistent grants fills an order-4 ring (512
        /// slots) with 1 MiB indirect READs, 256 segments each, all naming the
        /// same pages: 131,072 segments at once. Mapped one by one they would
        /// pass vm.max_map_count (65530), and every guest this process serves
        /// would get ENOMEM; nothing of the guest is mapped for them: they go
        /// through the bounce pages, later requests waiting on the ring while
        /// those are in flight (oo_req), and every one is answered OKAY.
        @Test func aRingFullOfLargestRequestsMapsNothingAndEveryOneSucceeds() throws {
            let s = try DataPathTests.setup(bytes: 4 << 20, pattern: 1 << 20, order: 4, persistent: false)
            let expected = fileBytes(s.image, offset: 0, count: 1 << 20)
            let buf = try s.front.makeBuffer(pages: 256, indirect: true)
            let slots = Int(s.front.queues[0].ring.size)
            #expect(slots == 512)
            let reqs = try (0..<slots).map { _ in
                try s.front.rwRequest(BlkifOp.read, sector: 0, buffer: buf, bytes: 1 << 20, forceIndirect: true)
            }
            try s.front.pushBatch(reqs)
            var statuses: [Int16: Int] = [:]
            for _ in reqs { statuses[try s.front.waitResponse().status, default: 0] += 1 }
            #expect(statuses == [0: slots])
            #expect(try s.front.contents(buf, count: 1 << 20) == expected)
            #expect(s.device.stats.bouncedSegments == UInt64(slots * 256))
            #expect(s.device.stats.outOfRequests > 0, "no request ever waited for bounce pages")
            #expect(s.device.persistentGrants == 0)
            // The guest may revoke every page at once: nothing holds them.
            for r in buf.refs + buf.indirectRefs { #expect(s.front.endAccess(r)) }
        }

        /// Persistent grants come out of the process's budget (half of
        /// vm.max_map_count): past it, segments are bounced and the data is
        /// the same; a detach gives the budget back.
        @Test func persistentGrantsStayWithinTheProcessBudget() throws {
            let budget = MappingBudget(limit: 3)
            let s = try DataPathTests.setup(bytes: 1 << 20, budget: budget, purgeMilliseconds: 3_600_000)
            let b = try s.front.makeBuffer(pages: 8)
            let d = pattern(8 * 4096, seed: 61)
            try s.front.fill(b, with: d)
            #expect(try s.front.roundTrip(s.front.rwRequest(BlkifOp.write, sector: 0, buffer: b, bytes: d.count)).status == 0)
            #expect(s.device.persistentGrants == 3)
            #expect(budget.inUse == 3)
            #expect(s.device.stats.bouncedSegments == 5)
            #expect(fileBytes(s.image, offset: 0, count: d.count) == d)
            let r = try s.front.makeBuffer(pages: 8)
            #expect(try s.front.roundTrip(s.front.rwRequest(BlkifOp.read, sector: 0, buffer: r, bytes: d.count)).status == 0)
            #expect(try s.front.contents(r, count: d.count) == d)
            #expect(budget.inUse == 3)
            s.device.disconnect()
            #expect(budget.inUse == 0)
        }
    }
}
