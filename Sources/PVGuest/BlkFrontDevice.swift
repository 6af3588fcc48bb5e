import CXen
import Dispatch
import Glibc
import Logging
import NBD
import Synchronization
import XenBus
import XenHV
import XenRing
import XenStore

/// pvguest's blkfront (Linux's xen-blkfront): the frontend half of the blkif.h
/// handshake, and a ``BlockDevice`` the NBD server exports, so real tools
/// (qemu-io, nbdcopy, fio) drive the guest's disk through the rings.
///
/// Each ring slot owns eleven data pages granted once to the backend (its
/// grants persist, matching feature-persistent): a request's data is copied
/// between the NBD buffer and the slot's pages, split at 44 KiB. Requests carry
/// their slot index as id; a response naming a slot with nothing in flight is
/// ignored as the lie it is.
public final class BlkFrontDevice: BlockDevice, @unchecked Sendable {
    // Sound: the ring is behind `ring`'s mutex, in-flight slots behind
    // `inFlight`; everything else is immutable after the handshake.
    public let size: UInt64
    public let isReadOnly: Bool
    public let canTrim: Bool
    public let canFlush: Bool
    public let frontendPath: String
    let hv: Hypervisor
    let ring: Mutex<FrontRing<BlkifRing>>
    let channel: EventChannel
    let slotPages: [GuestRegion]
    let slotRefs: [[GrantRef]]
    let freeSlots: Mutex<[Int]>
    let slotAvailable: DispatchSemaphore
    let inFlight: Mutex<[Pending?]>
    let logger: Logger
    let failed = Atomic<Bool>(false)

    static let segmentsPerRequest = Int(BLKIF_MAX_SEGMENTS_PER_REQUEST)
    static let chunk = segmentsPerRequest * HVLimits.pageSize

    /// One NBD operation, possibly split over several ring requests.
    final class Group: @unchecked Sendable {
        // Sound: `remaining` and `error` change under `lock`.
        let lock = Mutex<(remaining: Int, error: Int32?)>((0, nil))
        let completion: @Sendable (Int32?) -> Void
        init(parts: Int, completion: @escaping @Sendable (Int32?) -> Void) {
            lock.withLock { $0.remaining = parts }
            self.completion = completion
        }
        func partDone(_ error: Int32?) {
            let done: (Bool, Int32?) = lock.withLock { s in
                if s.error == nil { s.error = error }
                s.remaining -= 1
                return (s.remaining == 0, s.error)
            }
            if done.0 { completion(done.1) }
        }
    }

    /// Sound to send: the buffer belongs to this one request until it completes.
    struct Pending: @unchecked Sendable {
        let group: Group
        let readInto: UnsafeMutableRawPointer?
        let length: Int
    }

    /// Connects the device at `frontendPath` (/local/domain/<me>/device/vbd/<devid>):
    /// waits for the backend's InitWait, sets up the ring, announces it, and
    /// waits for Connected.
    public init(hypervisor hv: Hypervisor, xenstore xs: XenBusClient, frontendPath fe: String,
                pages: GuestPages, grants: GrantRefs, ringPageOrder wantOrder: Int = 1,
                logger: Logger = Logger(label: "blkfront")) throws {
        self.hv = hv
        self.frontendPath = fe
        self.logger = logger
        let be = try xs.read(fe + "/backend")
        guard let beID = XenHV.DomID(try xs.read(fe + "/backend-id")) else {
            throw HypervisorError.protocolViolation("\(fe)/backend-id is not a domain id")
        }
        guard let s = xs.awaitState(at: be, { $0 == .initWait || $0 == .connected || $0 == .closed || $0 == .closing }),
              s == .initWait else {
            throw HypervisorError.protocolViolation("backend \(be) did not reach InitWait")
        }
        let maxOrder = Int((try xs.readIfExists(be + "/max-ring-page-order")) ?? "0") ?? 0
        let order = max(0, min(wantOrder, maxOrder, RingLayout.maxOrder))
        let ringPages = 1 << order
        let ringFrame = try pages.allocate(ringPages)
        let ringRefs = try (0..<ringPages).map { try grants.grant(frame: ringFrame + UInt32($0), to: beID, readOnly: false) }
        let shared = try pages.page(ringFrame, count: ringPages).ring(BlkifRing.self, pages: ringPages)
        let front = FrontRing(initializing: shared)
        let slots = Int(front.size)
        let dataFrame = try pages.allocate(slots * Self.segmentsPerRequest)
        var regions: [GuestRegion] = []
        var refs: [[GrantRef]] = []
        for i in 0..<slots {
            let first = dataFrame + UInt32(i * Self.segmentsPerRequest)
            regions.append(pages.page(first, count: Self.segmentsPerRequest))
            refs.append(try (0..<Self.segmentsPerRequest).map {
                try grants.grant(frame: first + UInt32($0), to: beID, readOnly: false)
            })
        }
        let port = try hv.allocUnbound(remote: beID)
        channel = try hv.channel(port)
        ring = Mutex(front)
        slotPages = regions
        slotRefs = refs
        freeSlots = Mutex(Array((0..<slots).reversed()))
        slotAvailable = DispatchSemaphore(value: slots)
        inFlight = Mutex(Array(repeating: nil, count: slots))

        try xs.transaction { t in
            if order == 0 {
                try t.write(fe + "/ring-ref", "\(ringRefs[0])")
            } else {
                try t.write(fe + "/ring-page-order", "\(order)")
                for (i, r) in ringRefs.enumerated() { try t.write(fe + "/ring-ref\(i)", "\(r)") }
            }
            try t.write(fe + "/event-channel", "\(port)")
            try t.write(fe + "/protocol", "x86_64-abi")
            try t.write(fe + "/feature-persistent", "1")
        }
        try xs.switchState(at: fe, to: .initialised)
        guard xs.awaitState(at: be, { $0 == .connected || $0 == .closing || $0 == .closed }) == .connected else {
            let why = (try? xs.readIfExists(be + "/error")) ?? nil
            throw HypervisorError.protocolViolation("backend \(be) did not connect\(why.map { ": \($0)" } ?? "")")
        }
        guard let sectors = UInt64(try xs.read(be + "/sectors")) else {
            throw HypervisorError.protocolViolation("\(be)/sectors is not a number")
        }
        let info = UInt32((try xs.readIfExists(be + "/info")) ?? "0") ?? 0
        size = sectors * 512
        isReadOnly = info & UInt32(VDISK_READONLY) != 0
        canFlush = (try xs.readIfExists(be + "/feature-flush-cache")) == "1"
        canTrim = (try xs.readIfExists(be + "/feature-discard")) == "1" && !isReadOnly
        try xs.switchState(at: fe, to: .connected)
        startCompletions()
        logger.info("\(fe): connected to \(be): \(sectors) sectors, ring of \(slots) slots (\(ringPages) page(s))")
    }

    // MARK: BlockDevice

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, completion: @escaping @Sendable (Int32?) -> Void) {
        transfer(op: UInt8(BLKIF_OP_READ), offset: offset, count: buffer.count, read: buffer.baseAddress, write: nil, completion: completion)
    }

    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool, completion: @escaping @Sendable (Int32?) -> Void) {
        guard fua else {
            transfer(op: UInt8(BLKIF_OP_WRITE), offset: offset, count: buffer.count, read: nil, write: buffer.baseAddress, completion: completion)
            return
        }
        // FUA: the write, then a cache flush, before the client hears of it.
        transfer(op: UInt8(BLKIF_OP_WRITE), offset: offset, count: buffer.count, read: nil, write: buffer.baseAddress) { [self] err in
            if let err { completion(err) } else { flush(completion: completion) }
        }
    }

    public func flush(completion: @escaping @Sendable (Int32?) -> Void) {
        guard canFlush else { completion(nil); return }
        submit(Group(parts: 1, completion: completion), readInto: nil, length: 0) { req, _ in
            req.operation = UInt8(BLKIF_OP_FLUSH_DISKCACHE)
        }
    }

    public func trim(at offset: UInt64, length: UInt64, completion: @escaping @Sendable (Int32?) -> Void) {
        guard canTrim else { completion(95 /* ENOTSUP */); return }
        guard offset % 512 == 0, length % 512 == 0 else { completion(EINVAL); return }
        submit(Group(parts: 1, completion: completion), readInto: nil, length: 0) { req, _ in
            // blkif_request_discard shares the 112-byte slot with blkif_request.
            let id = req.id
            withUnsafeMutableBytes(of: &req) { raw in
                var d = blkif_request_discard()
                d.operation = UInt8(BLKIF_OP_DISCARD)
                d.id = id
                d.sector_number = offset / 512
                d.nr_sectors = length / 512
                raw.storeBytes(of: d, as: blkif_request_discard.self)
            }
        }
    }

    // MARK: Submission

    func transfer(op: UInt8, offset: UInt64, count: Int, read dst: UnsafeMutableRawPointer?, write src: UnsafeRawPointer?,
                  completion: @escaping @Sendable (Int32?) -> Void) {
        guard offset % 512 == 0, count % 512 == 0, count > 0 else { completion(EINVAL); return }
        guard !isReadOnly || op == UInt8(BLKIF_OP_READ) else { completion(EPERM); return }
        let parts = (count + Self.chunk - 1) / Self.chunk
        let group = Group(parts: parts, completion: completion)
        for p in 0..<parts {
            let off = p * Self.chunk
            let len = min(Self.chunk, count - off)
            submit(group, readInto: dst.map { $0 + off }, length: len) { [self] req, slot in
                req.operation = op
                req.sector_number = (offset + UInt64(off)) / 512
                let segs = (len + HVLimits.pageSize - 1) / HVLimits.pageSize
                req.nr_segments = UInt8(segs)
                withUnsafeMutableBytes(of: &req.seg) { raw in
                    let s = raw.bindMemory(to: blkif_request_segment.self)
                    for i in 0..<segs {
                        let bytes = min(HVLimits.pageSize, len - i * HVLimits.pageSize)
                        s[i] = blkif_request_segment(gref: slotRefs[slot][i], first_sect: 0, last_sect: UInt8(bytes / 512 - 1))
                    }
                }
                if let src {
                    try? slotPages[slot].write(UnsafeRawBufferPointer(start: src + off, count: len), at: 0)
                }
            }
        }
    }

    /// Takes a slot (waiting for one), fills its request and publishes it.
    func submit(_ group: Group, readInto: UnsafeMutableRawPointer?, length: Int, fill: (inout blkif_request, Int) -> Void) {
        guard !failed.load(ordering: .acquiring) else { group.partDone(EIO); return }
        slotAvailable.wait()
        let slot = freeSlots.withLock { $0.removeLast() }
        var req = blkif_request()
        req.id = UInt64(slot)
        fill(&req, slot)
        inFlight.withLock { $0[slot] = Pending(group: group, readInto: readInto, length: length) }
        let request = req
        let notify = ring.withLock { r -> Bool in
            r.enqueue(request)
            return r.pushRequestsAndCheckNotify()
        }
        if notify { try? channel.notify() }
    }

    // MARK: Completion

    func startCompletions() {
        let t = CompletionThread { [self] in completions() }
        t.start()
    }

    func completions() {
        while !failed.load(ordering: .acquiring) {
            do {
                while let rsp = try ring.withLock({ r throws(RingError) in try r.nextResponse() }) {
                    complete(rsp)
                }
                if try ring.withLock({ r throws(RingError) in try r.finalCheckForResponses() }) { continue }
            } catch {
                logger.error("\(frontendPath): \(error); failing the device")
                failed.store(true, ordering: .releasing)
                for slot in 0..<slotPages.count {
                    if let p = inFlight.withLock({ s -> Pending? in defer { s[slot] = nil }; return s[slot] }) {
                        p.group.partDone(EIO)
                    }
                }
                return
            }
            channel.wait()
        }
    }

    func complete(_ rsp: blkif_response) {
        let slot = Int(truncatingIfNeeded: rsp.id)
        guard rsp.id < UInt64(slotPages.count),
              let p = inFlight.withLock({ s -> Pending? in defer { s[slot] = nil }; return s[slot] }) else {
            logger.warning("\(frontendPath): response for request \(rsp.id), which is not in flight; ignored")
            return
        }
        var err: Int32? = nil
        switch Int32(rsp.status) {
        case BLKIF_RSP_OKAY:
            if let dst = p.readInto {
                try? slotPages[slot].read(into: UnsafeMutableRawBufferPointer(start: dst, count: p.length), at: 0)
            }
        case BLKIF_RSP_EOPNOTSUPP: err = 95  // ENOTSUP
        default: err = EIO
        }
        freeSlots.withLock { $0.append(slot) }
        slotAvailable.signal()
        p.group.partDone(err)
    }
}

/// The completion loop's thread.
final class CompletionThread: @unchecked Sendable {
    let body: @Sendable () -> Void
    init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    func start() {
        var tid = pthread_t()
        let box = Unmanaged.passRetained(self).toOpaque()
        pthread_create(&tid, nil, { arg in
            Unmanaged<CompletionThread>.fromOpaque(arg!).takeRetainedValue().body()
            return nil
        }, box)
        pthread_detach(tid)
    }
}
