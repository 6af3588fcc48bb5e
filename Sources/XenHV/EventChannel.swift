import CXen
import Glibc
import Synchronization

/// One of our bound event-channel ports: the wake-up side (the port's wake-up
/// set xenhv handed out at bind time: an epoll set of one eventfd per sender,
/// which we can poll and drain but nobody can write) and the send side (the
/// port's ``PeerDescriptor``, shared with ``Hypervisor/notify(_:)``: an
/// eventfd in the peer's set that only we hold, so `notify` is one write that
/// cannot block, whatever the peer does).
///
/// Pending and mask bits live in our domain's shared_info as in Xen's 2-level
/// ABI. The receiver sets `evtchn_pending` when a kick arrives and delivers it
/// only while the port is unmasked; unmasking a port with an event pending
/// re-raises it, as `EVTCHNOP_unmask` does.
public final class EventChannel: @unchecked Sendable {
    // Sound: everything is immutable; `peer` synchronises itself.
    public let port: EventPort
    /// The descriptor to poll for readability (epoll, poll, a NIO channel).
    public let descriptor: CInt
    let hypervisor: Hypervisor
    let peer: PeerDescriptor

    init(port: EventPort, descriptor: CInt, hypervisor: Hypervisor) {
        self.port = port
        self.descriptor = descriptor
        self.hypervisor = hypervisor
        peer = hypervisor.peerDescriptor(port)
    }

    deinit { Glibc.close(descriptor) }

    /// `EVTCHNOP_send` on this port (in-process; see ``Hypervisor/notify(_:)``).
    @inline(__always)
    public func notify() throws {
        try hypervisor.send(port, through: peer)
    }

    /// Consumes any kicks that arrived (without blocking) and returns whether
    /// an event is to be delivered now: pending and not masked. Call after the
    /// descriptor polled readable, or to check without waiting. One
    /// epoll_wait with a zero timeout (``drain()``).
    @inline(__always)
    public func consume() -> Bool {
        drain()
        return hypervisor.sharedInfo.takeDeliverable(port)
    }

    /// Takes the wake-up set's edges without blocking: a kick becomes the
    /// pending bit.
    @inline(__always) private func drain() {
        if cxen_port_drain(descriptor) > 0 {
            hypervisor.sharedInfo.setPending(port)
        }
    }

    /// Blocks until an event is delivered on this port.
    public func wait() {
        while !hypervisor.sharedInfo.takeDeliverable(port) {
            var pfd = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
            if poll(&pfd, 1, -1) > 0 { drain() }
        }
    }

    /// Waits at most `milliseconds`; returns whether an event was delivered.
    public func wait(milliseconds: Int32) -> Bool {
        if hypervisor.sharedInfo.takeDeliverable(port) { return true }
        var pfd = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, milliseconds) > 0 else { return false }
        return consume()
    }

    /// Sets the port's bit in `evtchn_mask`.
    public func mask() { hypervisor.sharedInfo.setMask(port, true) }

    /// `EVTCHNOP_unmask`: clears the mask; an event that arrived while masked is
    /// delivered again (xenhv kicks our wake-up set so a waiter wakes).
    public func unmask() {
        hypervisor.sharedInfo.setMask(port, false)
        if hypervisor.sharedInfo.isPending(port) { try? raise() }
    }

    /// Makes our own port's descriptor readable (xenhv kicks its wake-up set),
    /// to wake a thread that waits on it.
    public func raise() throws { _ = try hypervisor.call(.raisePort) { $0.u32(port) } }

    /// `EVTCHNOP_close`.
    public func close() throws { try hypervisor.close(port: port) }
}

/// The send side of one of our ports: the peer port's eventfd, fetched from
/// xenhv once per binding generation (the generation changes whenever the port
/// is rebound). The descriptor number never changes once assigned: a refresh
/// `dup2`s the new peer's eventfd over it, so a send racing with a rebind
/// signals the old peer or the new one, never a descriptor that was closed and
/// reused for something else. One per port, shared by the port's
/// ``EventChannel``s and ``Hypervisor/notify(_:)``.
final class PeerDescriptor: Sendable {
    /// generation << 32 | (descriptor + 1), or 0 before the first fetch.
    private let cached = Atomic<UInt64>(0)
    /// Serialises refreshes (the slow path) only.
    private let refreshing = Mutex<Void>(())

    deinit {
        let v = cached.load(ordering: .relaxed)
        if v != 0 { Glibc.close(Self.descriptor(v)) }
    }

    @inline(__always) private static func descriptor(_ v: UInt64) -> CInt {
        CInt(truncatingIfNeeded: (v & 0xFFFF_FFFF) - 1)
    }

    /// The descriptor number sends go through, once fetched.
    var descriptor: CInt? {
        let v = cached.load(ordering: .acquiring)
        return v == 0 ? nil : Self.descriptor(v)
    }

    /// Signals the cached peer if it is of generation `gen`; false when it
    /// must be fetched first.
    @inline(__always)
    func signal(generation gen: UInt32) -> Bool {
        let v = cached.load(ordering: .acquiring)
        guard v != 0, UInt32(truncatingIfNeeded: v >> 32) == gen else { return false }
        _ = cxen_port_signal(Self.descriptor(v))
        return true
    }

    /// Adopts `fresh` (the peer's eventfd of generation `gen`) and signals it.
    func adopt(_ fresh: CInt, generation gen: UInt32) {
        _ = cxen_port_signal(fresh)
        refreshing.withLock { _ in
            let v = cached.load(ordering: .acquiring)
            var fd = fresh
            if v != 0 {
                fd = Self.descriptor(v)
                if dup2(fresh, fd) < 0 { fd = fresh } else { Glibc.close(fresh) }
                // A failed dup2 (never expected) leaks the old number rather
                // than closing it under a concurrent sender.
            }
            cached.store(UInt64(gen) << 32 | UInt64(UInt32(bitPattern: fd) &+ 1), ordering: .releasing)
        }
    }
}

/// Our domain's `shared_info` page (xen.h): vcpu_info[0]'s upcall flags and the
/// 2-level `evtchn_pending` / `evtchn_mask` bitmaps (64 words of 64 bits).
public struct SharedInfo: @unchecked Sendable {
    // Sound: every access is an atomic on the shared page.
    let memory: SharedMemory
    init(memory: SharedMemory) { self.memory = memory }

    private var base: UnsafeMutableRawPointer { memory.base! }
    private static let pendingOffset = MemoryLayout<shared_info>.offset(of: \shared_info.evtchn_pending)!
    private static let maskOffset = MemoryLayout<shared_info>.offset(of: \shared_info.evtchn_mask)!
    private static let upcallPendingOffset = MemoryLayout<vcpu_info>.offset(of: \vcpu_info.evtchn_upcall_pending)!
    private static let pendingSelOffset = MemoryLayout<vcpu_info>.offset(of: \vcpu_info.evtchn_pending_sel)!

    @inline(__always) private func word(_ offset: Int, _ port: EventPort) -> UnsafeMutablePointer<UInt64> {
        (base + offset + Int(port / 64) * 8).assumingMemoryBound(to: UInt64.self)
    }

    public func isPending(_ port: EventPort) -> Bool {
        cxen_load_acquire_u64(word(Self.pendingOffset, port)) & (1 << UInt64(port % 64)) != 0
    }
    public func isMasked(_ port: EventPort) -> Bool {
        cxen_load_acquire_u64(word(Self.maskOffset, port)) & (1 << UInt64(port % 64)) != 0
    }
    /// What Xen's `evtchn_2l_set_pending` does: pending bit, selector bit, upcall.
    func setPending(_ port: EventPort) {
        _ = cxen_fetch_or_u64(word(Self.pendingOffset, port), 1 << UInt64(port % 64))
        guard !isMasked(port) else { return }
        _ = cxen_fetch_or_u64((base + Self.pendingSelOffset).assumingMemoryBound(to: UInt64.self), 1 << UInt64(port / 64))
        cxen_store_release_u8((base + Self.upcallPendingOffset).assumingMemoryBound(to: UInt8.self), 1)
    }
    /// Clears and returns the pending bit if the port is unmasked.
    func takeDeliverable(_ port: EventPort) -> Bool {
        let bit: UInt64 = 1 << UInt64(port % 64)
        guard !isMasked(port), isPending(port) else { return false }
        let old = cxen_fetch_and_u64(word(Self.pendingOffset, port), ~bit)
        cxen_store_release_u8((base + Self.upcallPendingOffset).assumingMemoryBound(to: UInt8.self), 0)
        return old & bit != 0
    }
    func setMask(_ port: EventPort, _ on: Bool) {
        let bit: UInt64 = 1 << UInt64(port % 64)
        if on { _ = cxen_fetch_or_u64(word(Self.maskOffset, port), bit) } else { _ = cxen_fetch_and_u64(word(Self.maskOffset, port), ~bit) }
    }
    /// `vcpu_info[0].evtchn_upcall_pending`.
    public var upcallPending: Bool {
        (base + Self.upcallPendingOffset).load(as: UInt8.self) != 0
    }
}

/// A guest's `start_info` page as the builder wrote it (xen.h `struct start_info`).
public struct StartInfo: Sendable {
    let page: GuestRegion
    init(memory: GuestRegion) {
        let pages = memory.count / HVLimits.pageSize
        page = try! memory.slice(offset: (pages - Int(SpecialPages.startInfoFromEnd)) * HVLimits.pageSize, length: HVLimits.pageSize)
    }
    private func field<T: BitwiseCopyable>(_ path: KeyPath<start_info, T>) -> T {
        try! page.load(T.self, at: MemoryLayout<start_info>.offset(of: path)!)
    }
    public var magic: String {
        (try? page.bytes(at: 0, count: 32)).map { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) } ?? ""
    }
    public var nrPages: UInt64 { UInt64(field(\.nr_pages)) }
    public var sharedInfo: UInt64 { UInt64(field(\.shared_info)) }
    public var storeMFN: UInt64 { UInt64(field(\.store_mfn)) }
    public var storeEventChannel: EventPort { field(\.store_evtchn) }
    public var consoleMFN: UInt64 { UInt64(field(\.console.domU.mfn)) }
    public var consoleEventChannel: EventPort { field(\.console.domU.evtchn) }
}
