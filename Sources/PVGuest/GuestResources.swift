import Synchronization
import XenBus
import XenHV

/// The guest kernel's page allocator, over its own pseudo-physical memory:
/// frames handed to drivers for rings and I/O buffers. The builder's special
/// pages at the top (start_info, xenstore, console) are never handed out.
/// A device that goes away (hot-unplug) gives its frames back with ``free(_:count:)``
/// once no grant exposes them any more; the next device reuses them.
public final class GuestPages: Sendable {
    let memory: SharedMemory
    /// The bump pointer and the extents given back (sorted, coalesced).
    let state: Mutex<(next: UInt32, free: [Range<UInt32>])>
    let limit: UInt32

    public init(hypervisor hv: Hypervisor, firstFrame: UInt32 = 16) throws {
        guard let m = hv.memory else { throw HypervisorError.protocolViolation("not a guest connection") }
        memory = m
        state = Mutex((firstFrame, []))
        limit = UInt32(m.size / HVLimits.pageSize) - SpecialPages.reserved
    }

    /// `n` consecutive zeroed frames (first fit among freed extents, else fresh ones).
    public func allocate(_ n: Int) throws -> UInt32 {
        let first: UInt32? = state.withLock { s in
            if let i = s.free.firstIndex(where: { $0.count >= n }) {
                let r = s.free[i]
                if r.count == n { s.free.remove(at: i) } else { s.free[i] = r.lowerBound + UInt32(n)..<r.upperBound }
                return r.lowerBound
            }
            guard UInt64(s.next) + UInt64(n) <= UInt64(limit) else { return nil }
            defer { s.next += UInt32(n) }
            return s.next
        }
        guard let first else { throw HypervisorError.protocolViolation("guest memory exhausted (\(limit) pages)") }
        try memory.region.fill(0, at: Int(first) * HVLimits.pageSize, count: n * HVLimits.pageSize)
        return first
    }

    /// Gives back `n` frames from `first` (Linux's free_pages). Only for frames
    /// no grant still exposes: see ``GrantRefs/revoke(_:)``.
    public func free(_ first: UInt32, count n: Int) {
        guard n > 0 else { return }
        state.withLock { s in
            var extents = s.free
            extents.append(first..<first + UInt32(n))
            extents.sort { $0.lowerBound < $1.lowerBound }
            var merged: [Range<UInt32>] = []
            for r in extents {
                if let last = merged.last, last.upperBound >= r.lowerBound {
                    merged[merged.count - 1] = last.lowerBound..<max(last.upperBound, r.upperBound)
                } else {
                    merged.append(r)
                }
            }
            // An extent ending at the bump pointer goes back to it.
            if let last = merged.last, last.upperBound == s.next {
                s.next = last.lowerBound
                merged.removeLast()
            }
            s.free = merged
        }
    }

    /// Frames still free, fresh or given back.
    public var available: Int {
        state.withLock { s in Int(limit - s.next) + s.free.reduce(0) { $0 + $1.count } }
    }

    /// The frame as a bounds-checked region.
    public func page(_ frame: UInt32, count: Int = 1) -> GuestRegion {
        try! memory.region.slice(offset: Int(frame) * HVLimits.pageSize, length: count * HVLimits.pageSize)
    }
}

/// The guest's grant-reference allocator (Linux's gnttab free list): refs 0-7
/// are reserved as on Linux; the table grows with GNTTABOP_setup_table.
public final class GrantRefs: Sendable {
    let hv: Hypervisor
    struct State {
        var next: GrantRef = 8
        var free: [GrantRef] = []
        var frames: UInt32 = 0
        /// One bit per ref handed out and not yet released.
        var inUse = [UInt64](repeating: 0, count: Int(HVLimits.maxGrantFrames * HVLimits.grantEntriesPerFrame) / 64)
        var refusedReleases = 0

        mutating func mark(_ r: GrantRef) { inUse[Int(r) / 64] |= 1 << UInt64(r % 64) }
        /// Clears `r`'s bit; false when it was not handed out (a double free).
        mutating func unmark(_ r: GrantRef) -> Bool {
            guard Int(r) / 64 < inUse.count else { return false }
            let bit: UInt64 = 1 << UInt64(r % 64)
            guard inUse[Int(r) / 64] & bit != 0 else { return false }
            inUse[Int(r) / 64] &= ~bit
            return true
        }
    }
    let state = Mutex(State())

    public init(hypervisor hv: Hypervisor) throws {
        self.hv = hv
        let frames = try hv.queryGrantTableSize().frames
        state.withLock { $0.frames = frames }
    }

    public func allocate() throws -> GrantRef {
        if let r = state.withLock({ s -> GrantRef? in
            guard let r = s.free.popLast() else { return nil }
            s.mark(r)
            return r
        }) { return r }
        let taken: (ref: GrantRef, needFrames: UInt32?)? = state.withLock { s in
            let r = s.next
            guard r < HVLimits.maxGrantFrames * HVLimits.grantEntriesPerFrame else { return nil }
            s.next += 1
            s.mark(r)
            let needed = r / HVLimits.grantEntriesPerFrame + 1
            return (r, needed > s.frames ? needed : nil)
        }
        guard let (ref, needFrames) = taken else { throw HypervisorError.protocolViolation("grant table full") }
        if let n = needFrames {
            // Grow in steps of 4 frames, as far as the maximum allows.
            let want = min(HVLimits.maxGrantFrames, (n + 3) / 4 * 4)
            try hv.setupGrantTable(frames: want)
            state.withLock { $0.frames = max($0.frames, want) }
        }
        return ref
    }

    /// Gives `r` back. A ref released twice (a frontend bug: the second
    /// release would hand one ref to two rings) is refused and counted.
    public func release(_ r: GrantRef) {
        state.withLock { s in
            if s.unmark(r) { s.free.append(r) } else { s.refusedReleases += 1 }
        }
    }

    /// Releases refused because the ref was not handed out (double frees).
    public var refusedReleases: Int { state.withLock { $0.refusedReleases } }

    /// Ends the backend's access to `refs` (gnttab_end_foreign_access) and
    /// frees them; a ref the backend still maps stays granted (its page must
    /// not be reused: Linux defers freeing it). True when every ref was revoked.
    public func revoke(_ refs: [GrantRef]) -> Bool {
        var all = true
        for r in refs {
            if hv.grantTable!.endAccess(r) { release(r) } else { all = false }
        }
        return all
    }

    /// Grants `frame` to `domid` on a fresh ref.
    public func grant(frame: UInt32, to domid: DomID, readOnly: Bool) throws -> GrantRef {
        let r = try allocate()
        hv.grantTable!.grantAccess(r, to: domid, frame: frame, readOnly: readOnly)
        return r
    }
}

/// The backend a toolstack named in a frontend directory: its `backend` path
/// and `backend-id` domain, checked.
func backend(of frontendPath: String, _ xs: XenBusClient) throws -> (path: String, id: DomID) {
    let path = try xs.read(frontendPath + "/backend")
    guard let id = DomID(try xs.read(frontendPath + "/backend-id")), id < HVLimits.firstReservedDomID else {
        throw HypervisorError.protocolViolation("\(frontendPath)/backend-id is not a domain id")
    }
    return (path, id)
}
