import Synchronization

/// A disk an NBD export serves: pvguest's blkfront, or a RAM disk.
///
/// Each operation completes exactly once, possibly on another thread, with nil
/// or an errno value for the client. The buffer stays valid until completion.
public protocol BlockDevice: AnyObject, Sendable {
    /// Size in bytes.
    var size: UInt64 { get }
    var isReadOnly: Bool { get }
    /// Discard (NBD_CMD_TRIM) supported.
    var canTrim: Bool { get }
    /// The smallest unit of I/O (offsets and lengths are multiples of it):
    /// NBD_INFO_BLOCK_SIZE's minimum.
    var blockSize: UInt32 { get }
    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, completion: @escaping @Sendable (Int32?) -> Void)
    func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool, completion: @escaping @Sendable (Int32?) -> Void)
    /// Completes only once every write acknowledged before it is durable.
    func flush(completion: @escaping @Sendable (Int32?) -> Void)
    func trim(at offset: UInt64, length: UInt64, completion: @escaping @Sendable (Int32?) -> Void)
    /// NBD_CMD_WRITE_ZEROES: the range reads back as zeros once this
    /// completes. Default: zeros written (``ZeroFill``), every chunk
    /// submitted from the calling thread; blkfront zeroes its slots' pages
    /// in place instead.
    func writeZeroes(at offset: UInt64, length: UInt64, fua: Bool, completion: @escaping @Sendable (Int32?) -> Void)
}

extension BlockDevice {
    public var blockSize: UInt32 { 512 }
    public func writeZeroes(at offset: UInt64, length: UInt64, fua: Bool, completion: @escaping @Sendable (Int32?) -> Void) {
        ZeroFill.write(self, at: offset, length: length, fua: fua, completion: completion)
    }
}

/// One operation done as several: completes once, when every part has,
/// with the first part's error.
public final class CompletionGroup: Sendable {
    private let state: Mutex<(remaining: Int, error: Int32?)>
    private let completion: @Sendable (Int32?) -> Void

    public init(parts: Int, completion: @escaping @Sendable (Int32?) -> Void) {
        state = Mutex((parts, nil))
        self.completion = completion
    }

    public func partDone(_ error: Int32?) {
        let (done, first) = state.withLock { s -> (Bool, Int32?) in
            if s.error == nil { s.error = error }
            s.remaining -= 1
            return (s.remaining == 0, s.error)
        }
        if done { completion(first) }
    }
}

/// Zeros written over a range, ``chunk`` bytes at a time, every chunk from
/// one shared zeroed buffer (only ever read) and issued from the calling
/// thread, as one ``CompletionGroup``.
enum ZeroFill {
    static let chunk = 1 << 20
    nonisolated(unsafe) private static let zeros: UnsafeRawPointer = {
        let p = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
        p.initializeMemory(as: UInt8.self, repeating: 0, count: chunk)
        return UnsafeRawPointer(p)
    }()

    static func write(_ device: some BlockDevice, at offset: UInt64, length: UInt64, fua: Bool,
                      completion: @escaping @Sendable (Int32?) -> Void) {
        guard length > 0 else { return completion(nil) }
        let chunk = UInt64(Self.chunk)
        let group = CompletionGroup(parts: Int((length + chunk - 1) / chunk), completion: completion)
        var at = offset
        while at < offset + length {
            let n = Int(min(chunk, offset + length - at))
            device.write(at: at, from: UnsafeRawBufferPointer(start: zeros, count: n), fua: fua) { group.partDone($0) }
            at += UInt64(n)
        }
    }
}

/// A RAM disk: the NBD server's own test device, and a null target for benchmarks.
public final class MemoryBlockDevice: BlockDevice, @unchecked Sendable {
    // Sound: the bytes are only touched inside the ranges of single operations,
    // which the NBD server has already bounds-checked; concurrent overlapping
    // I/O has the same undefined-order semantics as a real disk.
    public let size: UInt64
    public let isReadOnly: Bool
    public let canTrim = true
    private let bytes: UnsafeMutableRawPointer

    public init(size: UInt64, readOnly: Bool = false) {
        self.size = size
        self.isReadOnly = readOnly
        bytes = UnsafeMutableRawPointer.allocate(byteCount: Int(size), alignment: 4096)
        bytes.initializeMemory(as: UInt8.self, repeating: 0, count: Int(size))
    }
    deinit { bytes.deallocate() }

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, completion: @escaping @Sendable (Int32?) -> Void) {
        buffer.baseAddress?.copyMemory(from: bytes + Int(offset), byteCount: buffer.count)
        completion(nil)
    }
    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool, completion: @escaping @Sendable (Int32?) -> Void) {
        if let b = buffer.baseAddress { (bytes + Int(offset)).copyMemory(from: b, byteCount: buffer.count) }
        completion(nil)
    }
    public func flush(completion: @escaping @Sendable (Int32?) -> Void) { completion(nil) }
    public func trim(at offset: UInt64, length: UInt64, completion: @escaping @Sendable (Int32?) -> Void) {
        (bytes + Int(offset)).initializeMemory(as: UInt8.self, repeating: 0, count: Int(length))
        completion(nil)
    }
}
