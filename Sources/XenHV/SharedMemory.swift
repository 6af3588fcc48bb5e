import CXen
import Glibc
import SystemPackage
import XenRing

/// A memfd-backed shared-memory object and, optionally, one mapping of it.
///
/// The hypervisor core's shared state (guest pages, grant tables, shared_info,
/// the private active-grant area, maptracks) all live in these. The owner closes
/// the descriptor and unmaps on deinit.
public final class SharedMemory: @unchecked Sendable {
    // Sound: `fd`, `base` and `size` are immutable after init; the bytes behind
    // `base` are shared memory, accessed only through atomics or bounded views.
    public let fd: FileDescriptor
    public let size: Int
    public let base: UnsafeMutableRawPointer?
    public let writable: Bool

    /// Creates a new zero-filled object of `size` bytes (sparse until touched),
    /// sealed at that size: guests hold these descriptors read-write (as every
    /// memfd is), and one that shrank its memory or grant table would turn
    /// dom0's accesses to the mapped pages into SIGBUS.
    public init(creating name: String, size: Int, map: Bool = true) throws(HypervisorError) {
        let fd = cxen_memfd_create(name, 1 | 2 /* MFD_CLOEXEC | MFD_ALLOW_SEALING */)
        guard fd >= 0 else { throw .system(call: "memfd_create", errno: errno) }
        guard ftruncate(fd, off_t(size)) == 0 else {
            let e = errno
            close(fd)
            throw .system(call: "ftruncate", errno: e)
        }
        guard cxen_memfd_seal_size(fd) == 0 else {
            let e = errno
            close(fd)
            throw .system(call: "fcntl(F_ADD_SEALS)", errno: e)
        }
        self.fd = FileDescriptor(rawValue: fd)
        self.size = size
        self.writable = true
        if map {
            do throws(HypervisorError) { self.base = try Self.mapShared(fd: fd, size: size, writable: true) } catch {
                close(fd)
                throw error
            }
        } else {
            self.base = nil
        }
    }

    /// Adopts a descriptor received from xenhv, mapping `size` bytes of it.
    public init(adopting fd: CInt, size: Int, writable: Bool, map: Bool = true) throws(HypervisorError) {
        self.fd = FileDescriptor(rawValue: fd)
        self.size = size
        self.writable = writable
        if map {
            do throws(HypervisorError) { self.base = try Self.mapShared(fd: fd, size: size, writable: writable) } catch {
                close(fd)
                throw error
            }
        } else {
            self.base = nil
        }
    }

    package static func mapShared(fd: CInt, size: Int, writable: Bool, offset: Int = 0) throws(HypervisorError) -> UnsafeMutableRawPointer {
        let prot = writable ? (PROT_READ | PROT_WRITE) : PROT_READ
        let p = mmap(nil, size, prot, MAP_SHARED, fd, off_t(offset))
        guard let p, p != MAP_FAILED else { throw .system(call: "mmap", errno: errno) }
        return p
    }

    /// The whole mapping as a bounds-checked region.
    public var region: GuestRegion {
        GuestRegion(base: base!, count: size, writable: writable)
    }

    /// A fresh descriptor for the same object that can only be mapped read-only
    /// (re-opened through /proc/self/fd with O_RDONLY).
    public func readOnlyDescriptor() throws(HypervisorError) -> CInt {
        let fd = open("/proc/self/fd/\(self.fd.rawValue)", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .system(call: "open(/proc/self/fd)", errno: errno) }
        return fd
    }

    deinit {
        if let base { munmap(base, size) }
        try? fd.close()
    }
}

/// A bounds-checked window on memory another domain can write: guest pages, a
/// mapped grant, a ring page. The only door to guest memory in backend code.
///
/// Reads copy out (the peer may change the bytes at any time, so a value is
/// read once and then used from the copy); writes are refused on a read-only
/// region. Every offset and length is checked with overflow-safe arithmetic.
public struct GuestRegion: @unchecked Sendable {
    // Sound: the pointer is only dereferenced inside bounds checked against
    // `count`, and the mapping's owner keeps it alive for the region's users.
    @usableFromInline let base: UnsafeMutableRawPointer
    public let count: Int
    public let writable: Bool

    public init(base: UnsafeMutableRawPointer, count: Int, writable: Bool) {
        self.base = base
        self.count = count
        self.writable = writable
    }

    /// An error naming the out-of-range access.
    public struct OutOfBounds: Error, CustomStringConvertible {
        public let offset: Int, length: Int, regionSize: Int, write: Bool
        @usableFromInline init(offset: Int, length: Int, regionSize: Int, write: Bool) {
            self.offset = offset; self.length = length; self.regionSize = regionSize; self.write = write
        }
        public var description: String {
            "\(write ? "write" : "read") of \(length) bytes at offset \(offset) is outside a \(regionSize)-byte guest region"
        }
    }

    @inlinable @inline(__always)
    func check(_ offset: Int, _ length: Int, write: Bool) throws(OutOfBounds) {
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard offset >= 0, length >= 0, !overflow, end <= count, !write || writable else {
            throw OutOfBounds(offset: offset, length: length, regionSize: count, write: write)
        }
    }

    /// A sub-window, checked against this one.
    @inlinable
    public func slice(offset: Int, length: Int) throws(OutOfBounds) -> GuestRegion {
        try check(offset, length, write: false)
        return GuestRegion(base: base + offset, count: length, writable: writable)
    }

    /// Copies a plain value out (read once).
    @inlinable
    public func load<T: BitwiseCopyable>(_ type: T.Type = T.self, at offset: Int) throws(OutOfBounds) -> T {
        try check(offset, MemoryLayout<T>.size, write: false)
        return (base + offset).loadUnaligned(as: T.self)
    }

    /// Stores a plain value.
    @inlinable
    public func store<T: BitwiseCopyable>(_ value: T, at offset: Int) throws(OutOfBounds) {
        try check(offset, MemoryLayout<T>.size, write: true)
        (base + offset).storeBytes(of: value, as: T.self)
    }

    /// Copies bytes out into `destination`.
    @inlinable
    public func read(into destination: UnsafeMutableRawBufferPointer, at offset: Int) throws(OutOfBounds) {
        try check(offset, destination.count, write: false)
        if let d = destination.baseAddress { d.copyMemory(from: base + offset, byteCount: destination.count) }
    }

    /// Copies `source` in.
    @inlinable
    public func write(_ source: UnsafeRawBufferPointer, at offset: Int) throws(OutOfBounds) {
        try check(offset, source.count, write: true)
        if let s = source.baseAddress { (base + offset).copyMemory(from: s, byteCount: source.count) }
    }

    /// Copies bytes out as an array.
    public func bytes(at offset: Int, count n: Int) throws(OutOfBounds) -> [UInt8] {
        try check(offset, n, write: false)
        return [UInt8](UnsafeRawBufferPointer(start: base + offset, count: n))
    }

    /// Fills a range with one byte.
    public func fill(_ byte: UInt8, at offset: Int, count n: Int) throws(OutOfBounds) {
        try check(offset, n, write: true)
        (base + offset).initializeMemory(as: UInt8.self, repeating: byte, count: n)
    }

    /// Raw access for I/O engines (read/write/pread into guest pages): the
    /// closure gets exactly the checked range and must not keep the pointer.
    @inlinable
    public func withUnsafeBytes<R>(offset: Int, count n: Int, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        try check(offset, n, write: false)
        return try body(UnsafeRawBufferPointer(start: base + offset, count: n))
    }

    @inlinable
    public func withUnsafeMutableBytes<R>(offset: Int, count n: Int, _ body: (UnsafeMutableRawBufferPointer) throws -> R) throws -> R {
        try check(offset, n, write: true)
        return try body(UnsafeMutableRawBufferPointer(start: base + offset, count: n))
    }

    /// The raw start of the region, for a transport that does its own
    /// index-checked access to a shared page (the xenstore ring) and keeps the
    /// region's owner alive for as long as it uses the pointer. Everything else
    /// goes through the checked accessors above.
    public var unsafeBaseAddress: UnsafeMutableRawPointer { base }

    /// This region's first `pages` pages as a shared ring. The region's owner
    /// (a grant mapping, guest memory) must stay mapped while the ring is used.
    public func ring<P: RingProtocol>(_ type: P.Type, pages: Int, offset: Int = 0) throws(OutOfBounds) -> SharedRing<P> {
        try check(offset, pages * HVLimits.pageSize, write: true)
        return SharedRing<P>(attachingTo: base + offset, pages: pages)
    }
}
