/// XSA-332's defence for one event-channel port: a guest that notifies in a
/// tight loop with no work must not make a backend spin on its behalf.
///
/// Linux's counterpart is the late-EOI handling of
/// `drivers/xen/events/events_base.c` (`xen_irq_lateeoi_locked`): every event
/// a backend reports as spurious delays the port's next EOI, by
/// 2^(n-2) jiffies after the n-th in a row, up to a second. A userspace
/// wake-up here coalesces every kick since the last one, so a storm is
/// ``stormKicks`` wake-ups in a row that found nothing. The port is then
/// muted (the owner stops polling it) for ``firstMuteNanoseconds``, doubled
/// for each storm that follows with no work between, up to
/// ``longestMuteNanoseconds``. Work found ends the escalation. When a mute
/// ends the owner checks its ring again, so nothing a guest queued is lost:
/// a stormer's own requests wait at most one mute.
///
/// One per port, owned by the thread that serves it (blkback's queue,
/// netback's queue, xenstored's ring).
public struct KickStormGuard: Sendable {
    /// Wake-ups in a row that found no work before the port is muted.
    public static let stormKicks = 64
    /// The first mute of a storm...
    public static let firstMuteNanoseconds: UInt64 = 1_000_000
    /// ...and the longest, from the sixth storm in a row on.
    public static let longestMuteNanoseconds: UInt64 = 32_000_000

    private var idleKicks = 0
    /// Storms in a row with no work between: the next mute is `first << stormsInARow`.
    private var stormsInARow = 0
    /// When the current mute ends (CLOCK_MONOTONIC, ns); 0 when not muted.
    public private(set) var mutedUntil: UInt64 = 0

    public init() {}

    /// Records one turn of the owner's loop: whether the port woke it
    /// (`kicked`) and whether the turn found work for the guest. Returns
    /// true when this turn starts a mute (the owner counts it in its
    /// statistics; ``muted(now:)`` then says for how long).
    @inline(__always)
    public mutating func turn(kicked: Bool, foundWork: Bool, now: @autoclosure () -> UInt64) -> Bool {
        if foundWork {
            idleKicks = 0
            stormsInARow = 0
            return false
        }
        guard kicked else { return false }
        idleKicks += 1
        guard idleKicks >= Self.stormKicks else { return false }
        return startMute(now: now())
    }

    private mutating func startMute(now: UInt64) -> Bool {
        idleKicks = 0
        // A storm long after the last one's mute starts the escalation again.
        if stormsInARow > 0, now &- lastMuteEnd > Self.longestMuteNanoseconds { stormsInARow = 0 }
        let mute = min(Self.firstMuteNanoseconds << UInt64(stormsInARow), Self.longestMuteNanoseconds)
        if mute < Self.longestMuteNanoseconds { stormsInARow += 1 }
        mutedUntil = now &+ mute
        return true
    }
    /// When the last mute ended: storms further apart are not one storm.
    private var lastMuteEnd: UInt64 = 0

    /// Nanoseconds left of the current mute, or nil when the port is to be
    /// polled (an expired mute ends here).
    @inline(__always)
    public mutating func muted(now: @autoclosure () -> UInt64) -> UInt64? {
        guard mutedUntil != 0 else { return nil }
        let t = now()
        if t < mutedUntil { return mutedUntil - t }
        lastMuteEnd = mutedUntil
        mutedUntil = 0
        return nil
    }
}
