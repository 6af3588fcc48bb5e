import Synchronization
import XenBus
import XenHV

/// The guest kernel's page allocator, over its own pseudo-physical memory:
/// frames handed to drivers for rings and I/O buffers. The builder's special
/// pages at the top (start_info, xenstore, console) are never handed out.
public final class GuestPages: Sendable {
    let memory: SharedMemory
    let next: Mutex<UInt32>
    let limit: UInt32

    public init(hypervisor hv: Hypervisor, firstFrame: UInt32 = 16) throws {
        guard let m = hv.memory else { throw HypervisorError.protocolViolation("not a guest connection") }
        memory = m
        next = Mutex(firstFrame)
        limit = UInt32(m.size / HVLimits.pageSize) - SpecialPages.reserved
    }

    /// `n` consecutive zeroed frames; they stay allocated for the guest's life.
    public func allocate(_ n: Int) throws -> UInt32 {
        let first: UInt32? = next.withLock { f in
            guard UInt64(f) + UInt64(n) <= UInt64(limit) else { return nil }
            defer { f += UInt32(n) }
            return f
        }
        guard let first else { throw HypervisorError.protocolViolation("guest memory exhausted (\(limit) pages)") }
        try memory.region.fill(0, at: Int(first) * HVLimits.pageSize, count: n * HVLimits.pageSize)
        return first
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
    let state = Mutex<(next: GrantRef, free: [GrantRef], frames: UInt32)>((8, [], 0))

    public init(hypervisor hv: Hypervisor) throws {
        self.hv = hv
        let frames = try hv.queryGrantTableSize().frames
        state.withLock { $0.frames = frames }
    }

    public func allocate() throws -> GrantRef {
        if let r = state.withLock({ $0.free.popLast() }) { return r }
        let (ref, needFrames): (GrantRef, UInt32?) = state.withLock { s in
            let r = s.next
            s.next += 1
            let needed = r / HVLimits.grantEntriesPerFrame + 1
            return (r, needed > s.frames ? needed : nil)
        }
        if let n = needFrames {
            // Grow in steps of 4 frames, as far as the maximum allows.
            let want = min(HVLimits.maxGrantFrames, (n + 3) / 4 * 4)
            guard n <= HVLimits.maxGrantFrames else { throw HypervisorError.protocolViolation("grant table full") }
            try hv.setupGrantTable(frames: want)
            state.withLock { $0.frames = max($0.frames, want) }
        }
        return ref
    }

    public func release(_ r: GrantRef) { state.withLock { $0.free.append(r) } }

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
