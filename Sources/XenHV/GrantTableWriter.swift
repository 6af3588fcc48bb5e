import CXen
import Glibc

/// The granting side of grant tables v1, as a guest kernel drives it: the
/// guest writes `grant_entry_v1` entries in its own table directly
/// (Linux's gnttab_grant_foreign_access_ref / gnttab_end_foreign_access_ref).
public struct GrantTableWriter: @unchecked Sendable {
    // Sound: every access to an entry's flags is atomic; the table memory is
    // kept alive by `memory`.
    let memory: SharedMemory
    let entries: SharedGrantEntries

    init(memory: SharedMemory) {
        self.memory = memory
        entries = SharedGrantEntries(base: memory.base!, capacity: HVLimits.maxGrantFrames * HVLimits.grantEntriesPerFrame)
    }

    /// Grants `domid` access to our frame `frame`: domid and frame first, then
    /// the flags, after a write barrier, as the ABI requires.
    public func grantAccess(_ ref: GrantRef, to domid: DomID, frame: UInt32, readOnly: Bool) {
        precondition(ref < entries.capacity, "grant ref \(ref) beyond the table")
        let p = memory.base! + Int(ref) * 8
        (p + 2).storeBytes(of: domid, as: UInt16.self)
        (p + 4).storeBytes(of: frame, as: UInt32.self)
        let flags = UInt16(GTF_permit_access) | (readOnly ? UInt16(GTF_readonly) : 0)
        cxen_store_release_u16(entries.flags(ref), flags)
    }

    /// Revokes an entry: succeeds only while nobody has it mapped or is copying
    /// (GTF_reading and GTF_writing clear), by compare-and-swap, so a revoke
    /// can never race a map. Returns false when the entry is in use.
    public func endAccess(_ ref: GrantRef) -> Bool {
        precondition(ref < entries.capacity, "grant ref \(ref) beyond the table")
        let f = entries.flags(ref)
        var cur = cxen_load_acquire_u16(f)
        while true {
            if cur & UInt16(GTF_reading | GTF_writing) != 0 { return false }
            if cxen_cas_u16(f, &cur, 0) != 0 { return true }
        }
    }

    /// The entry's current flags (GTF_*), as the guest sees them.
    public func flags(_ ref: GrantRef) -> UInt16 { cxen_load_acquire_u16(entries.flags(ref)) }

    /// Writes raw entry bytes, for tests and hostile guests that lie.
    public func writeRawEntry(_ ref: GrantRef, flags: UInt16, domid: DomID, frame: UInt32) {
        let p = memory.base! + Int(ref) * 8
        (p + 2).storeBytes(of: domid, as: UInt16.self)
        (p + 4).storeBytes(of: frame, as: UInt32.self)
        cxen_store_release_u16(entries.flags(ref), flags)
    }
}
