import CLibAIO
import CXen
import Glibc
import Synchronization
import Logging

/// What a virtual block device stores its data in.
public struct BackingOptions: Sendable {
    public enum Source: Sendable, Equatable {
        /// A raw image file or a block device.
        case path(String)
        /// Null mode: every request is answered without touching a disk (grants
        /// are still mapped), to measure ring and grant cost alone.
        case null(sectors: UInt64)
    }
    public var source: Source
    /// `mode = r`: writes, flushes and discards are refused.
    public var readOnly: Bool
    /// Try O_DIRECT (falls back to buffered I/O when the filesystem refuses it).
    public var directIO: Bool
    /// `discard-enable`: offer discard when the backing store can do it.
    public var discard: Bool
    /// Exported logical sector size (`sector-size`) when larger than the
    /// store's own (e.g. 4096 for a 4Kn image); nil: the store's.
    public var sectorSize: Int? = nil

    public init(path: String, readOnly: Bool = false, directIO: Bool = true, discard: Bool = true) {
        source = .path(path); self.readOnly = readOnly; self.directIO = directIO; self.discard = discard
    }
    public init(nullSectors: UInt64, readOnly: Bool = false) {
        source = .null(sectors: nullSectors); self.readOnly = readOnly; directIO = false; discard = true
    }
}

/// An open backing store: the image or device descriptors and what they can do.
final class Backing: @unchecked Sendable {
    /// Tests only: make O_DIRECT opens fail with EINVAL, as on a filesystem that
    /// refuses it (every filesystem on the test machines accepts O_DIRECT).
    nonisolated(unsafe) static var refuseDirectIOForTesting = false

    // Sound: immutable after init; descriptors are used with pread/pwrite-style
    // calls that carry their own offsets.
    enum Kind { case file, blockDevice, null }
    let kind: Kind
    /// Descriptor for aligned I/O: opened O_DIRECT when `isDirect`.
    let fd: CInt
    /// Buffered descriptor for I/O that O_DIRECT cannot take (misaligned), or `fd`.
    let bufferedFD: CInt
    let isDirect: Bool
    let readOnly: Bool
    /// Logical sector size exported as `sector-size`.
    let sectorSize: Int
    /// Buffer/offset/length alignment O_DIRECT needs.
    let directAlignment: Int
    let discard: Bool
    let discardSecure: Bool
    private let nullSectors: UInt64

    init(_ o: BackingOptions, logger: Logger) throws(BlkBackError) {
        readOnly = o.readOnly
        switch o.source {
        case let .null(sectors):
            kind = .null; fd = -1; bufferedFD = -1; isDirect = false; sectorSize = 512; directAlignment = 512
            discard = o.discard; discardSecure = false; nullSectors = sectors
            return
        case let .path(path):
            nullSectors = 0
            let access = o.readOnly ? O_RDONLY : O_RDWR
            var direct = -1 as CInt
            if o.directIO {
                direct = Self.refuseDirectIOForTesting ? -1 : open(path, access | O_CLOEXEC | CLIBAIO_O_DIRECT)
                if direct < 0 {
                    let e = Self.refuseDirectIOForTesting ? EINVAL : errno
                    guard e == EINVAL else { throw .system(call: "open \(path)", errno: e) }
                    logger.warning("\(path): the filesystem refuses O_DIRECT; falling back to buffered I/O")
                }
            }
            let buffered = open(path, access | O_CLOEXEC)
            guard buffered >= 0 else {
                let e = errno
                if direct >= 0 { Glibc.close(direct) }
                throw .system(call: "open \(path)", errno: e)
            }
            var st = stat()
            guard fstat(buffered, &st) == 0 else {
                let e = errno
                if direct >= 0 { Glibc.close(direct) }
                Glibc.close(buffered)
                throw .system(call: "fstat \(path)", errno: e)
            }
            if let want = o.sectorSize, want < 512 || want > 4096 || want & (want - 1) != 0 {
                if direct >= 0 { Glibc.close(direct) }
                Glibc.close(buffered)
                throw .badConfiguration("sector size \(want)")
            }
            isDirect = direct >= 0
            fd = isDirect ? direct : buffered
            bufferedFD = buffered
            if (st.st_mode & S_IFMT) == S_IFBLK {
                kind = .blockDevice
                var lbs: CInt = 512
                if clibaio_blksszget(buffered, &lbs) != 0 { lbs = 512 }
                sectorSize = Swift.max(Int(lbs), o.sectorSize ?? 0)
                directAlignment = Int(lbs)
                // Probed with a misaligned range, which can never touch data: the
                // kernel answers EOPNOTSUPP when the device lacks the operation
                // before it checks alignment (EINVAL). Secure discard is offered
                // only where the device really has secure erase.
                discard = o.discard && !o.readOnly && Self.deviceSupports(buffered, secure: false)
                discardSecure = discard && Self.deviceSupports(buffered, secure: true)
            } else {
                kind = .file
                sectorSize = o.sectorSize ?? 512
                // What the filesystem asks of O_DIRECT (4096 over 4 KiB-sector
                // storage); I/O it would refuse goes to the buffered descriptor.
                let asked = direct >= 0 ? Int(clibaio_dio_offset_align(direct)) : 0
                directAlignment = asked >= 512 && asked & (asked - 1) == 0 ? asked : 512
                discard = o.discard && !o.readOnly
                discardSecure = false  // a punched hole in a file is not a secure erase
            }
        }
    }

    deinit { close() }

    private static func deviceSupports(_ fd: CInt, secure: Bool) -> Bool {
        clibaio_blkdiscard(fd, 1, 512, secure ? 1 : 0) != 0 && clibaio_errno() == EINVAL
    }

    private var closed = false
    func close() {
        guard !closed, kind != .null else { return }
        closed = true
        if fd != bufferedFD { Glibc.close(fd) }
        Glibc.close(bufferedFD)
    }

    /// Current size in 512-byte sectors (re-read for online resize).
    func sectors() throws(BlkBackError) -> UInt64 {
        switch kind {
        case .null: return nullSectors
        case .blockDevice:
            var bytes: UInt64 = 0
            guard clibaio_blkgetsize64(bufferedFD, &bytes) == 0 else { throw .system(call: "BLKGETSIZE64", errno: errno) }
            return bytes >> 9
        case .file:
            var st = stat()
            guard fstat(bufferedFD, &st) == 0 else { throw .system(call: "fstat", errno: errno) }
            return UInt64(st.st_size) >> 9
        }
    }

    /// Makes completed writes durable (fdatasync). Returns 0 or an errno.
    /// Once one flush failed, every later one fails too (as QEMU's
    /// page_cache_inconsistent): Linux reports a writeback error once, and
    /// marks the pages it lost clean, so the next fdatasync would say 0 for
    /// writes that never reached the disk.
    func flush() -> Int32 {
        guard kind != .null else { return 0 }
        let failed = flushFailed.load(ordering: .acquiring)
        if failed != 0 { return failed }
        while fdatasync(bufferedFD) != 0 {
            if errno != EINTR {
                let e = errno
                flushFailed.store(e, ordering: .releasing)
                return e
            }
        }
        return 0
    }

    /// The errno of the first failed flush, or 0 (shared by every queue).
    let flushFailed = Atomic<Int32>(0)

    /// Discards `[offset, offset+length)` bytes: a hole punched in a file, BLKDISCARD
    /// (or BLKSECDISCARD) on a device. Returns 0 or an errno.
    func discard(offset: UInt64, length: UInt64, secure: Bool) -> Int32 {
        guard length > 0 else { return 0 }
        switch kind {
        case .null: return 0
        case .file: return clibaio_punch_hole(bufferedFD, offset, length) == 0 ? 0 : clibaio_errno()
        case .blockDevice:
            return clibaio_blkdiscard(bufferedFD, offset, length, secure ? 1 : 0) == 0 ? 0 : clibaio_errno()
        }
    }
}
