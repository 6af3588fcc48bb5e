import CXen
import Glibc

/// A granted page mapped into this process: Xen's host mapping plus its
/// maptrack handle. The page is reached only through ``region``.
public struct GrantMapping: Sendable {
    public let handle: GrantHandle
    public let domid: DomID
    public let ref: GrantRef
    /// The mapped page, writable only if mapped writable.
    public let region: GuestRegion
}

/// Several grants mapped at consecutive addresses (multi-page rings, ring-ref0..N).
public struct ContiguousGrantMapping: Sendable {
    public let pages: [GrantMapping]
    /// All pages as one region.
    public let region: GuestRegion
}

/// One `gnttab_copy` end: a granted page of another domain, or our own memory.
public enum GrantCopyEnd: @unchecked Sendable {
    case grant(domid: DomID, ref: GrantRef, offset: UInt16)
    /// A buffer of ours (what Xen calls a GMFN of the calling domain).
    case local(UnsafeMutableRawPointer)
}

/// One `gnttab_copy` operation and its status.
public struct GrantCopy: Sendable {
    public var source: GrantCopyEnd
    public var dest: GrantCopyEnd
    public var length: UInt16
    public var status: GrantStatus = .okay
    public init(source: GrantCopyEnd, dest: GrantCopyEnd, length: UInt16) {
        self.source = source
        self.dest = dest
        self.length = length
    }
}

/// `length` bytes at `offset` of a granted page (one end of a copy, read in
/// place by ``Hypervisor/withGrantsInPlace(domid:_:writable:iov:_:)``).
public struct GrantSpan: Sendable {
    public var ref: GrantRef
    public var offset: UInt16
    public var length: UInt16
    public init(ref: GrantRef, offset: UInt16, length: UInt16) {
        self.ref = ref
        self.offset = offset
        self.length = length
    }
}

/// Handle allocation for our maptrack, and where each handle's page is mapped.
struct MapHandles {
    var free: [GrantHandle] = []
    var highWater: GrantHandle = 0
    /// Where each handle's page is mapped (0 while a map is under way, when
    /// no unmap may claim it); ``unmapping`` marks a handle an unmap has claimed.
    var addresses: [UInt] = []
    static let unmapping: UInt = 1
    /// Live mappings per granting domain: a dying domain's objects are dropped
    /// from the cache once this reaches zero.
    var perDomain: [DomID: Int] = [:]
    /// Our maptrack's size, as xenhv set it (Xen's max_maptrack_frames).
    var capacity: GrantHandle = HVLimits.maptrackEntries

    mutating func allocate() -> GrantHandle? {
        if let h = free.popLast() { return h }
        guard highWater < capacity else { return nil }
        defer { highWater += 1 }
        addresses.append(0)
        return highWater
    }
    mutating func release(_ h: GrantHandle) {
        addresses[Int(h)] = 0
        free.append(h)
    }
}

extension Hypervisor {
    @inline(__always) private func maptrackEntry(_ h: GrantHandle) -> UnsafeMutablePointer<UInt64> {
        (maptrack!.base! + MaptrackLayout.headerSize + Int(h) * MaptrackLayout.entryStride)
            .assumingMemoryBound(to: UInt64.self)
    }

    /// Takes `ref`'s entry lock and never releases it: for tests, a mapper
    /// that dies holding it (between the two locks of a grant copy, say).
    package func holdEntryLockForTesting(domid d: DomID, ref: GrantRef) -> Bool {
        guard let dom = foreignDomain(d), ref < dom.active.entries else { return false }
        _ = dom.active.lock(ref, owner: clientID)
        return true
    }

    /// Raises the maptrack's published high-water mark (xenhv scans the
    /// handles below it when this process dies) to `hw`, never lowering it:
    /// two threads mapping at once must not leave it under the larger
    /// handle (Xen raises maptrack_limit only under its lock).
    private func publishHighWater(_ hw: GrantHandle) {
        let p = maptrack!.base!.assumingMemoryBound(to: UInt32.self)
        var seen = cxen_load_acquire_u32(p)
        while seen < hw && cxen_cas_u32(p, &seen, hw) == 0 {}
    }

    /// `GNTTABOP_map_grant_ref` (GNTMAP_host_map, optionally GNTMAP_readonly) for
    /// one ref, with Xen's check order: domain, maptrack handle (GNTST_no_space),
    /// ref in range (GNTST_bad_gntref), entry type and grantee and read-only-ness
    /// (GNTST_general_error), busy bits set by compare-and-swap.
    public func mapGrant(domid d: DomID, ref: GrantRef, writable: Bool) -> Result<GrantMapping, GrantStatus> {
        mapOne(domid: d, ref: ref, writable: writable, at: nil)
    }

    /// Batched `GNTTABOP_map_grant_ref`: each op succeeds or fails on its own.
    public func mapGrants(domid d: DomID, refs: [GrantRef], writable: Bool) -> [Result<GrantMapping, GrantStatus>] {
        refs.map { mapOne(domid: d, ref: $0, writable: writable, at: nil) }
    }

    /// Maps `refs` at consecutive addresses; all or nothing.
    public func mapGrantsContiguous(domid d: DomID, refs: [GrantRef], writable: Bool) -> Result<ContiguousGrantMapping, GrantStatus> {
        guard !refs.isEmpty else { return .failure(.generalError) }
        let size = refs.count * HVLimits.pageSize
        guard let area = mmap(nil, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), area != MAP_FAILED else {
            return .failure(.noSpace)
        }
        var done: [GrantMapping] = []
        for (i, ref) in refs.enumerated() {
            switch mapOne(domid: d, ref: ref, writable: writable, at: area + i * HVLimits.pageSize) {
            case .success(let m): done.append(m)
            case .failure(let s):
                for m in done { _ = unmapGrant(m) }
                munmap(area, size)
                return .failure(s)
            }
        }
        return .success(ContiguousGrantMapping(pages: done, region: GuestRegion(base: area, count: size, writable: writable)))
    }

    private func mapOne(domid d: DomID, ref: GrantRef, writable: Bool, at fixed: UnsafeMutableRawPointer?) -> Result<GrantMapping, GrantStatus> {
        guard maptrack != nil else { return .failure(.permissionDenied) }
        guard let dom = foreignDomain(d) else { return .failure(.badDomain) }
        // The handle counts for the domain from the start, taken under the lock
        // that evicts a dead domain with no mapping left: an unmap elsewhere
        // cannot drop the domain between our lookup and our mapping (its later
        // unmap would find no domain, and the page would stay mapped for good).
        let taken: Result<GrantHandle, GrantStatus> = state.withLock { s in
            guard s.domains[d] === dom else { return .failure(.badDomain) }
            guard let h = s.maps.allocate() else { return .failure(.noSpace) }
            s.maps.perDomain[d, default: 0] += 1
            return .success(h)
        }
        let handle: GrantHandle
        switch taken {
        case .success(let h): handle = h
        case .failure(let e): return .failure(e)
        }
        func abandon() {
            state.withLock { s in
                s.maps.release(handle)
                s.maps.perDomain[d, default: 1] -= 1
                s.evictIfDead(d)
            }
        }
        guard ref < dom.active.entries else {
            abandon()
            return .failure(.badGntref)
        }
        guard let pins = dom.active.lockUnlessDying(ref, owner: clientID) else {
            abandon()
            return .failure(.badDomain)
        }
        // Xen's map_grant_ref refuses a pin past its counter's limit before it touches the entry.
        let status = pins.full(writable: writable)
            ? .generalError : dom.entries.setBusy(ref, mapper: domid, writable: writable, forMap: true)
        guard status == .okay else {
            dom.active.unlock(ref, pins: pins)
            abandon()
            return .failure(status)
        }
        let frame: UInt32
        if pins.any {
            frame = dom.active.frameWord(ref).pointee
        } else {
            frame = dom.entries.frame(ref)  // latched once, as act->frame
            dom.active.frameWord(ref).pointee = frame
        }
        guard frame < dom.pages else {
            dom.entries.releaseBusy(ref, pins: pins)
            dom.active.unlock(ref, pins: pins)
            abandon()
            return .failure(.generalError)
        }
        cxen_store_release_u64(maptrackEntry(handle), MaptrackLayout.pack(domid: d, ref: ref, writable: writable))
        publishHighWater(handle + 1)
        dom.active.unlock(ref, pins: Pins(read: pins.read + (writable ? 0 : 1), write: pins.write + (writable ? 1 : 0)))

        let prot = writable ? (PROT_READ | PROT_WRITE) : PROT_READ
        let flags = MAP_SHARED | (fixed == nil ? 0 : MAP_FIXED)
        let p = mmap(fixed, HVLimits.pageSize, prot, flags, dom.memory.fd.rawValue, off_t(frame) * off_t(HVLimits.pageSize))
        guard let p, p != MAP_FAILED else {
            release(handle: handle, dom: dom, ref: ref, writable: writable)
            return .failure(.generalError)
        }
        state.withLock { $0.maps.addresses[Int(handle)] = UInt(bitPattern: p) }
        return .success(GrantMapping(
            handle: handle, domid: d, ref: ref, region: GuestRegion(base: p, count: HVLimits.pageSize, writable: writable)))
    }

    /// `GNTTABOP_unmap_grant_ref`: unmaps the page and drops its pin; the busy
    /// bits clear when no pin needs them, so the granter can revoke again.
    @discardableResult
    public func unmapGrant(_ m: GrantMapping) -> GrantStatus {
        unmap(handle: m.handle)
    }

    /// Unmaps every page of a contiguous mapping.
    public func unmapGrants(_ m: ContiguousGrantMapping) {
        for p in m.pages { unmap(handle: p.handle) }
    }

    /// `GNTTABOP_unmap_grant_ref` by handle: GNTST_bad_handle for a handle not in use.
    ///
    /// Xen's unmap_common decides which of two unmaps of one handle wins by
    /// reading the maptrack entry again under the active entry's lock. Our
    /// maptrack is this process's own, so the handle is claimed under the
    /// process's state lock instead: of two unmaps at once one claims it and
    /// unmaps it, the other gets GNTST_bad_handle. The page is unmapped before
    /// the pin drops (the granter may revoke and reuse it after), and outside
    /// the entry lock, which another process mapping the same grant would spin
    /// on for the length of the munmap.
    @discardableResult
    public func unmap(handle: GrantHandle) -> GrantStatus {
        guard maptrack != nil else { return .badHandle }
        let claim: (entry: UInt64, address: UInt, dom: ForeignDomain)? = state.withLock { s in
            guard Int(handle) < s.maps.addresses.count else { return nil }
            let e = cxen_load_acquire_u64(maptrackEntry(handle))
            let address = s.maps.addresses[Int(handle)]
            // A handle whose map has not returned (no address yet) is no one's to unmap.
            guard e & MaptrackLayout.inUse != 0, address != 0, address & MapHandles.unmapping == 0,
                  let dom = s.domains[DomID(truncatingIfNeeded: e >> 32)],
                  GrantRef(truncatingIfNeeded: e) < dom.active.entries else { return nil }
            s.maps.addresses[Int(handle)] = address | MapHandles.unmapping
            return (e, address, dom)
        }
        guard let (e, address, dom) = claim else { return .badHandle }
        munmap(UnsafeMutableRawPointer(bitPattern: address), HVLimits.pageSize)
        release(handle: handle, dom: dom, ref: GrantRef(truncatingIfNeeded: e), writable: e & MaptrackLayout.writable != 0)
        return .okay
    }

    /// Drops the pin of `handle` and frees it.
    private func release(handle: GrantHandle, dom: ForeignDomain, ref: GrantRef, writable: Bool) {
        if let pins = dom.active.lockUnlessDying(ref, owner: clientID) {
            let left = Pins(read: pins.read - (writable ? 0 : min(1, pins.read)),
                            write: pins.write - (writable ? min(1, pins.write) : 0))
            dom.entries.releaseBusy(ref, pins: left)
            cxen_store_release_u64(maptrackEntry(handle), 0)
            dom.active.unlock(ref, pins: left)
        } else {
            // Destroyed, with the lock held (by a mapper that may have died
            // holding it): the pin is ours alone to drop.
            cxen_store_release_u64(maptrackEntry(handle), 0)
        }
        state.withLock { s in
            s.maps.release(handle)
            s.maps.perDomain[dom.domid, default: 1] -= 1
            s.evictIfDead(dom.domid)
        }
    }

    /// Batched `GNTTABOP_copy`: for each op, in the order of Xen's
    /// gnttab_copy_one, checks both domains (GNTST_bad_domain), both refs
    /// (GNTST_bad_gntref), pins the grants for the copy (GTF_reading on the
    /// source, GTF_writing on the destination; GNTST_general_error), checks
    /// the offsets (GNTST_bad_copy_arg when `offset + len` crosses the page)
    /// and copies. Each op's status is set in place.
    public func copyGrants(_ ops: inout [GrantCopy]) {
        // One lookup per domain per batch (a batch is one ring pass of one vif).
        var recent: ForeignDomain?
        for i in ops.indices { ops[i].status = copyOne(ops[i], &recent) }
    }

    /// Reaches granted bytes in place for the length of one call: each
    /// distinct grant of `spans` is pinned as `GNTTABOP_copy` pins a source,
    /// or with `writable` a destination (acquire_grant_for_copy: entry
    /// locked, GTF_reading or GTF_writing set, so the granter cannot revoke
    /// it meanwhile; a read-only grant refuses `writable`), `iov[i]` is
    /// pointed at span `i`'s bytes in the granter's memory, and `body` runs;
    /// then every pin is dropped. A `writev` in `body` so takes the bytes
    /// straight from the guest's page and a `readv` puts them straight there,
    /// as Linux netback's tx path maps a packet's fragments instead of copying
    /// them. The grants are locked in ascending order (the copy's order), each
    /// once however many spans name it.
    ///
    /// Returns `body`'s result (a system call's), or the status the first
    /// refused span would get from a copy (nothing is left pinned and `body`
    /// does not run). `body` runs with the entries locked: one bounded call,
    /// no waiting on anyone. Not generic, so a caller in another module runs
    /// it specialized (it is on the data path).
    public func withGrantsInPlace(domid d: DomID, _ spans: UnsafeBufferPointer<GrantSpan>, writable: Bool = false,
                                  iov: UnsafeMutablePointer<iovec>, _ body: () -> Int) -> Result<Int, GrantStatus> {
        guard maptrack != nil else { return .failure(.permissionDenied) }
        guard let dom = foreignDomain(d) else { return .failure(.badDomain) }
        for s in spans where s.ref >= dom.active.entries { return .failure(.badGntref) }
        guard let memory = dom.wholeMemory else { return .failure(.generalError) }
        return withUnsafeTemporaryAllocation(of: (ref: GrantRef, frame: UInt32).self, capacity: spans.count) { pinned in
            // The distinct refs, ascending (insertion: a packet has at most a few dozen).
            var n = 0
            for s in spans {
                var i = n
                while i > 0 && pinned[i - 1].ref > s.ref { i -= 1 }
                if i > 0 && pinned[i - 1].ref == s.ref { continue }
                var j = n
                while j > i { pinned[j] = pinned[j - 1]; j -= 1 }
                pinned[i] = (s.ref, 0)
                n += 1
            }
            var held = 0
            defer { for i in 0..<held { unpinForCopy(CopyEnd(dom: dom, ref: pinned[i].ref, offset: 0)) } }
            while held < n {
                guard let frame = pinForCopy(CopyEnd(dom: dom, ref: pinned[held].ref, offset: 0), writable: writable) else {
                    return .failure(.generalError)
                }
                pinned[held].frame = frame
                held += 1
            }
            for (k, s) in spans.enumerated() {
                // Offsets after the pins, as a copy checks them (gnttab_copy_buf).
                guard Int(s.offset) + Int(s.length) <= HVLimits.pageSize else { return .failure(.badCopyArg) }
                var lo = 0, hi = n - 1  // the span's ref is among the n
                while lo < hi {
                    let mid = (lo + hi) / 2
                    if pinned[mid].ref < s.ref { lo = mid + 1 } else { hi = mid }
                }
                iov[k] = iovec(iov_base: memory + Int(pinned[lo].frame) * HVLimits.pageSize + Int(s.offset),
                               iov_len: Int(s.length))
            }
            return .success(body())
        }
    }

    private struct CopyEnd {
        let dom: ForeignDomain
        let ref: GrantRef
        let offset: Int
        func isDest(of op: GrantCopy) -> Bool {
            if case let .grant(d, r, _) = op.dest { return d == dom.domid && r == ref }
            return false
        }
    }

    /// The granting domain of a copy end (nil for a local buffer).
    private func domain(of end: GrantCopyEnd, _ recent: inout ForeignDomain?) -> Result<ForeignDomain?, GrantStatus> {
        guard case let .grant(d, _, _) = end else { return .success(nil) }
        if let r = recent, r.domid == d, r.active.state != .dying { return .success(r) }
        guard let f = foreignDomain(d) else { return .failure(.badDomain) }
        recent = f
        return .success(f)
    }

    /// A copy end's grant, its ref checked against the table (offsets are checked later).
    private func grant(of end: GrantCopyEnd, in dom: ForeignDomain?) -> Result<CopyEnd?, GrantStatus> {
        guard case let .grant(_, ref, offset) = end, let dom else { return .success(nil) }
        guard ref < dom.active.entries else { return .failure(.badGntref) }
        return .success(CopyEnd(dom: dom, ref: ref, offset: Int(offset)))
    }

    private func copyOne(_ op: GrantCopy, _ recent: inout ForeignDomain?) -> GrantStatus {
        guard maptrack != nil else { return .permissionDenied }
        let len = Int(op.length)
        // Xen's order (gnttab_copy_one): both domains, then the source's
        // grant and the destination's, and the offsets last (gnttab_copy_buf).
        let sd: ForeignDomain?, dd: ForeignDomain?
        switch domain(of: op.source, &recent) { case .success(let x): sd = x; case .failure(let s): return s }
        switch domain(of: op.dest, &recent) { case .success(let x): dd = x; case .failure(let s): return s }
        let src: CopyEnd?, dst: CopyEnd?
        switch grant(of: op.source, in: sd) { case .success(let e): src = e; case .failure(let s): return s }
        switch grant(of: op.dest, in: dd) { case .success(let e): dst = e; case .failure(let s): return s }
        func fits(_ e: CopyEnd?) -> Bool { e.map { $0.offset + len <= HVLimits.pageSize } ?? true }
        let offsetsFit = fits(src) && fits(dst)

        // The same entry on both ends is pinned once, writable.
        if let s = src, let d = dst, s.dom === d.dom, s.ref == d.ref {
            guard let frame = pinForCopy(d, writable: true, alsoReading: true) else { return copyRefusal(d) }
            defer { unpinForCopy(d) }
            guard offsetsFit else { return .badCopyArg }
            let mem = frameAddress(d, frame)
            memmove(mem + d.offset, mem + s.offset, len)
            return .okay
        }
        // Two grants are locked in (domid, ref) order, so two copies never deadlock.
        var first = src, second = dst
        if let s = src, let d = dst, (d.dom.domid, d.ref) < (s.dom.domid, s.ref) { swap(&first, &second) }
        var firstFrame: UInt32 = 0, secondFrame: UInt32 = 0
        if let e = first {
            guard let f = pinForCopy(e, writable: e.isDest(of: op)) else { return copyRefusal(e) }
            firstFrame = f
        }
        defer { if let e = first { unpinForCopy(e) } }
        if let e = second {
            guard let f = pinForCopy(e, writable: e.isDest(of: op)) else { return copyRefusal(e) }
            secondFrame = f
        }
        defer { if let e = second { unpinForCopy(e) } }
        guard offsetsFit else { return .badCopyArg }

        func address(_ end: GrantCopyEnd, _ ce: CopyEnd?) -> UnsafeMutableRawPointer {
            if case let .local(p) = end { return p }
            let ce = ce!
            let frame = (first.map { $0.dom === ce.dom && $0.ref == ce.ref } ?? false) ? firstFrame : secondFrame
            return frameAddress(ce, frame) + ce.offset
        }
        guard src.map({ $0.dom.wholeMemory != nil }) ?? true, dst.map({ $0.dom.wholeMemory != nil }) ?? true else {
            return .generalError
        }
        memmove(address(op.dest, dst), address(op.source, src), len)
        return .okay
    }

    /// Transient pin for a copy (`acquire_grant_for_copy`): the entry lock is
    /// held for the whole copy, busy bits set so the granter cannot revoke it
    /// mid-copy. Returns the frame, or nil (entry lock released) when refused:
    /// as on Xen, also when the counter the pin would raise (read for a
    /// source, write for a destination; `alsoReading` when one entry is both)
    /// is at its limit.
    /// Why a copy end could not be pinned: its domain is being destroyed
    /// (GNTST_bad_domain, as a map of it is refused), else GNTST_general_error.
    private func copyRefusal(_ e: CopyEnd) -> GrantStatus {
        e.dom.active.state == .dying ? .badDomain : .generalError
    }

    private func pinForCopy(_ e: CopyEnd, writable: Bool, alsoReading: Bool = false) -> UInt32? {
        guard let pins = e.dom.active.lockUnlessDying(e.ref, owner: clientID) else { return nil }
        guard !pins.full(writable: writable), !(alsoReading && pins.full(writable: false)),
              e.dom.entries.setBusy(e.ref, mapper: domid, writable: writable, forMap: false) == .okay else {
            e.dom.active.unlock(e.ref, pins: pins)
            return nil
        }
        let frame = pins.any ? e.dom.active.frameWord(e.ref).pointee : e.dom.entries.frame(e.ref)
        guard frame < e.dom.pages else {
            unpinForCopy(e)
            return nil
        }
        return frame
    }

    private func unpinForCopy(_ e: CopyEnd) {
        let pins = Pins(raw: UInt32(truncatingIfNeeded: cxen_load_acquire_u64(e.dom.active.word(e.ref))))
        e.dom.entries.releaseBusy(e.ref, pins: pins)
        e.dom.active.unlock(e.ref, pins: pins)
    }

    @inline(__always) private func frameAddress(_ e: CopyEnd, _ frame: UInt32) -> UnsafeMutableRawPointer {
        e.dom.wholeMemory! + Int(frame) * HVLimits.pageSize
    }
}

/// A privileged mapping of a guest's frames, not through a grant.
public final class ForeignMapping: @unchecked Sendable {
    // Sound: immutable; unmapped once, at deinit.
    public let domid: DomID
    public let region: GuestRegion
    let base: UnsafeMutableRawPointer
    let size: Int
    /// Counted like a grant mapping, so a dead domain's objects are dropped
    /// at the last unmap of either kind.
    let owner: Hypervisor
    init(domid: DomID, base: UnsafeMutableRawPointer, size: Int, writable: Bool, owner: Hypervisor) {
        self.domid = domid
        self.base = base
        self.size = size
        self.owner = owner
        region = GuestRegion(base: base, count: size, writable: writable)
    }
    deinit {
        munmap(base, size)
        owner.state.withLock { s in
            s.maps.perDomain[domid, default: 1] -= 1
            s.evictIfDead(domid)
        }
    }
}

extension Hypervisor {
    /// `xenforeignmemory_map` (privcmd MMAPBATCH): dom0 maps `count` frames of a
    /// guest starting at `frame`, as xenstored maps a guest's xenstore page
    /// (start_info.store_mfn) after XS_INTRODUCE. Dom0 only; frames are checked
    /// against the guest's memory.
    public func mapForeignFrames(domid d: DomID, frame: UInt64, count: Int = 1, writable: Bool = true) throws -> ForeignMapping {
        guard isPrivileged else { throw XenErrno.EPERM }
        guard let dom = foreignDomain(d) else { throw XenErrno.ESRCH }
        guard count > 0, frame < UInt64(dom.pages), UInt64(count) <= UInt64(dom.pages) - frame else { throw XenErrno.EINVAL }
        let size = count * HVLimits.pageSize
        let p = mmap(nil, size, writable ? (PROT_READ | PROT_WRITE) : PROT_READ, MAP_SHARED,
                     dom.memory.fd.rawValue, off_t(frame) * off_t(HVLimits.pageSize))
        guard let p, p != MAP_FAILED else { throw HypervisorError.system(call: "mmap", errno: errno) }
        state.withLock { $0.maps.perDomain[d, default: 0] += 1 }
        return ForeignMapping(domid: d, base: p, size: size, writable: writable, owner: self)
    }
}
