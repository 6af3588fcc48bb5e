import Synchronization

/// Why a packet was dropped or a slot answered with an error; also names the
/// fatal errors that disable a vif. Counted per vif.
public enum VifCounter: Int, CaseIterable, Sendable, CustomStringConvertible {
    // Transmit (guest -> tap) drops, vif stays up.
    case txTooManySlots
    case txFragmentLargerThanRemaining
    case txFirstSlotTooShort
    case txChecksumSetup
    case txGrantCopy
    case txTapWrite
    // Transmit fatal errors (vif disabled).
    case txFatal
    // Receive (tap -> guest).
    case rxNoSGTooLarge
    case rxUnsupportedGSO
    case rxGrantCopy
    case rxQueueFull
    case rxStalledFlush
    case rxCarrierOff
    case rxShortRead
    // The vif's queue (not a drop): its tap was deleted under it, and the
    // queue stopped reading it.
    case tapGone

    public var description: String {
        switch self {
        case .txTooManySlots: "tx-too-many-slots"
        case .txFragmentLargerThanRemaining: "tx-fragment-larger-than-remaining"
        case .txFirstSlotTooShort: "tx-first-slot-too-short"
        case .txChecksumSetup: "tx-checksum-setup"
        case .txGrantCopy: "tx-grant-copy"
        case .txTapWrite: "tx-tap-write"
        case .txFatal: "tx-fatal"
        case .rxNoSGTooLarge: "rx-too-large-without-sg"
        case .rxUnsupportedGSO: "rx-unsupported-gso"
        case .rxGrantCopy: "rx-grant-copy"
        case .rxQueueFull: "rx-queue-full"
        case .rxStalledFlush: "rx-stalled-flush"
        case .rxCarrierOff: "rx-carrier-off"
        case .rxShortRead: "rx-short-read"
        case .tapGone: "tap-gone"
        }
    }
}

/// Live counters of one vif, shared by its queue workers (relaxed atomics:
/// each is a monotonic count, read only for reporting).
public final class VifStats: @unchecked Sendable {
    // Sound: the counter storage is a fixed array of atomics, freed only at deinit.
    /// Bytes the guest transmitted that reached the tap (packets: each queue's
    /// count in ``queues``, summed by ``snapshot``).
    public let txBytes = Atomic<UInt64>(0)
    /// Bytes delivered from the tap into the guest's rx buffers.
    public let rxBytes = Atomic<UInt64>(0)
    /// Packets whose payload went between the tap and the guest's pages
    /// with no copy of ours: fragments written from them, frames read into them.
    public let txInPlace = Atomic<UInt64>(0)
    public let rxInPlace = Atomic<UInt64>(0)
    /// Times the rate limiter held transmission back.
    public let txRateLimited = Atomic<UInt64>(0)
    /// Times a storm of empty notifications made a queue ignore its event channel briefly.
    public let eventStormBackoffs = Atomic<UInt64>(0)
    /// Each queue's packet counts (Linux keeps them per xenvif_queue), one
    /// per queue offered, kept across reconnects; the vif's totals are their sums.
    public let queues: [QueueStats]
    private let counterStorage: UnsafeMutablePointer<Atomic<UInt64>>

    public init(queues n: Int = 1) {
        queues = (0..<max(1, n)).map { _ in QueueStats() }
        counterStorage = .allocate(capacity: VifCounter.allCases.count)
        for i in 0..<VifCounter.allCases.count { (counterStorage + i).initialize(to: Atomic<UInt64>(0)) }
    }

    deinit {
        counterStorage.deinitialize(count: VifCounter.allCases.count)
        counterStorage.deallocate()
    }

    @inline(__always) public func count(_ c: VifCounter, _ n: UInt64 = 1) {
        counterStorage[c.rawValue].wrappingAdd(n, ordering: .relaxed)
    }

    public func value(_ c: VifCounter) -> UInt64 { counterStorage[c.rawValue].load(ordering: .relaxed) }

    /// A plain copy for reporting.
    public var snapshot: VifStatistics {
        var reasons: [String: UInt64] = [:]
        for c in VifCounter.allCases where value(c) != 0 { reasons[c.description] = value(c) }
        let txDrops = [VifCounter.txTooManySlots, .txFragmentLargerThanRemaining, .txFirstSlotTooShort,
                       .txChecksumSetup, .txGrantCopy, .txTapWrite].reduce(0) { $0 + value($1) }
        let rxDrops = [VifCounter.rxNoSGTooLarge, .rxUnsupportedGSO, .rxGrantCopy, .rxQueueFull,
                       .rxStalledFlush, .rxCarrierOff, .rxShortRead].reduce(0) { $0 + value($1) }
        let queueTx = queues.map { $0.txPackets.load(ordering: .relaxed) }
        let queueRx = queues.map { $0.rxPackets.load(ordering: .relaxed) }
        return VifStatistics(
            txPackets: queueTx.reduce(0, &+), txBytes: txBytes.load(ordering: .relaxed),
            rxPackets: queueRx.reduce(0, &+), rxBytes: rxBytes.load(ordering: .relaxed),
            txDrops: txDrops, rxDrops: rxDrops, txErrors: value(.txFatal),
            txRateLimited: txRateLimited.load(ordering: .relaxed), reasons: reasons,
            queueTxPackets: queueTx, queueRxPackets: queueRx,
            txInPlace: txInPlace.load(ordering: .relaxed), rxInPlace: rxInPlace.load(ordering: .relaxed))
    }
}

/// One queue's packets: its worker is the only writer.
public final class QueueStats: Sendable {
    /// Packets the guest transmitted on this queue that reached the tap.
    public let txPackets = Atomic<UInt64>(0)
    /// Packets delivered into this queue's rx buffers.
    public let rxPackets = Atomic<UInt64>(0)
}

/// One vif's statistics at a moment: packets, bytes, drops, errors by reason.
public struct VifStatistics: Sendable, Equatable, CustomStringConvertible {
    public var txPackets: UInt64
    public var txBytes: UInt64
    public var rxPackets: UInt64
    public var rxBytes: UInt64
    public var txDrops: UInt64
    public var rxDrops: UInt64
    /// Fatal transmit errors (each disabled the vif).
    public var txErrors: UInt64
    public var txRateLimited: UInt64
    /// Counter name -> count, for every non-zero reason.
    public var reasons: [String: UInt64]
    /// Per queue offered: packets transmitted and received on it.
    public var queueTxPackets: [UInt64] = []
    public var queueRxPackets: [UInt64] = []
    /// Of the packets, those whose payload we did not copy (see ``VifStats/txInPlace``).
    public var txInPlace: UInt64 = 0
    public var rxInPlace: UInt64 = 0

    public subscript(_ c: VifCounter) -> UInt64 { reasons[c.description] ?? 0 }

    public var description: String {
        var s = "tx \(txPackets) pkts \(txBytes) B drops \(txDrops) errors \(txErrors); rx \(rxPackets) pkts \(rxBytes) B drops \(rxDrops)"
        for (k, v) in reasons.sorted(by: { $0.key < $1.key }) { s += "; \(k)=\(v)" }
        return s
    }
}
