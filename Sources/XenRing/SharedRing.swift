import CXen

/// The shared page(s) of one ring: ring.h's `struct name_sring`.
///
/// This type is the only holder of the raw pointer into shared memory. It does
/// not own the mapping: whoever maps the pages (a grant mapping, guest memory)
/// must keep them mapped for as long as a ring built on them is used.
/// Every index access is an atomic load or store; slot contents are copied
/// with `cxen_copy_from_shared` so they are read exactly once.
public struct SharedRing<P: RingProtocol>: @unchecked Sendable
where P.Request: BitwiseCopyable, P.Response: BitwiseCopyable {
    // Sound to share across threads: all access to the pointee is atomic or a
    // one-shot copy, and the pointer itself is immutable.
    @usableFromInline let base: UnsafeMutableRawPointer
    /// Number of slots (a power of two).
    public let size: UInt32
    @usableFromInline let mask: UInt32

    /// Attaches to `pages` pages at `base`, which must be page aligned and stay
    /// mapped for the life of this value.
    public init(attachingTo base: UnsafeMutableRawPointer, pages: Int) {
        precondition(pages >= 1 && pages <= RingLayout.maxPages && pages & (pages - 1) == 0,
                     "ring pages must be a power of two up to \(RingLayout.maxPages)")
        precondition(Int(bitPattern: base) % RingLayout.pageSize == 0, "ring must be page aligned")
        self.base = base
        self.size = P.entries(pages: pages)
        self.mask = size - 1
    }

    /// `SHARED_RING_INIT`: producers at 0, event indices at 1, padding zeroed.
    /// Only the front end initialises a ring.
    public func initialize() {
        base.initializeMemory(as: UInt8.self, repeating: 0, count: RingLayout.headerSize)
        cxen_store_release_u32(word(RingLayout.reqEventOffset), 1)
        cxen_store_release_u32(word(RingLayout.rspEventOffset), 1)
    }

    @inlinable @inline(__always)
    func word(_ offset: Int) -> UnsafeMutablePointer<UInt32> {
        (base + offset).assumingMemoryBound(to: UInt32.self)
    }

    @inlinable @inline(__always)
    func slot(_ index: UInt32) -> UnsafeMutableRawPointer {
        base + RingLayout.headerSize + Int(index & mask) * P.slotStride
    }

    // Index words, named as in ring.h.
    @inlinable public var reqProd: UInt32 { cxen_load_acquire_u32(word(RingLayout.reqProdOffset)) }
    @inlinable public var rspProd: UInt32 { cxen_load_acquire_u32(word(RingLayout.rspProdOffset)) }
    @inlinable public var reqEvent: UInt32 { cxen_load_acquire_u32(word(RingLayout.reqEventOffset)) }
    @inlinable public var rspEvent: UInt32 { cxen_load_acquire_u32(word(RingLayout.rspEventOffset)) }

    @inlinable func setReqProd(_ v: UInt32) { cxen_store_release_u32(word(RingLayout.reqProdOffset), v) }
    @inlinable func setRspProd(_ v: UInt32) { cxen_store_release_u32(word(RingLayout.rspProdOffset), v) }
    @inlinable func setReqEvent(_ v: UInt32) { cxen_store_release_u32(word(RingLayout.reqEventOffset), v) }
    @inlinable func setRspEvent(_ v: UInt32) { cxen_store_release_u32(word(RingLayout.rspEventOffset), v) }

    /// `RING_COPY_REQUEST`: one copy out of the slot; only the copy is used.
    @inlinable @inline(__always)
    func copyRequest(at index: UInt32) -> P.Request {
        var r = P.zeroRequest
        withUnsafeMutableBytes(of: &r) { cxen_copy_from_shared($0.baseAddress, slot(index), $0.count) }
        return r
    }

    @inlinable @inline(__always)
    func copyResponse(at index: UInt32) -> P.Response {
        var r = P.zeroResponse
        withUnsafeMutableBytes(of: &r) { cxen_copy_from_shared($0.baseAddress, slot(index), $0.count) }
        return r
    }

    /// Writes a whole slot with a response, padding zeroed (`P.storeResponse`).
    @inlinable @inline(__always)
    func writeResponse(_ response: P.Response, at index: UInt32) {
        P.storeResponse(response, into: slot(index))
    }

    /// Writes a whole slot: the entry, then zeroes for the rest of the union so
    /// no stale bytes leak to the peer (XSA-216).
    @inlinable @inline(__always)
    func write<T: BitwiseCopyable>(_ value: T, at index: UInt32) {
        let dst = slot(index)
        withUnsafeBytes(of: value) { src in
            dst.copyMemory(from: src.baseAddress!, byteCount: src.count)
            if src.count < P.slotStride {
                (dst + src.count).initializeMemory(as: UInt8.self, repeating: 0, count: P.slotStride - src.count)
            }
        }
    }
}
