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
    /// completes. Default: zeros written (``ZeroFill``), each chunk issued
    /// from the last one's completion; a device whose `write` may wait for
    /// something only its completion path provides (blkfront's ring slots)
    /// implements its own.
    func writeZeroes(at offset: UInt64, length: UInt64, fua: Bool, completion: @escaping @Sendable (Int32?) -> Void)
}

extension BlockDevice {
    public var blockSize: UInt32 { 512 }
    public func writeZeroes(at offset: UInt64, length: UInt64, fua: Bool, completion: @escaping @Sendable (Int32?) -> Void) {
        ZeroFill(device: self, offset: offset, length: length, fua: fua, completion: completion).run()
    }
}

/// Zeros written over a range from one shared zeroed buffer, ``chunk``
/// bytes at a time, each write issued when the one before has completed
/// (on whatever thread, or within the call itself: then the loop goes on
/// rather than nesting).
final class ZeroFill: @unchecked Sendable {
    // Sound: `zeros` is never written after it is made; `state` is locked;
    // the rest is immutable.
    static let chunk = 1 << 20
    nonisolated(unsafe) private static let zeros: UnsafeRawPointer = {
        let p = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
        p.initializeMemory(as: UInt8.self, repeating: 0, count: chunk)
        return UnsafeRawPointer(p)
    }()
    let device: any BlockDevice
    let end: UInt64
    let fua: Bool
    let completion: @Sendable (Int32?) -> Void
    /// Where the next write starts; whether a write's call has not returned
    /// yet, and whether that write completed meanwhile.
    private let state: Mutex<(offset: UInt64, inCall: Bool, completedInCall: Bool)>

    init(device: any BlockDevice, offset: UInt64, length: UInt64, fua: Bool, completion: @escaping @Sendable (Int32?) -> Void) {
        self.device = device
        end = offset + length
        self.fua = fua
        self.completion = completion
        state = Mutex((offset, false, false))
    }

    func run() {
        while true {
            let offset = state.withLock { $0.offset }
            guard offset < end else { return completion(nil) }
            let n = Int(min(UInt64(Self.chunk), end - offset))
            state.withLock { $0.inCall = true; $0.completedInCall = false }
            device.write(at: offset, from: UnsafeRawBufferPointer(start: Self.zeros, count: n), fua: fua) { [self] err in
                if let err { return completion(err) }
                let resume = state.withLock { s -> Bool in
                    s.offset = offset + UInt64(n)
                    s.completedInCall = s.inCall
                    return !s.inCall
                }
                if resume { run() }
            }
            guard state.withLock({ s -> Bool in s.inCall = false; return s.completedInCall }) else { return }
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
