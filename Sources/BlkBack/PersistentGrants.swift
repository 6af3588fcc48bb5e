import Glibc
import Synchronization
import XenHV

/// The persistent grants a whole blkback process may keep mapped. Each is a
/// mapping of its own (one VMA), and the kernel refuses a process more than
/// `vm.max_map_count` of them (ENOMEM, 65530 by default): one blkback serves
/// every guest, so the persistent sets of many rings could otherwise take the
/// mappings that other guests' rings, aio contexts and threads need. Linux's
/// persistent grants draw on dom0's maptrack in the same way, which Xen
/// bounds. Beyond the budget a segment is bounced, as beyond a ring's own
/// bound.
public final class MappingBudget: Sendable {
    /// The process's: half of `vm.max_map_count`.
    public static let process = MappingBudget(limit: MappingBudget.maxMapCount() / 2)
    public let limit: Int
    private let used = Atomic<Int>(0)

    public init(limit: Int) { self.limit = Swift.max(0, limit) }

    /// Persistent grants mapped under this budget now.
    public var inUse: Int { used.load(ordering: .relaxed) }

    /// One more mapping, if the budget has room.
    @inline(__always) func take() -> Bool {
        // A spent budget is only read: every queue of every guest shares this
        // counter, and a miss past the budget must not write its cache line.
        guard used.load(ordering: .relaxed) < limit else { return false }
        if used.wrappingAdd(1, ordering: .relaxed).newValue <= limit { return true }
        used.wrappingSubtract(1, ordering: .relaxed)
        return false
    }

    @inline(__always) func give() { used.wrappingSubtract(1, ordering: .relaxed) }

    static func maxMapCount() -> Int {
        let fd = open("/proc/sys/vm/max_map_count", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return 65530 }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: 32)
        let n = read(fd, &buf, buf.count)
        let digits = buf[..<max(0, n)].prefix { $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }
        guard let v = Int(String(decoding: digits, as: UTF8.self)), v > 0 else { return 65530 }
        return v
    }
}

/// Persistent grants of one ring (blkif.h `feature-persistent`), as Linux
/// blkback keeps them: a frontend that negotiated the feature reuses a fixed
/// set of granted pages, so each is mapped once and kept, up to a bound
/// (`xen_blkif_max_pgrants`, 1056 per ring).
///
/// At the bound a miss is not inserted (the queue bounces that segment), so a
/// working set larger than the bound still hits on the pages
/// kept instead of evicting on every miss (plain LRU eviction gets no hits at
/// all on a cyclic working set). Adapting to a new working set is left to
/// ``purge(max:)``, run periodically while misses happen (Linux's
/// purge_persistent_gnt): it unmaps the least recently used idle grants that
/// were not used since the previous purge. A grant in use by an in-flight
/// request is never evicted.
///
/// This type is bookkeeping only: it never calls the hypervisor. The queue maps
/// on a miss and unmaps what ``purge(max:)`` hands back, so the LRU can be
/// tested on its own. All storage is allocated up front; lookups, pins and
/// releases do not allocate.
struct PersistentGrants {
    struct Entry {
        var gref: GrantRef = 0
        var handle: GrantHandle = 0
        /// The mapped page (writable: persistent grants are mapped read-write, as Linux does).
        var base: UnsafeMutableRawPointer? = nil
        /// In-flight requests using this page; only idle entries sit in the LRU list.
        var users: Int32 = 0
        /// Used since the last purge.
        var active = true
        var prev: Int32 = -1
        var next: Int32 = -1
    }

    let capacity: Int
    private let entries: UnsafeMutablePointer<Entry>
    private var index: [GrantRef: Int32]
    private var freeList: [Int32]
    /// Idle entries, most recently used at `head`.
    private var head: Int32 = -1
    private var tail: Int32 = -1
    private(set) var count = 0

    init(capacity: Int) {
        self.capacity = capacity
        entries = .allocate(capacity: Swift.max(capacity, 1))
        entries.initialize(repeating: Entry(), count: Swift.max(capacity, 1))
        index = [:]
        index.reserveCapacity(capacity)
        freeList = (0..<Int32(capacity)).reversed()
    }

    /// Frees the bookkeeping; the caller must have unmapped everything (``removeAll(_:)``).
    func deallocate() { entries.deallocate() }

    /// The entry of `gref`, pinned for one more user; nil on a miss.
    @inline(__always)
    mutating func lookup(_ gref: GrantRef) -> Int32? {
        guard let i = index[gref] else { return nil }
        if entries[Int(i)].users == 0 { unlink(i) }
        entries[Int(i)].users += 1
        entries[Int(i)].active = true
        return i
    }

    @inline(__always) func base(_ i: Int32) -> UnsafeMutableRawPointer { entries[Int(i)].base! }

    /// Whether a new grant can be kept now.
    var canInsert: Bool { !freeList.isEmpty }

    /// Records a freshly mapped grant, pinned for its first user; nil when the
    /// bound is reached (the caller then maps for this request only).
    mutating func insert(gref: GrantRef, handle: GrantHandle, base: UnsafeMutableRawPointer) -> Int32? {
        guard let i = freeList.popLast() else { return nil }
        entries[Int(i)] = Entry(gref: gref, handle: handle, base: base, users: 1)
        index[gref] = i
        count += 1
        return i
    }

    /// Unmaps (through `unmap`) up to `max` idle grants from the least recently
    /// used end that were not used since the previous purge, and starts a new
    /// period for the rest. Returns how many were dropped.
    @discardableResult
    mutating func purge(max: Int, _ unmap: (GrantHandle) -> Void) -> Int {
        var dropped = 0
        var i = tail
        while i >= 0 && dropped < max {
            let prev = entries[Int(i)].prev
            if !entries[Int(i)].active {
                unlink(i)
                index[entries[Int(i)].gref] = nil
                unmap(entries[Int(i)].handle)
                entries[Int(i)] = Entry()
                freeList.append(i)
                count -= 1
                dropped += 1
            }
            i = prev
        }
        for (_, j) in index { entries[Int(j)].active = false }
        return dropped
    }

    /// Drops one user; an entry with no users becomes the most recently used idle one.
    @inline(__always)
    mutating func release(_ i: Int32) {
        entries[Int(i)].users -= 1
        if entries[Int(i)].users == 0 { pushFront(i) }
    }

    /// Forgets every grant, handing each handle to `unmap` (detach).
    mutating func removeAll(_ unmap: (GrantHandle) -> Void) {
        for (_, i) in index { unmap(entries[Int(i)].handle) }
        index.removeAll(keepingCapacity: true)
        freeList = (0..<Int32(capacity)).reversed()
        head = -1
        tail = -1
        count = 0
    }

    /// Grant refs currently kept, least recently used first among idle ones (tests).
    var idleOrder: [GrantRef] {
        var out: [GrantRef] = []
        var i = tail
        while i >= 0 { out.append(entries[Int(i)].gref); i = entries[Int(i)].prev }
        return out
    }

    func contains(_ gref: GrantRef) -> Bool { index[gref] != nil }

    private mutating func unlink(_ i: Int32) {
        let p = entries[Int(i)].prev, n = entries[Int(i)].next
        if p >= 0 { entries[Int(p)].next = n } else { head = n }
        if n >= 0 { entries[Int(n)].prev = p } else { tail = p }
        entries[Int(i)].prev = -1
        entries[Int(i)].next = -1
    }

    private mutating func pushFront(_ i: Int32) {
        entries[Int(i)].prev = -1
        entries[Int(i)].next = head
        if head >= 0 { entries[Int(head)].prev = i } else { tail = i }
        head = i
    }
}
