@testable import BlkBack
import CXen
import Testing
import XenHV
import XenRing

/// Decoding both ABIs and Linux blkback's validation rules, without a hypervisor.
@Suite struct RequestTests {
    // MARK: Layouts

    @Test func nativeLayoutMatchesTheHeaders() {
        #expect(MemoryLayout<blkif_request>.size == 112)
        #expect(MemoryLayout<blkif_response>.size == 16)
        #expect(MemoryLayout<blkif_request_discard>.size == 32)
        #expect(MemoryLayout<blkif_request_indirect>.size == 64)
        #expect(BlkifRing.slotStride == 112)
        #expect(BlkifRing.entries(pages: 1) == 32)
        #expect(BlkifRing.entries(pages: 16) == 512)
    }

    @Test func x86_32LayoutIsI386s() {
        #expect(MemoryLayout<BlkifX86_32Request>.size == 108)
        #expect(MemoryLayout<BlkifX86_32Request>.alignment == 4)
        #expect(MemoryLayout<BlkifX86_32Response>.size == 12)
        #expect(BlkifX86_32Ring.slotStride == 108)
        // (4096 - 64) / 108 = 37 -> 32; (65536 - 64) / 108 = 606 -> 512.
        #expect(BlkifX86_32Ring.entries(pages: 1) == 32)
        #expect(BlkifX86_32Ring.entries(pages: 16) == 512)
    }

    @Test func protocolNames() {
        #expect(BlkifABI(protocolName: nil) == .x86_64)
        #expect(BlkifABI(protocolName: "") == .x86_64)
        #expect(BlkifABI(protocolName: "x86_64-abi") == .x86_64)
        #expect(BlkifABI(protocolName: "x86_32-abi") == .x86_32)
        #expect(BlkifABI(protocolName: "arm-abi") == nil)
    }

    // MARK: Decoding

    @Test func decodesNativeReadWriteFromTheCStruct() {
        var r = blkif_request()
        r.operation = UInt8(BLKIF_OP_WRITE)
        r.nr_segments = 3
        r.handle = 0x1234
        r.id = 0xDEAD_BEEF_0011_2233
        r.sector_number = 0x0102_0304_0506_0708
        r.seg.0 = blkif_request_segment(gref: 77, first_sect: 1, last_sect: 6)
        r.seg.2 = blkif_request_segment(gref: 99, first_sect: 0, last_sect: 7)
        let q = BlkRequest.decode(native: r)
        #expect(q.operation == BlkifOp.write)
        #expect(q.command == .write)
        #expect(q.nrSegments == 3)
        #expect(q.handle == 0x1234)
        #expect(q.id == 0xDEAD_BEEF_0011_2233)
        #expect(q.sector == 0x0102_0304_0506_0708)
        #expect(q.directSegment(0) == BlkSegment(gref: 77, firstSect: 1, lastSect: 6))
        #expect(q.directSegment(2) == BlkSegment(gref: 99, firstSect: 0, lastSect: 7))
    }

    @Test func decodesNativeDiscardAndIndirectOverlays() {
        var d = blkif_request_discard()
        d.operation = UInt8(BLKIF_OP_DISCARD)
        d.flag = UInt8(BLKIF_DISCARD_SECURE)
        d.id = 5
        d.sector_number = 4096
        d.nr_sectors = 2048
        var r = blkif_request()
        withUnsafeMutableBytes(of: &r) { dst in withUnsafeBytes(of: d) { dst.copyMemory(from: $0) } }
        let q = BlkRequest.decode(native: r)
        #expect(q.command == .discard)
        #expect(q.discardSecure && q.id == 5 && q.sector == 4096 && q.discardSectors == 2048)

        var i = blkif_request_indirect()
        i.operation = UInt8(BLKIF_OP_INDIRECT)
        i.indirect_op = UInt8(BLKIF_OP_READ)
        i.nr_segments = 300
        i.id = 6
        i.sector_number = 8
        i.handle = 51712
        i.indirect_grefs.0 = 1000
        i.indirect_grefs.7 = 1007
        var r2 = blkif_request()
        withUnsafeMutableBytes(of: &r2) { dst in withUnsafeBytes(of: i) { dst.copyMemory(from: $0) } }
        let q2 = BlkRequest.decode(native: r2)
        #expect(q2.isIndirect && q2.command == .read && q2.nrSegments == 300)
        #expect(q2.id == 6 && q2.sector == 8 && q2.handle == 51712)
        #expect(q2.indirectGref(0) == 1000 && q2.indirectGref(7) == 1007)
        #expect(q2.indirectPages == 1)
        #expect(q2.responseOp == BlkifOp.read)
    }

    /// Bytes laid out by hand per Linux's packed `blkif_x86_32_request`.
    @Test func decodesX86_32ByByteOffsets() {
        var b = [UInt8](repeating: 0xEE, count: 108)
        b[0] = BlkifOp.read
        b[1] = 2  // nr_segments
        b[2] = 0x34; b[3] = 0x12  // handle
        for k in 0..<8 { b[4 + k] = UInt8(0x10 + k) }  // id
        for k in 0..<8 { b[12 + k] = UInt8(0x20 + k) }  // sector
        // seg[0]: gref 0x01020304, first 2, last 5; seg[1]: gref 9, first 0, last 7
        b[20] = 0x04; b[21] = 0x03; b[22] = 0x02; b[23] = 0x01; b[24] = 2; b[25] = 5
        b[28] = 9; b[29] = 0; b[30] = 0; b[31] = 0; b[32] = 0; b[33] = 7
        let q = b.withUnsafeBytes { BlkRequest.decode(x86_32: $0) }
        #expect(q.command == .read && q.nrSegments == 2 && q.handle == 0x1234)
        #expect(q.id == 0x1716_1514_1312_1110)
        #expect(q.sector == 0x2726_2524_2322_2120)
        #expect(q.directSegment(0) == BlkSegment(gref: 0x0102_0304, firstSect: 2, lastSect: 5))
        #expect(q.directSegment(1) == BlkSegment(gref: 9, firstSect: 0, lastSect: 7))

        var d = [UInt8](repeating: 0, count: 108)
        d[0] = BlkifOp.discard; d[1] = 1
        d[4] = 7; d[12] = 0x10; d[20] = 0x20
        let qd = d.withUnsafeBytes { BlkRequest.decode(x86_32: $0) }
        #expect(qd.command == .discard && qd.discardSecure && qd.id == 7 && qd.sector == 0x10 && qd.discardSectors == 0x20)

        var ind = [UInt8](repeating: 0, count: 108)
        ind[0] = BlkifOp.indirect; ind[1] = BlkifOp.write
        ind[2] = 0x00; ind[3] = 0x01  // 256 segments
        ind[4] = 8; ind[12] = 64
        ind[20] = 0x00; ind[21] = 0xCA  // handle 51712
        ind[24] = 42; ind[52] = 49
        let qi = ind.withUnsafeBytes { BlkRequest.decode(x86_32: $0) }
        #expect(qi.isIndirect && qi.command == .write && qi.nrSegments == 256 && qi.id == 8 && qi.sector == 64)
        #expect(qi.handle == 51712 && qi.indirectGref(0) == 42 && qi.indirectGref(7) == 49)
    }

    @Test func encodeDecodeRoundTripsInBothABIs() {
        var q = BlkRequest()
        q.operation = BlkifOp.write
        q.id = 0x0123_4567_89AB_CDEF
        q.sector = 1 << 40
        q.nrSegments = 11
        q.handle = 7
        for i in 0..<11 { q.setDirectSegment(i, BlkSegment(gref: GrantRef(100 + i), firstSect: UInt8(i % 8), lastSect: 7)) }
        for abi in [BlkifABI.x86_64, .x86_32] {
            let back = abi == .x86_64 ? BlkifRing.decode(BlkifRing.encode(q)) : BlkifX86_32Ring.decode(BlkifX86_32Ring.encode(q))
            #expect(back.id == q.id && back.sector == q.sector && back.nrSegments == 11 && back.handle == 7)
            for i in 0..<11 { #expect(back.directSegment(i) == q.directSegment(i)) }
        }
    }

    // MARK: Responses

    @Test func x86_32ResponseZeroesPaddingAndTheRestOfTheSlot() {
        var slot = [UInt8](repeating: 0xAB, count: 108)
        slot.withUnsafeMutableBytes {
            BlkifX86_32Ring.storeResponse(
                BlkifX86_32Ring.response(id: 0x1122_3344_5566_7788, operation: 1, status: .error), into: $0.baseAddress!)
        }
        #expect(slot[0..<8] == [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11])
        #expect(slot[8] == 1)
        #expect(slot[9] == 0)  // padding
        #expect(slot[10] == 0xFF && slot[11] == 0xFF)  // -1
        #expect(slot[12...].allSatisfy { $0 == 0 })
    }

    @Test func nativeResponseZeroesPaddingAndTheRestOfTheSlot() {
        var slot = [UInt8](repeating: 0xAB, count: 112)
        slot.withUnsafeMutableBytes {
            BlkifRing.storeResponse(BlkifRing.response(id: 3, operation: 0, status: .notSupported), into: $0.baseAddress!)
        }
        #expect(slot[0] == 3 && slot[1..<8].allSatisfy { $0 == 0 })
        #expect(slot[9] == 0)
        #expect(slot[10] == 0xFE && slot[11] == 0xFF)  // -2
        #expect(slot[12...].allSatisfy { $0 == 0 })
    }

    // MARK: Validation: every row of xen-facts.md's table

    static let disk = DiskGeometry(sectors: 2048, sectorSize: 512, readOnly: false, discard: true, discardSecure: false)

    static func rw(_ op: UInt8, sector: UInt64 = 0, segs: [BlkSegment]) -> BlkRequest {
        var q = BlkRequest()
        q.operation = op
        q.id = 1
        q.sector = sector
        q.nrSegments = segs.count
        for (i, s) in segs.prefix(11).enumerated() { q.setDirectSegment(i, s) }
        return q
    }
    static let page = BlkSegment(gref: 10, firstSect: 0, lastSect: 7)

    @Test func goodRequestsPass() throws {
        #expect(try Self.rw(BlkifOp.read, segs: [Self.page]).validate(geometry: Self.disk).get() == 8)
        #expect(try Self.rw(BlkifOp.write, sector: 2040, segs: [Self.page]).validate(geometry: Self.disk).get() == 8)
        #expect(try Self.rw(BlkifOp.write, segs: Array(repeating: Self.page, count: 11)).validate(geometry: Self.disk).get() == 88)
        var f = BlkRequest(); f.operation = BlkifOp.flushDiskCache
        #expect(try f.validate(geometry: Self.disk).get() == 0)
    }

    @Test(arguments: [
        ("nr_segments 0 on read", rw(BlkifOp.read, segs: []), BlkRequestError.noSegments),
        ("nr_segments 0 on write", rw(BlkifOp.write, segs: []), .noSegments),
        ("12 direct segments", rw(BlkifOp.read, segs: Array(repeating: page, count: 12)), .tooManySegments(12)),
        ("first_sect > last_sect", rw(BlkifOp.read, segs: [BlkSegment(gref: 1, firstSect: 5, lastSect: 4)]),
         .badSegment(index: 0, first: 5, last: 4)),
        ("last_sect > 7", rw(BlkifOp.read, segs: [page, BlkSegment(gref: 1, firstSect: 0, lastSect: 8)]),
         .badSegment(index: 1, first: 0, last: 8)),
        ("range past the end", rw(BlkifOp.read, sector: 2041, segs: [page]), .pastEnd(end: 2049, capacity: 2048)),
        ("range overflowing", rw(BlkifOp.write, sector: UInt64.max - 3, segs: [page]),
         .rangeOverflow(sector: UInt64.max - 3, sectors: 8)),
    ] as [(String, BlkRequest, BlkRequestError)])
    func badRequestsAreErrors(_ row: (String, BlkRequest, BlkRequestError)) {
        let r = row.1.validate(geometry: Self.disk)
        #expect(r == .failure(row.2), "\(row.0)")
        #expect(row.2.status == .error)
    }

    @Test func tooManyIndirectSegments() {
        var q = BlkRequest()
        q.operation = BlkifOp.indirect
        q.indirectOp = BlkifOp.read
        q.nrSegments = 257
        #expect(q.validateHeader(geometry: Self.disk) == .tooManySegments(257))
        q.nrSegments = 256
        #expect(q.validateHeader(geometry: Self.disk) == nil)
        q.nrSegments = 0
        #expect(q.validateHeader(geometry: Self.disk) == .noSegments)
    }

    @Test func indirectWithAnotherOperationIsAnError() {
        var q = BlkRequest()
        q.operation = BlkifOp.indirect
        q.indirectOp = BlkifOp.flushDiskCache
        q.nrSegments = 1
        #expect(q.validateHeader(geometry: Self.disk) == .badIndirectOperation(BlkifOp.flushDiskCache))
        #expect(BlkRequestError.badIndirectOperation(3).status == .error)
    }

    @Test func misalignedToTheSectorSize() {
        let g = DiskGeometry(sectors: 2048, sectorSize: 4096)
        // 4 KiB logical sectors: sector and segment length must be multiples of 8.
        #expect(Self.rw(BlkifOp.read, sector: 8, segs: [Self.page]).validate(geometry: g) == .success(8))
        #expect(Self.rw(BlkifOp.read, sector: 1, segs: [Self.page]).validate(geometry: g) == .failure(.misaligned(sector: 1, segmentSectors: 8)))
        let half = BlkSegment(gref: 1, firstSect: 0, lastSect: 3)
        #expect(Self.rw(BlkifOp.read, sector: 0, segs: [half]).validate(geometry: g) == .failure(.misaligned(sector: 0, segmentSectors: 4)))
    }

    @Test func writesToAReadOnlyDiskAreErrors() {
        var g = Self.disk
        g.readOnly = true
        #expect(Self.rw(BlkifOp.write, segs: [Self.page]).validate(geometry: g) == .failure(.writeToReadOnly))
        #expect(Self.rw(BlkifOp.read, segs: [Self.page]).validate(geometry: g) == .success(8))
        var d = BlkRequest(); d.operation = BlkifOp.discard; d.discardSectors = 8
        #expect(d.validateHeader(geometry: g) == .writeToReadOnly)
        var f = BlkRequest(); f.operation = BlkifOp.flushDiskCache
        #expect(f.validateHeader(geometry: g) == .writeToReadOnly)
    }

    @Test func unknownOperationsAreNotSupported() {
        for op: UInt8 in [4, 7, 8, 200, 255] {
            var q = BlkRequest()
            q.operation = op
            let e = q.validateHeader(geometry: Self.disk)
            #expect(e == .unknownOperation(op))
            #expect(e?.status == .notSupported)
        }
    }

    @Test func discardRules() {
        var d = BlkRequest()
        d.operation = BlkifOp.discard
        d.sector = 2040
        d.discardSectors = 8
        #expect(d.validateHeader(geometry: Self.disk) == nil)
        d.discardSectors = 9
        #expect(d.validateHeader(geometry: Self.disk) == .pastEnd(end: 2049, capacity: 2048))
        d.sector = .max
        #expect(d.validateHeader(geometry: Self.disk) == .rangeOverflow(sector: .max, sectors: 9))
        d.sector = 0
        // blkif.h: BLKIF_DISCARD_SECURE "is ignored if discard-secure=0" (a plain discard).
        d.discardSecure = true
        #expect(d.validateHeader(geometry: Self.disk) == nil)
        var g = Self.disk
        g.discard = false
        d.discardSecure = false
        #expect(d.validateHeader(geometry: g) == .discardNotSupported)
    }
}

/// Random slots from a hostile frontend: decoding and validation never trap, and
/// whatever they accept is within the disk and the protocol's limits.
@Suite struct RandomRequestTests {
    @Test(arguments: [BlkifABI.x86_64, .x86_32])
    func randomSlotsNeverTrapAndAcceptedRequestsAreInBounds(_ abi: BlkifABI) {
        var rng: UInt64 = 0x1234_5678_9ABC_DEF1
        func next() -> UInt64 {
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17
            return rng
        }
        let g = DiskGeometry(sectors: 1 << 20, sectorSize: 512)
        var accepted = 0
        var bytes = [UInt8](repeating: 0, count: 112)
        for _ in 0..<50_000 {
            for i in 0..<14 { bytes.withUnsafeMutableBytes { $0.storeBytes(of: next(), toByteOffset: i * 8, as: UInt64.self) } }
            // Bias towards the interesting operations and small fields.
            bytes[0] = UInt8(next() % 9)
            if next() % 2 == 0 { bytes[1] = UInt8(next() % 14) }
            if next() % 2 == 0 {
                let off = abi == .x86_64 ? 16 : 12
                bytes.withUnsafeMutableBytes { $0.storeBytes(of: next() % (1 << 21), toByteOffset: off, as: UInt64.self) }
            }
            let q = bytes.withUnsafeBytes { abi == .x86_64 ? BlkRequest.decode(nativeBytes: $0) : BlkRequest.decode(x86_32: $0) }
            let direct = Swift.min(q.nrSegments, BlkifLimits.maxDirectSegments)
            let segs = q.isIndirect ? (0..<Swift.min(q.nrSegments, 300)).map { _ in BlkSegment(raw: next()) } : nil
            switch q.validate(geometry: g, segments: segs) {
            case .success(let total):
                accepted += 1
                switch q.command {
                case .discard:
                    #expect(q.sector + q.discardSectors <= g.sectors)
                case .flush, .writeBarrier:
                    #expect(q.nrSegments <= BlkifLimits.maxDirectSegments)
                    if q.nrSegments > 0 { #expect(q.sector + total <= g.sectors) }
                default:
                    #expect(q.nrSegments >= 1 && q.nrSegments <= (q.isIndirect ? 256 : 11))
                    #expect(q.sector + total <= g.sectors)
                    for i in 0..<(segs?.count ?? direct) {
                        let s = segs?[i] ?? q.directSegment(i)
                        #expect(s.firstSect <= s.lastSect && s.lastSect <= 7)
                    }
                }
            case .failure(let e):
                #expect(e.status != .okay)
            }
        }
        #expect(accepted > 100)
    }
}

/// The persistent-grant LRU on its own.
@Suite struct PersistentGrantsTests {
    nonisolated(unsafe) static let fake = UnsafeMutableRawPointer(bitPattern: 0x1000)!

    @Test func hitsPinAndIdleEntriesKeepLeastRecentlyUsedOrder() {
        var p = PersistentGrants(capacity: 3)
        defer { p.deallocate() }
        for g: GrantRef in 1...3 {
            let i = p.insert(gref: g, handle: g + 100, base: Self.fake)
            #expect(i != nil)
            p.release(i!)
        }
        #expect(p.idleOrder == [1, 2, 3])
        // Touch 1: now 2 is the least recently used.
        let one = p.lookup(1)!
        p.release(one)
        #expect(p.idleOrder == [2, 3, 1])
        // Full: a new grant is not kept (mapped for its request only); nothing is evicted.
        #expect(!p.canInsert)
        #expect(p.insert(gref: 4, handle: 104, base: Self.fake) == nil)
        #expect(p.contains(2) && !p.contains(4) && p.count == 3)
    }

    @Test func purgeDropsOnlyIdleGrantsUnusedForAPeriodOldestFirst() {
        var p = PersistentGrants(capacity: 4)
        defer { p.deallocate() }
        var idx: [GrantRef: Int32] = [:]
        for g: GrantRef in 1...4 { idx[g] = p.insert(gref: g, handle: g + 10, base: Self.fake)! }
        for g: GrantRef in [1, 2, 3] { p.release(idx[g]!) }  // 4 stays in use
        var unmapped: [GrantHandle] = []
        // Everything was used in this first period: nothing goes.
        #expect(p.purge(max: 4) { unmapped.append($0) } == 0)
        // Next period: 3 is used again, 1 and 2 are not; 4 is still in flight.
        p.release(p.lookup(3)!)
        #expect(p.purge(max: 1) { unmapped.append($0) } == 1)
        #expect(unmapped == [11])  // the least recently used first, at most `max`
        // A whole period with no use: 2 and 3 go; 4 is in flight and stays.
        #expect(p.purge(max: 4) { unmapped.append($0) } == 2)
        #expect(unmapped == [11, 12, 13])
        #expect(p.canInsert && p.contains(4))
        p.release(idx[4]!)
        var rest: [GrantHandle] = []
        p.removeAll { rest.append($0) }
        #expect(rest == [14])
        #expect(p.count == 0 && p.lookup(1) == nil)
    }

    @Test func twoUsersOfOnePageKeepItFromBeingPurged() {
        var p = PersistentGrants(capacity: 1)
        defer { p.deallocate() }
        let a = p.insert(gref: 9, handle: 1, base: Self.fake)!
        let again = p.lookup(9)!
        #expect(a == again)
        var gone: [GrantHandle] = []
        p.purge(max: 1) { gone.append($0) }
        p.release(a)
        p.purge(max: 1) { gone.append($0) }  // still one user
        #expect(gone.isEmpty && p.contains(9))
        p.release(again)
        p.purge(max: 1) { gone.append($0) }
        #expect(gone == [1] && p.canInsert)
    }
}
