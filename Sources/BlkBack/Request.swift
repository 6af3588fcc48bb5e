import CXen
import XenHV
import XenRing

// Parsing and validation of blkif requests, for both ABIs a frontend may speak.
//
// The ring hands us one private copy of each request slot (RING_COPY_REQUEST).
// `BlkRequest.decode` reads that copy field by field into a native form, and
// `BlkRequest.validate` checks it the way Linux xen-blkback's
// dispatch_rw_block_io / dispatch_discard_io / xen_vbd_translate do. Nothing
// here touches guest memory, so every rule can be tested without a hypervisor.

/// `protocol` in the frontend's XenBus directory (`XEN_IO_PROTO_ABI_*`).
public enum BlkifABI: String, Sendable, CaseIterable {
    /// `x86_64-abi`: the native layout of /usr/include/xen/io/blkif.h on x86_64.
    case x86_64 = "x86_64-abi"
    /// `x86_32-abi`: i386's packed layout (Linux blkback's `blkif_x86_32_request`).
    case x86_32 = "x86_32-abi"

    /// The ABI named by a frontend's `protocol` node; a missing node means native.
    public init?(protocolName: String?) {
        guard let name = protocolName, !name.isEmpty else { self = .x86_64; return }
        self.init(rawValue: name)
    }
}

/// blkif.h's operation codes.
public enum BlkifOp {
    public static let read = UInt8(BLKIF_OP_READ)
    public static let write = UInt8(BLKIF_OP_WRITE)
    public static let writeBarrier = UInt8(BLKIF_OP_WRITE_BARRIER)
    public static let flushDiskCache = UInt8(BLKIF_OP_FLUSH_DISKCACHE)
    public static let discard = UInt8(BLKIF_OP_DISCARD)
    public static let indirect = UInt8(BLKIF_OP_INDIRECT)
}

/// `BLKIF_RSP_*`.
public enum BlkifStatus: Int16, Sendable {
    case okay = 0
    case error = -1
    case notSupported = -2
}

/// Limits of the block protocol, Linux blkback's values.
public enum BlkifLimits {
    /// `BLKIF_MAX_SEGMENTS_PER_REQUEST`.
    public static let maxDirectSegments = Int(BLKIF_MAX_SEGMENTS_PER_REQUEST)
    /// `MAX_INDIRECT_SEGMENTS`, advertised as feature-max-indirect-segments.
    public static let maxIndirectSegments = 256
    /// `BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST`.
    public static let maxIndirectPages = Int(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST)
    /// Segments described by one indirect page (4096 / 8).
    public static let segmentsPerIndirectPage = 4096 / MemoryLayout<blkif_request_segment>.size
    /// 512-byte sectors in a 4 KiB page: a segment's `last_sect` is at most 7.
    public static let sectorsPerPage: UInt8 = 8
    /// `xen_blkif_max_ring_order`.
    public static let maxRingPageOrder = 4
    /// `xen_blkif_max_pgrants`: persistent grants per ring.
    public static let persistentGrantsPerRing = 1056
}

/// One segment: a piece of a granted page, `first_sect...last_sect` (512-byte units).
public struct BlkSegment: Sendable, Equatable {
    public var gref: GrantRef
    public var firstSect: UInt8
    public var lastSect: UInt8
    public init(gref: GrantRef, firstSect: UInt8, lastSect: UInt8) {
        self.gref = gref; self.firstSect = firstSect; self.lastSect = lastSect
    }
    /// Decodes `struct blkif_request_segment` (gref u32, first_sect u8, last_sect u8, pad u16).
    @inlinable
    public init(raw: UInt64) {
        gref = GrantRef(truncatingIfNeeded: raw)
        firstSect = UInt8(truncatingIfNeeded: raw >> 32)
        lastSect = UInt8(truncatingIfNeeded: raw >> 40)
    }
    /// Linux: `first_sect > last_sect || last_sect >= XEN_PAGE_SIZE >> 9` is an error.
    @inlinable public var isValid: Bool { firstSect <= lastSect && lastSect < BlkifLimits.sectorsPerPage }
    @inlinable public var sectors: Int { Int(lastSect) - Int(firstSect) + 1 }
    @inlinable public var byteOffset: Int { Int(firstSect) << 9 }
}

/// What a request asks for, once its operation code is known.
public enum BlkCommand: Sendable, Equatable {
    case read
    case write
    /// WRITE_BARRIER: earlier requests drained, then a flushed write.
    case writeBarrier
    /// FLUSH_DISKCACHE: the disk's cache made durable (optionally with data).
    case flush
    case discard
    /// Any other operation code: answered EOPNOTSUPP.
    case unsupported
}

/// A request decoded from the backend's private copy of a ring slot.
///
/// Fields are exactly what the frontend wrote; nothing is trusted until
/// ``validate(geometry:)`` has accepted it.
public struct BlkRequest: Sendable {
    /// The operation code as written (echoed in the response, except for
    /// INDIRECT, which Linux answers with its inner `indirect_op`).
    public var operation: UInt8 = 0
    public var id: UInt64 = 0
    public var handle: UInt16 = 0
    public var sector: UInt64 = 0
    /// Segments as claimed: `nr_segments` (u8) for direct requests, the u16 of
    /// an indirect one.
    public var nrSegments: Int = 0
    /// INDIRECT only: the operation the indirect segments carry.
    public var indirectOp: UInt8 = 0
    /// DISCARD only.
    public var discardSectors: UInt64 = 0
    public var discardSecure: Bool = false
    /// Direct segments (raw `blkif_request_segment`s), valid up to min(nrSegments, 11).
    public var directSegments: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) =
        (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    /// INDIRECT only: the grant refs of the pages holding the segments.
    public var indirectGrefs: (GrantRef, GrantRef, GrantRef, GrantRef, GrantRef, GrantRef, GrantRef, GrantRef) =
        (0, 0, 0, 0, 0, 0, 0, 0)

    public init() {}

    @inlinable public var isIndirect: Bool { operation == BlkifOp.indirect }

    /// The operation that does the I/O: `indirect_op` for INDIRECT, else `operation`.
    @inlinable public var effectiveOp: UInt8 { isIndirect ? indirectOp : operation }

    /// The operation code the response carries (Linux blkback's `pending_req->operation`).
    @inlinable public var responseOp: UInt8 { effectiveOp }

    public var command: BlkCommand {
        switch effectiveOp {
        case BlkifOp.read: return .read
        case BlkifOp.write: return .write
        case BlkifOp.writeBarrier where !isIndirect: return .writeBarrier
        case BlkifOp.flushDiskCache where !isIndirect: return .flush
        case BlkifOp.discard where !isIndirect: return .discard
        default: return .unsupported
        }
    }

    /// The i-th direct segment (i < 11).
    @inlinable
    public func directSegment(_ i: Int) -> BlkSegment {
        withUnsafeBytes(of: directSegments) { BlkSegment(raw: $0.load(fromByteOffset: i * 8, as: UInt64.self)) }
    }

    @inlinable
    public func indirectGref(_ i: Int) -> GrantRef {
        withUnsafeBytes(of: indirectGrefs) { $0.load(fromByteOffset: i * 4, as: GrantRef.self) }
    }

    /// Number of indirect pages an INDIRECT request with `nrSegments` uses.
    @inlinable public var indirectPages: Int {
        (nrSegments + BlkifLimits.segmentsPerIndirectPage - 1) / BlkifLimits.segmentsPerIndirectPage
    }
}

// MARK: Decoding

extension BlkRequest {
    /// Decodes a native (x86_64-abi) `blkif_request` copy. Offsets come from the
    /// C headers' structs (`blkif_request`, `blkif_request_discard`,
    /// `blkif_request_indirect`), which all overlay the same 112-byte slot.
    @inlinable
    public static func decode(native r: blkif_request) -> BlkRequest {
        withUnsafeBytes(of: r) { decode(nativeBytes: $0) }
    }

    @inlinable
    public static func decode(nativeBytes b: UnsafeRawBufferPointer) -> BlkRequest {
        typealias RW = blkif_request
        typealias DS = blkif_request_discard
        typealias IN = blkif_request_indirect
        var q = BlkRequest()
        q.operation = b.load(fromByteOffset: MemoryLayout<RW>.offset(of: \.operation)!, as: UInt8.self)
        q.id = b.loadUnaligned(fromByteOffset: MemoryLayout<RW>.offset(of: \.id)!, as: UInt64.self)
        switch q.operation {
        case BlkifOp.discard:
            q.discardSecure = b.load(fromByteOffset: MemoryLayout<DS>.offset(of: \.flag)!, as: UInt8.self)
                & UInt8(BLKIF_DISCARD_SECURE) != 0
            q.sector = b.loadUnaligned(fromByteOffset: MemoryLayout<DS>.offset(of: \.sector_number)!, as: UInt64.self)
            q.discardSectors = b.loadUnaligned(fromByteOffset: MemoryLayout<DS>.offset(of: \.nr_sectors)!, as: UInt64.self)
        case BlkifOp.indirect:
            q.indirectOp = b.load(fromByteOffset: MemoryLayout<IN>.offset(of: \.indirect_op)!, as: UInt8.self)
            q.nrSegments = Int(b.loadUnaligned(fromByteOffset: MemoryLayout<IN>.offset(of: \.nr_segments)!, as: UInt16.self))
            q.sector = b.loadUnaligned(fromByteOffset: MemoryLayout<IN>.offset(of: \.sector_number)!, as: UInt64.self)
            q.handle = b.loadUnaligned(fromByteOffset: MemoryLayout<IN>.offset(of: \.handle)!, as: UInt16.self)
            let g = MemoryLayout<IN>.offset(of: \.indirect_grefs)!
            withUnsafeMutableBytes(of: &q.indirectGrefs) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: b[g..<g + 32])) }
        default:
            q.nrSegments = Int(b.load(fromByteOffset: MemoryLayout<RW>.offset(of: \.nr_segments)!, as: UInt8.self))
            q.handle = b.loadUnaligned(fromByteOffset: MemoryLayout<RW>.offset(of: \.handle)!, as: UInt16.self)
            q.sector = b.loadUnaligned(fromByteOffset: MemoryLayout<RW>.offset(of: \.sector_number)!, as: UInt64.self)
            let s = MemoryLayout<RW>.offset(of: \.seg)!
            withUnsafeMutableBytes(of: &q.directSegments) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: b[s..<s + 88])) }
        }
        return q
    }

    /// Decodes an `x86_32-abi` request by byte offsets, as Linux blkback's
    /// `blkif_x86_32_request` (common.h, packed) lays it out:
    ///
    ///     0 operation u8
    ///     rw:       1 nr_segments u8, 2 handle u16, 4 id u64, 12 sector u64, 20 seg[11] (8 bytes each)
    ///     discard:  1 flag u8, 4 id u64, 12 sector u64, 20 nr_sectors u64
    ///     indirect: 1 indirect_op u8, 2 nr_segments u16, 4 id u64, 12 sector u64,
    ///               20 handle u16, 24 indirect_grefs[8] u32
    ///     other:    4 id u64
    @inlinable
    public static func decode(x86_32 b: UnsafeRawBufferPointer) -> BlkRequest {
        precondition(b.count >= X86_32Layout.requestSize)
        var q = BlkRequest()
        q.operation = b[0]
        q.id = b.loadUnaligned(fromByteOffset: 4, as: UInt64.self)
        switch q.operation {
        case BlkifOp.discard:
            q.discardSecure = b[1] & UInt8(BLKIF_DISCARD_SECURE) != 0
            q.sector = b.loadUnaligned(fromByteOffset: 12, as: UInt64.self)
            q.discardSectors = b.loadUnaligned(fromByteOffset: 20, as: UInt64.self)
        case BlkifOp.indirect:
            q.indirectOp = b[1]
            q.nrSegments = Int(b.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
            q.sector = b.loadUnaligned(fromByteOffset: 12, as: UInt64.self)
            q.handle = b.loadUnaligned(fromByteOffset: 20, as: UInt16.self)
            withUnsafeMutableBytes(of: &q.indirectGrefs) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: b[24..<56])) }
        default:
            q.nrSegments = Int(b[1])
            q.handle = b.loadUnaligned(fromByteOffset: 2, as: UInt16.self)
            q.sector = b.loadUnaligned(fromByteOffset: 12, as: UInt64.self)
            withUnsafeMutableBytes(of: &q.directSegments) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: b[20..<108])) }
        }
        return q
    }
}

// MARK: Encoding (the frontend's side, for test kits and benchmarks)

extension BlkRequest {
    /// Writes this request as a native `blkif_request` (or its discard/indirect overlay).
    public func encode(native b: UnsafeMutableRawBufferPointer) {
        typealias RW = blkif_request
        typealias DS = blkif_request_discard
        typealias IN = blkif_request_indirect
        b.storeBytes(of: operation, toByteOffset: MemoryLayout<RW>.offset(of: \.operation)!, as: UInt8.self)
        b.storeBytes(of: id, toByteOffset: MemoryLayout<RW>.offset(of: \.id)!, as: UInt64.self)
        switch operation {
        case BlkifOp.discard:
            b.storeBytes(of: discardSecure ? UInt8(BLKIF_DISCARD_SECURE) : 0, toByteOffset: MemoryLayout<DS>.offset(of: \.flag)!, as: UInt8.self)
            b.storeBytes(of: sector, toByteOffset: MemoryLayout<DS>.offset(of: \.sector_number)!, as: UInt64.self)
            b.storeBytes(of: discardSectors, toByteOffset: MemoryLayout<DS>.offset(of: \.nr_sectors)!, as: UInt64.self)
        case BlkifOp.indirect:
            b.storeBytes(of: indirectOp, toByteOffset: MemoryLayout<IN>.offset(of: \.indirect_op)!, as: UInt8.self)
            b.storeBytes(of: UInt16(truncatingIfNeeded: nrSegments), toByteOffset: MemoryLayout<IN>.offset(of: \.nr_segments)!, as: UInt16.self)
            b.storeBytes(of: sector, toByteOffset: MemoryLayout<IN>.offset(of: \.sector_number)!, as: UInt64.self)
            b.storeBytes(of: handle, toByteOffset: MemoryLayout<IN>.offset(of: \.handle)!, as: UInt16.self)
            let g = MemoryLayout<IN>.offset(of: \.indirect_grefs)!
            withUnsafeBytes(of: indirectGrefs) { UnsafeMutableRawBufferPointer(rebasing: b[g..<g + 32]).copyMemory(from: $0) }
        default:
            b.storeBytes(of: UInt8(truncatingIfNeeded: nrSegments), toByteOffset: MemoryLayout<RW>.offset(of: \.nr_segments)!, as: UInt8.self)
            b.storeBytes(of: handle, toByteOffset: MemoryLayout<RW>.offset(of: \.handle)!, as: UInt16.self)
            b.storeBytes(of: sector, toByteOffset: MemoryLayout<RW>.offset(of: \.sector_number)!, as: UInt64.self)
            let s = MemoryLayout<RW>.offset(of: \.seg)!
            withUnsafeBytes(of: directSegments) { UnsafeMutableRawBufferPointer(rebasing: b[s..<s + 88]).copyMemory(from: $0) }
        }
    }

    /// Writes this request in i386's packed layout (see ``decode(x86_32:)``).
    public func encode(x86_32 b: UnsafeMutableRawBufferPointer) {
        b[0] = operation
        b.storeBytes(of: id, toByteOffset: 4, as: UInt64.self)
        switch operation {
        case BlkifOp.discard:
            b[1] = discardSecure ? UInt8(BLKIF_DISCARD_SECURE) : 0
            b.storeBytes(of: sector, toByteOffset: 12, as: UInt64.self)
            b.storeBytes(of: discardSectors, toByteOffset: 20, as: UInt64.self)
        case BlkifOp.indirect:
            b[1] = indirectOp
            b.storeBytes(of: UInt16(truncatingIfNeeded: nrSegments), toByteOffset: 2, as: UInt16.self)
            b.storeBytes(of: sector, toByteOffset: 12, as: UInt64.self)
            b.storeBytes(of: handle, toByteOffset: 20, as: UInt16.self)
            withUnsafeBytes(of: indirectGrefs) { UnsafeMutableRawBufferPointer(rebasing: b[24..<56]).copyMemory(from: $0) }
        default:
            b[1] = UInt8(truncatingIfNeeded: nrSegments)
            b.storeBytes(of: handle, toByteOffset: 2, as: UInt16.self)
            b.storeBytes(of: sector, toByteOffset: 12, as: UInt64.self)
            withUnsafeBytes(of: directSegments) { UnsafeMutableRawBufferPointer(rebasing: b[20..<108]).copyMemory(from: $0) }
        }
    }

    /// Sets direct segment `i` (i < 11).
    public mutating func setDirectSegment(_ i: Int, _ s: BlkSegment) {
        withUnsafeMutableBytes(of: &directSegments) { $0.storeBytes(of: s.raw, toByteOffset: i * 8, as: UInt64.self) }
    }

    /// Sets indirect page ref `i` (i < 8).
    public mutating func setIndirectGref(_ i: Int, _ g: GrantRef) {
        withUnsafeMutableBytes(of: &indirectGrefs) { $0.storeBytes(of: g, toByteOffset: i * 4, as: GrantRef.self) }
    }
}

extension BlkSegment {
    /// The 8-byte `blkif_request_segment` (padding zero).
    @inlinable public var raw: UInt64 { UInt64(gref) | UInt64(firstSect) << 32 | UInt64(lastSect) << 40 }
}

// MARK: Validation

/// What validation needs to know about the disk.
public struct DiskGeometry: Sendable, Equatable {
    /// Capacity in 512-byte sectors (`sectors` in XenBus).
    public var sectors: UInt64
    /// Logical sector size in bytes (`sector-size`): 512 or a power of two up to 4096.
    public var sectorSize: Int
    public var readOnly: Bool
    public var discard: Bool
    public var discardSecure: Bool
    public init(sectors: UInt64, sectorSize: Int = 512, readOnly: Bool = false, discard: Bool = true, discardSecure: Bool = false) {
        self.sectors = sectors; self.sectorSize = sectorSize; self.readOnly = readOnly
        self.discard = discard; self.discardSecure = discardSecure
    }
}

/// Why a request was refused; each case names what the frontend did wrong.
public enum BlkRequestError: Error, Sendable, Equatable {
    case unknownOperation(UInt8)
    case badIndirectOperation(UInt8)
    case noSegments
    case tooManySegments(Int)
    case badSegment(index: Int, first: UInt8, last: UInt8)
    case misaligned(sector: UInt64, segmentSectors: Int)
    case rangeOverflow(sector: UInt64, sectors: UInt64)
    case pastEnd(end: UInt64, capacity: UInt64)
    case writeToReadOnly
    case discardNotSupported
    case grantMapFailed(GrantRef)
    case ioError(Int32)

    /// The response status: EOPNOTSUPP for what is not supported, ERROR otherwise.
    public var status: BlkifStatus {
        switch self {
        case .unknownOperation, .discardNotSupported: return .notSupported
        default: return .error
        }
    }
}

extension BlkRequest {
    /// Header checks, before any segment is looked at: the operation, the
    /// segment count, read-only-ness and, for DISCARD, its range. Segment and
    /// range checks of READ/WRITE follow in ``validate(segment:index:geometry:)``
    /// and ``validateRange(totalSectors:geometry:)`` once segments are known
    /// (for INDIRECT they are in guest pages).
    @inlinable
    public func validateHeader(geometry g: DiskGeometry) -> BlkRequestError? {
        let cmd = command
        if cmd == .unsupported {
            return isIndirect ? .badIndirectOperation(indirectOp) : .unknownOperation(operation)
        }
        switch cmd {
        case .discard:
            if g.readOnly { return .writeToReadOnly }
            if !g.discard { return .discardNotSupported }
            let lbs = UInt64(g.sectorSize >> 9)
            if (sector | discardSectors) & (lbs - 1) != 0 { return .misaligned(sector: sector, segmentSectors: Int(truncatingIfNeeded: discardSectors)) }
            let (end, o) = sector.addingReportingOverflow(discardSectors)
            if o { return .rangeOverflow(sector: sector, sectors: discardSectors) }
            if end > g.sectors { return .pastEnd(end: end, capacity: g.sectors) }
            return nil
        case .flush, .writeBarrier:
            if g.readOnly { return .writeToReadOnly }
            if nrSegments > BlkifLimits.maxDirectSegments { return .tooManySegments(nrSegments) }
            return nil
        case .read, .write:
            if cmd == .write && g.readOnly { return .writeToReadOnly }
            let max = isIndirect ? BlkifLimits.maxIndirectSegments : BlkifLimits.maxDirectSegments
            if nrSegments == 0 { return .noSegments }
            if nrSegments > max { return .tooManySegments(nrSegments) }
            return nil
        case .unsupported:
            return .unknownOperation(operation)
        }
    }

    /// One segment: `first_sect <= last_sect <= 7`, and its length a multiple
    /// of the logical sector size (Linux: `(sector | nsec) & (lbs - 1)`).
    @inlinable
    public func validate(segment s: BlkSegment, index: Int, geometry g: DiskGeometry) -> BlkRequestError? {
        guard s.isValid else { return .badSegment(index: index, first: s.firstSect, last: s.lastSect) }
        let lbs = (g.sectorSize >> 9) - 1
        if (Int(truncatingIfNeeded: sector) | s.sectors) & lbs != 0 { return .misaligned(sector: sector, segmentSectors: s.sectors) }
        return nil
    }

    /// The whole range: `sector + total` must neither overflow nor pass the end.
    @inlinable
    public func validateRange(totalSectors: UInt64, geometry g: DiskGeometry) -> BlkRequestError? {
        let (end, o) = sector.addingReportingOverflow(totalSectors)
        if o { return .rangeOverflow(sector: sector, sectors: totalSectors) }
        if end > g.sectors { return .pastEnd(end: end, capacity: g.sectors) }
        return nil
    }

    /// Full validation of a request whose segments are all direct (or given):
    /// header, every segment, then the range. Returns the total sector count.
    public func validate(geometry g: DiskGeometry, segments: [BlkSegment]? = nil) -> Result<UInt64, BlkRequestError> {
        if let e = validateHeader(geometry: g) { return .failure(e) }
        switch command {
        case .discard: return .success(discardSectors)
        default: break
        }
        let n = segments?.count ?? Swift.min(nrSegments, BlkifLimits.maxDirectSegments)
        var total: UInt64 = 0
        for i in 0..<n {
            let s = segments?[i] ?? directSegment(i)
            if let e = validate(segment: s, index: i, geometry: g) { return .failure(e) }
            total += UInt64(s.sectors)
        }
        if n > 0, let e = validateRange(totalSectors: total, geometry: g) { return .failure(e) }
        return .success(total)
    }
}

// MARK: The x86_32 ring

/// Byte layout of i386's blkif ring entries (Linux common.h).
public enum X86_32Layout {
    public static let requestSize = 108
    /// `blkif_x86_32_response` under `#pragma pack(4)`: id u64 @0, operation u8 @8, status i16 @10.
    public static let responseSize = 12
}

/// An `x86_32-abi` request slot: 108 bytes, 4-byte aligned (so the ring's slot
/// stride is 108, as on i386).
public struct BlkifX86_32Request: BitwiseCopyable, Sendable {
    public var words: (UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32,
                       UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32,
                       UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32)
    public init() { words = (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0) }
}

/// An `x86_32-abi` response: 12 bytes, 4-byte aligned.
public struct BlkifX86_32Response: BitwiseCopyable, Sendable {
    public var words: (UInt32, UInt32, UInt32)
    public init() { words = (0, 0, 0) }
    public init(id: UInt64, operation: UInt8, status: Int16) {
        words = (UInt32(truncatingIfNeeded: id), UInt32(truncatingIfNeeded: id >> 32),
                 UInt32(operation) | UInt32(UInt16(bitPattern: status)) << 16)
    }
    public var id: UInt64 { UInt64(words.0) | UInt64(words.1) << 32 }
    public var operation: UInt8 { UInt8(truncatingIfNeeded: words.2) }
    public var status: Int16 { Int16(bitPattern: UInt16(truncatingIfNeeded: words.2 >> 16)) }
}

/// The `x86_32-abi` blkif ring: 108-byte slots, 32 per page as on i386.
public enum BlkifX86_32Ring: RingProtocol {
    public typealias Request = BlkifX86_32Request
    public typealias Response = BlkifX86_32Response
    public static var zeroRequest: BlkifX86_32Request { BlkifX86_32Request() }
    public static var zeroResponse: BlkifX86_32Response { BlkifX86_32Response() }

    /// Zeroes the whole slot, then writes id, operation and status: byte 9 of
    /// the response is padding and must not leak (XSA-216).
    @inlinable
    public static func storeResponse(_ response: BlkifX86_32Response, into slot: UnsafeMutableRawPointer) {
        slot.initializeMemory(as: UInt8.self, repeating: 0, count: slotStride)
        slot.storeBytes(of: response.id, toByteOffset: 0, as: UInt64.self)
        slot.storeBytes(of: response.operation, toByteOffset: 8, as: UInt8.self)
        slot.storeBytes(of: response.status, toByteOffset: 10, as: Int16.self)
    }
}

/// The two ABIs' ring types, as the queue needs them: decode a slot copy,
/// build a response.
///
/// `Request`/`Response` must be BitwiseCopyable; that is required where the
/// rings are used (as XenRing does), not here, because Swift 6.3 cannot
/// deserialize an imported C struct's BitwiseCopyable conformance from
/// another module's protocol requirement.
public protocol BlkifRingABI: RingProtocol {
    static var abi: BlkifABI { get }
    static func decode(_ r: Request) -> BlkRequest
    static func response(id: UInt64, operation: UInt8, status: BlkifStatus) -> Response
    /// The frontend's side, for test kits: a request slot for `q`, and a response's fields.
    static func encode(_ q: BlkRequest) -> Request
    static func fields(_ r: Response) -> (id: UInt64, operation: UInt8, status: Int16)
}

extension BlkifRing: BlkifRingABI {
    public static var abi: BlkifABI { .x86_64 }
    @inlinable public static func decode(_ r: blkif_request) -> BlkRequest { BlkRequest.decode(native: r) }
    @inlinable public static func response(id: UInt64, operation: UInt8, status: BlkifStatus) -> blkif_response {
        var r = blkif_response()
        r.id = id
        r.operation = operation
        r.status = status.rawValue
        return r
    }
    public static func encode(_ q: BlkRequest) -> blkif_request {
        var r = blkif_request()
        withUnsafeMutableBytes(of: &r) { q.encode(native: $0) }
        return r
    }
    public static func fields(_ r: blkif_response) -> (id: UInt64, operation: UInt8, status: Int16) {
        (r.id, r.operation, r.status)
    }
}

extension BlkifX86_32Ring: BlkifRingABI {
    public static var abi: BlkifABI { .x86_32 }
    @inlinable public static func decode(_ r: BlkifX86_32Request) -> BlkRequest {
        withUnsafeBytes(of: r) { BlkRequest.decode(x86_32: $0) }
    }
    @inlinable public static func response(id: UInt64, operation: UInt8, status: BlkifStatus) -> BlkifX86_32Response {
        BlkifX86_32Response(id: id, operation: operation, status: status.rawValue)
    }
    public static func encode(_ q: BlkRequest) -> BlkifX86_32Request {
        var r = BlkifX86_32Request()
        withUnsafeMutableBytes(of: &r) { q.encode(x86_32: $0) }
        return r
    }
    public static func fields(_ r: BlkifX86_32Response) -> (id: UInt64, operation: UInt8, status: Int16) {
        (r.id, r.operation, r.status)
    }
}
