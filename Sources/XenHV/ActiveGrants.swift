import CXen
import Glibc

/// A view on a domain's hypervisor-private area: the control page and the
/// active-grant entries (Xen's `struct active_grant_entry`, one per grant ref).
///
/// Each active entry is a u64 word — lock owner (bits 32-63, 0 when free),
/// write pins (16-31), read pins (0-15) — and the frame latched at first pin.
/// Pins and the guest-visible GTF_reading/GTF_writing bits change only under
/// the entry's lock, so a mapper that dies mid-operation leaves a lock that
/// xenhv can take over and repair from the live maptracks.
package struct ActiveGrantTable: @unchecked Sendable {
    // Sound: the area is shared memory accessed only with atomics, and the
    // owner keeps the mapping alive.
    package let base: UnsafeMutableRawPointer
    package init(base: UnsafeMutableRawPointer) { self.base = base }

    package var state: DomainState? {
        DomainState(rawValue: cxen_load_acquire_u32((base + PrivateLayout.stateOffset).assumingMemoryBound(to: UInt32.self)))
    }
    package func setState(_ s: DomainState) {
        cxen_store_release_u32((base + PrivateLayout.stateOffset).assumingMemoryBound(to: UInt32.self), s.rawValue)
    }
    package var grantFrames: UInt32 {
        cxen_load_acquire_u32((base + PrivateLayout.grantFramesOffset).assumingMemoryBound(to: UInt32.self))
    }
    package func setGrantFrames(_ n: UInt32) {
        cxen_store_release_u32((base + PrivateLayout.grantFramesOffset).assumingMemoryBound(to: UInt32.self), n)
    }
    package var nrPages: UInt32 {
        cxen_load_acquire_u32((base + PrivateLayout.pagesOffset).assumingMemoryBound(to: UInt32.self))
    }
    package func setPages(_ n: UInt32) {
        cxen_store_release_u32((base + PrivateLayout.pagesOffset).assumingMemoryBound(to: UInt32.self), n)
    }
    /// `nr_grant_entries()`.
    package var entries: UInt32 { grantFrames * HVLimits.grantEntriesPerFrame }

    @inline(__always) package func word(_ ref: GrantRef) -> UnsafeMutablePointer<UInt64> {
        (base + PrivateLayout.controlSize + Int(ref) * PrivateLayout.activeStride).assumingMemoryBound(to: UInt64.self)
    }
    @inline(__always) package func frameWord(_ ref: GrantRef) -> UnsafeMutablePointer<UInt32> {
        (base + PrivateLayout.controlSize + Int(ref) * PrivateLayout.activeStride + 8).assumingMemoryBound(to: UInt32.self)
    }

    /// Takes the entry lock for `owner` (non-zero) and returns the pins.
    @inline(__always) package func lock(_ ref: GrantRef, owner: UInt32) -> Pins {
        acquire(ref, owner: owner) { false }!
    }

    /// ``lock(_:owner:)`` for a mapper, which gives up (nil) once the domain
    /// is destroyed: a mapper that died holding the lock of a destroyed
    /// domain's entry is never repaired (xenhv repairs live domains'), and
    /// nobody reads a destroyed domain's pins or flags again.
    @inline(__always) package func lockUnlessDying(_ ref: GrantRef, owner: UInt32) -> Pins? {
        acquire(ref, owner: owner) { state == .dying }
    }

    /// Spins for the lock (yielding after a while), asking `giveUp` each
    /// time it yields.
    @inline(__always) private func acquire(_ ref: GrantRef, owner: UInt32, giveUp: () -> Bool) -> Pins? {
        let w = word(ref)
        var spins = 0
        while true {
            var cur = cxen_load_acquire_u64(w)
            if cur >> 32 == 0 {
                if cxen_cas_u64(w, &cur, UInt64(owner) << 32 | (cur & 0xFFFF_FFFF)) != 0 {
                    return Pins(raw: UInt32(truncatingIfNeeded: cur))
                }
                continue
            }
            spins += 1
            if spins > 64 {
                if giveUp() { return nil }
                sched_yield()
            }
        }
    }

    /// Takes the lock for `owner` if it is free or held by one of `gone`
    /// (mappers that died holding it) and returns the pins; nil while a live
    /// owner holds it (xenhv never waits on a dom0 process unboundedly).
    package func tryLock(_ ref: GrantRef, owner: UInt32, stealingFrom gone: Set<UInt32>) -> Pins? {
        let w = word(ref)
        while true {
            var cur = cxen_load_acquire_u64(w)
            let holder = UInt32(cur >> 32)
            guard holder == 0 || gone.contains(holder) else { return nil }
            if cxen_cas_u64(w, &cur, UInt64(owner) << 32 | (cur & 0xFFFF_FFFF)) != 0 {
                return Pins(raw: UInt32(truncatingIfNeeded: cur))
            }
        }
    }

    @inline(__always) package func unlock(_ ref: GrantRef, pins: Pins) {
        cxen_store_release_u64(word(ref), UInt64(pins.raw))
    }

    package func lockOwner(_ ref: GrantRef) -> UInt32 { UInt32(cxen_load_acquire_u64(word(ref)) >> 32) }
}

/// Read and write pin counts of an active grant (`act->pin`).
///
/// Xen keeps four 8-bit counters (host and device, read and write; we have
/// host mappings only) and refuses a pin whose counter already has its top
/// bit set (`act->pin & GNTPIN_incr2oflow_mask(pin_incr)`, "risk of counter
/// overflow"), so none passes 128. Ours are 16 bits wide (the word's layout
/// is shared by every mapper and xenhv) and stop at the same 128.
package struct Pins: Equatable {
    package var raw: UInt32
    package var read: UInt32 { raw & 0xFFFF }
    package var write: UInt32 { raw >> 16 }
    package var any: Bool { raw != 0 }
    /// Xen's pins per counter: 2^(GNTPIN_cntr_width - 1).
    package static let limit: UInt32 = 128
    /// Whether a read (or, `writable`, a write) pin would pass the limit.
    package func full(writable: Bool) -> Bool { (writable ? write : read) >= Pins.limit }
    package init(raw: UInt32) { self.raw = raw }
    package init(read: UInt32, write: UInt32) { raw = min(read, 0xFFFF) | min(write, 0xFFFF) << 16 }
}

/// The guest-written grant table of one domain (`grant_entry_v1_t[]`).
package struct SharedGrantEntries: @unchecked Sendable {
    // Sound: guest-writable shared memory, touched only with atomics.
    package let base: UnsafeMutableRawPointer
    package let capacity: UInt32
    package init(base: UnsafeMutableRawPointer, capacity: UInt32) {
        self.base = base
        self.capacity = capacity
    }

    @inline(__always) package func header(_ ref: GrantRef) -> UnsafeMutablePointer<UInt32> {
        (base + Int(ref) * 8).assumingMemoryBound(to: UInt32.self)
    }
    @inline(__always) package func flags(_ ref: GrantRef) -> UnsafeMutablePointer<UInt16> {
        (base + Int(ref) * 8).assumingMemoryBound(to: UInt16.self)
    }
    @inline(__always) package func frame(_ ref: GrantRef) -> UInt32 {
        cxen_load_acquire_u32((base + Int(ref) * 8 + 4).assumingMemoryBound(to: UInt32.self))
    }

    /// Xen's `_set_status_v1`: checks the entry grants `mapper` access of the
    /// permit_access type (no sub-page for maps) and, for a writable pin, is not
    /// read-only; then sets GTF_reading (and GTF_writing) with compare-and-swap
    /// on the flags+domid word, giving up as unstable after five tries.
    @inline(__always)
    package func setBusy(_ ref: GrantRef, mapper: DomID, writable: Bool, forMap: Bool) -> GrantStatus {
        let h = header(ref)
        var cur = cxen_load_acquire_u32(h)
        let mask = UInt16(GTF_type_mask) | (forMap ? UInt16(GTF_sub_page) : 0)
        for _ in 0..<5 {
            let flags = UInt16(truncatingIfNeeded: cur)
            let domid = UInt16(truncatingIfNeeded: cur >> 16)
            guard flags & mask == UInt16(GTF_permit_access), domid == mapper else { return .generalError }
            var newFlags = flags | UInt16(GTF_reading)
            if writable {
                guard flags & UInt16(GTF_readonly) == 0 else { return .generalError }
                newFlags |= UInt16(GTF_writing)
            }
            if newFlags == flags { return .okay }
            if cxen_cas_u32(h, &cur, UInt32(newFlags) | UInt32(domid) << 16) != 0 { return .okay }
        }
        return .generalError
    }

    /// Clears the busy bits no pin needs any more (`gnttab_clear_flags`).
    @inline(__always)
    package func releaseBusy(_ ref: GrantRef, pins: Pins) {
        var clear: UInt16 = 0
        if pins.write == 0 { clear |= UInt16(GTF_writing) }
        if !pins.any { clear |= UInt16(GTF_reading) }
        if clear != 0 { _ = cxen_fetch_and_u16(flags(ref), ~clear) }
    }
}
