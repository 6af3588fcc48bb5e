import Synchronization

/// Per-device counters, Linux blkback's `statistics/` directory
/// (oo_req, rd_req, wr_req, f_req, ds_req, rd_sect, wr_sect) plus errors.
///
/// Each queue owns one `BlkStats` and is its only writer, so a bump is a
/// relaxed load and store (no locked instruction on the hot path); readers
/// on other threads see a recent value. A device sums its queues' counters.
public final class BlkStats: Sendable {
    public struct Snapshot: Sendable, Equatable, CustomStringConvertible {
        /// Times a request had to wait for resources: every bounce page in flight (`oo_req`).
        public var outOfRequests: UInt64 = 0
        public var readRequests: UInt64 = 0
        public var writeRequests: UInt64 = 0
        /// FLUSH_DISKCACHE and WRITE_BARRIER (`f_req`).
        public var flushRequests: UInt64 = 0
        public var discardRequests: UInt64 = 0
        public var sectorsRead: UInt64 = 0
        public var sectorsWritten: UInt64 = 0
        /// Requests answered BLKIF_RSP_ERROR.
        public var errors: UInt64 = 0
        /// Requests answered BLKIF_RSP_EOPNOTSUPP.
        public var unsupported: UInt64 = 0
        /// Times the event channel was muted for a storm of kicks with no requests.
        public var spuriousStorms: UInt64 = 0
        /// Segments served through a bounce page and a grant copy (not persistent).
        public var bouncedSegments: UInt64 = 0

        public init() {}

        public static func + (a: Snapshot, b: Snapshot) -> Snapshot {
            var s = Snapshot()
            s.outOfRequests = a.outOfRequests + b.outOfRequests
            s.readRequests = a.readRequests + b.readRequests
            s.writeRequests = a.writeRequests + b.writeRequests
            s.flushRequests = a.flushRequests + b.flushRequests
            s.discardRequests = a.discardRequests + b.discardRequests
            s.sectorsRead = a.sectorsRead + b.sectorsRead
            s.sectorsWritten = a.sectorsWritten + b.sectorsWritten
            s.errors = a.errors + b.errors
            s.unsupported = a.unsupported + b.unsupported
            s.spuriousStorms = a.spuriousStorms + b.spuriousStorms
            s.bouncedSegments = a.bouncedSegments + b.bouncedSegments
            return s
        }

        public var description: String {
            "oo_req \(outOfRequests) rd_req \(readRequests) wr_req \(writeRequests) f_req \(flushRequests) "
                + "ds_req \(discardRequests) rd_sect \(sectorsRead) wr_sect \(sectorsWritten) "
                + "errors \(errors) unsupported \(unsupported) storms \(spuriousStorms) "
                + "bounced_seg \(bouncedSegments)"
        }
    }

    let outOfRequests = Atomic<UInt64>(0)
    let readRequests = Atomic<UInt64>(0)
    let writeRequests = Atomic<UInt64>(0)
    let flushRequests = Atomic<UInt64>(0)
    let discardRequests = Atomic<UInt64>(0)
    let sectorsRead = Atomic<UInt64>(0)
    let sectorsWritten = Atomic<UInt64>(0)
    let errors = Atomic<UInt64>(0)
    let unsupported = Atomic<UInt64>(0)
    let spuriousStorms = Atomic<UInt64>(0)
    let bouncedSegments = Atomic<UInt64>(0)

    public init() {}

    /// Single-writer increment: only the owning queue's thread calls this.
    @inline(__always)
    static func bump(_ a: borrowing Atomic<UInt64>, by n: UInt64 = 1) {
        a.store(a.load(ordering: .relaxed) &+ n, ordering: .relaxed)
    }

    public var snapshot: Snapshot {
        var s = Snapshot()
        s.outOfRequests = outOfRequests.load(ordering: .relaxed)
        s.readRequests = readRequests.load(ordering: .relaxed)
        s.writeRequests = writeRequests.load(ordering: .relaxed)
        s.flushRequests = flushRequests.load(ordering: .relaxed)
        s.discardRequests = discardRequests.load(ordering: .relaxed)
        s.sectorsRead = sectorsRead.load(ordering: .relaxed)
        s.sectorsWritten = sectorsWritten.load(ordering: .relaxed)
        s.errors = errors.load(ordering: .relaxed)
        s.unsupported = unsupported.load(ordering: .relaxed)
        s.spuriousStorms = spuriousStorms.load(ordering: .relaxed)
        s.bouncedSegments = bouncedSegments.load(ordering: .relaxed)
        return s
    }
}
