import CXen
import Glibc
import XenHV

/// `xc_domain_dumpcore` (libxl_domain_core_dump): a domain's memory as a Xen
/// dump-core file (docs/misc/dump-core-format.txt): an ELF64 ET_CORE file with
/// no program headers and the sections `.note.Xen` (the none, header,
/// xen_version and format_version notes), `.xen_prstatus` (one
/// `vcpu_guest_context_t` per vCPU), `.xen_p2m` (pfn, gmfn pairs, as for a PV
/// domain) and `.xen_pages`. The toolstack maps the guest's frames as dom0
/// (`mapForeignFrames`), as libxc does through privcmd.
///
/// Deviations: a guest here is a process, so its vCPU contexts are zero
/// (there are no registers to save), and the P2M is the identity.
enum CoreDump {
    /// XEN_ELFNOTE_DUMPCORE_* (elfnote.h).
    static let noteNone: UInt32 = 0x200_0000
    static let noteHeader: UInt32 = 0x200_0001
    static let noteXenVersion: UInt32 = 0x200_0002
    static let noteFormatVersion: UInt32 = 0x200_0003
    /// XC_CORE_MAGIC: a paravirtualised domain.
    static let magic: UInt64 = 0xF00F_EBED
    /// Format (major 0, minor 1).
    static let formatVersion: UInt64 = 1

    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    /// Writes domain `domid` (`pages` frames, `vcpus` vCPUs) to `path`.
    static func write(_ hv: Hypervisor, domid: DomID, pages: UInt32, vcpus: UInt32, to path: String) throws {
        let mapping = try hv.mapForeignFrames(domid: domid, frame: 0, count: Int(pages), writable: false)
        let nrPages = UInt64(pages)
        let pageSize = UInt64(HVLimits.pageSize)

        var shstrtab: [UInt8] = [0]
        func name(_ s: String) -> UInt32 {
            let off = UInt32(shstrtab.count)
            shstrtab += Array(s.utf8) + [0]
            return off
        }
        let names = (shstrtab: name(".shstrtab"), note: name(".note.Xen"), prstatus: name(".xen_prstatus"),
                     p2m: name(".xen_p2m"), pages: name(".xen_pages"))

        var notes = ByteWriter()
        func note(_ type: UInt32, _ desc: [UInt8]) {
            notes.u32(4); notes.u32(UInt32(desc.count)); notes.u32(type)
            notes.bytes(Array("Xen\0".utf8))
            notes.bytes(desc)
            notes.pad(to: 4)
        }
        note(noteNone, [])
        var header = ByteWriter()
        header.u64(magic); header.u64(UInt64(vcpus)); header.u64(nrPages); header.u64(pageSize)
        note(noteHeader, header.data)
        // xen_dumpcore_elfnote_xen_version_desc: what XENVER_* would answer.
        var version = ByteWriter()
        version.u64(UInt64(__XEN_INTERFACE_VERSION__ >> 16)); version.u64(UInt64((__XEN_INTERFACE_VERSION__ >> 8) & 0xFF))
        version.string("-swiftxen", size: MemoryLayout<xen_extraversion_t>.size)
        version.zeros(MemoryLayout<xen_compile_info_t>.size)
        version.string("xen-3.0-x86_64", size: MemoryLayout<xen_capabilities_info_t>.size)
        version.zeros(MemoryLayout<xen_changeset_info_t>.size)
        version.zeros(MemoryLayout<xen_platform_parameters_t>.size)
        version.u64(pageSize)
        note(noteXenVersion, version.data)
        var format = ByteWriter()
        format.u64(formatVersion)
        note(noteFormatVersion, format.data)

        let prstatusSize = UInt64(vcpus) * UInt64(MemoryLayout<vcpu_guest_context_t>.size)
        // Layout: ELF header, .shstrtab, .note.Xen, .xen_prstatus, .xen_p2m, then
        // the page-aligned .xen_pages, then the section headers.
        let shstrtabOff: UInt64 = 64
        let noteOff = align(shstrtabOff + UInt64(shstrtab.count), 8)
        let prstatusOff = align(noteOff + UInt64(notes.data.count), 8)
        let p2mOff = align(prstatusOff + prstatusSize, 8)
        let pagesOff = align(p2mOff + nrPages * 16, pageSize)
        let shOff = pagesOff + nrPages * pageSize

        var ehdr = ByteWriter()
        ehdr.bytes([0x7F, 0x45, 0x4C, 0x46, 2 /* ELFCLASS64 */, 1 /* ELFDATA2LSB */, 1 /* EV_CURRENT */, 0 /* ELFOSABI_SYSV */])
        ehdr.zeros(8)
        ehdr.u16(4 /* ET_CORE */); ehdr.u16(62 /* EM_X86_64 */); ehdr.u32(1)
        ehdr.u64(0); ehdr.u64(0); ehdr.u64(shOff)
        ehdr.u32(0); ehdr.u16(64); ehdr.u16(0); ehdr.u16(0); ehdr.u16(64); ehdr.u16(6); ehdr.u16(1)

        var shdrs = ByteWriter()
        func section(_ name: UInt32, _ type: UInt32, _ off: UInt64, _ size: UInt64, align: UInt64, entsize: UInt64 = 0) {
            shdrs.u32(name); shdrs.u32(type); shdrs.u64(0); shdrs.u64(0); shdrs.u64(off); shdrs.u64(size)
            shdrs.u32(0); shdrs.u32(0); shdrs.u64(align); shdrs.u64(entsize)
        }
        section(0, 0, 0, 0, align: 0)
        section(names.shstrtab, 3 /* SHT_STRTAB */, shstrtabOff, UInt64(shstrtab.count), align: 1)
        section(names.note, 7 /* SHT_NOTE */, noteOff, UInt64(notes.data.count), align: 4)
        section(names.prstatus, 1 /* SHT_PROGBITS */, prstatusOff, prstatusSize, align: 8,
                entsize: UInt64(MemoryLayout<vcpu_guest_context_t>.size))
        section(names.p2m, 1, p2mOff, nrPages * 16, align: 8, entsize: 16)
        section(names.pages, 1, pagesOff, nrPages * pageSize, align: pageSize, entsize: pageSize)

        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw Failure(description: "\(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        func put(_ bytes: [UInt8], at off: UInt64) throws {
            try bytes.withUnsafeBytes { try put($0, at: off) }
        }
        func put(_ buf: UnsafeRawBufferPointer, at off: UInt64) throws {
            var done = 0
            while done < buf.count {
                let n = pwrite(fd, buf.baseAddress! + done, buf.count - done, off_t(off) + off_t(done))
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { throw Failure(description: "\(path): \(String(cString: strerror(errno)))") }
                done += n
            }
        }
        try put(ehdr.data, at: 0)
        try put(shstrtab, at: shstrtabOff)
        try put(notes.data, at: noteOff)
        try put([UInt8](repeating: 0, count: Int(prstatusSize)), at: prstatusOff)
        var p2m = ByteWriter()
        for pfn in 0..<nrPages { p2m.u64(pfn); p2m.u64(pfn) }
        try put(p2m.data, at: p2mOff)
        // Guest memory only through its GuestRegion, read once straight into the file.
        try mapping.region.withUnsafeBytes(offset: 0, count: Int(nrPages * pageSize)) { try put($0, at: pagesOff) }
        try put(shdrs.data, at: shOff)
    }

    static func align(_ v: UInt64, _ a: UInt64) -> UInt64 { (v + a - 1) / a * a }

    struct ByteWriter {
        var data: [UInt8] = []
        mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { data += $0 } }
        mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { data += $0 } }
        mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { data += $0 } }
        mutating func bytes(_ b: [UInt8]) { data += b }
        mutating func zeros(_ n: Int) { data += [UInt8](repeating: 0, count: n) }
        mutating func pad(to a: Int) { zeros((a - data.count % a) % a) }
        mutating func string(_ s: String, size: Int) {
            let b = Array(s.utf8.prefix(size - 1))
            data += b
            zeros(size - b.count)
        }
    }
}
