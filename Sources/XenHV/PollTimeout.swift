/// poll(2) timeouts from CLOCK_MONOTONIC nanoseconds, for the event loops of
/// the daemons and devices (a rate limiter's hold, a storm's mute, a stall
/// clock, a listener's rest).
public enum PollTimeout {
    /// `nanoseconds` rounded up to whole milliseconds, so a wait never ends
    /// before its deadline; at most a minute.
    @inline(__always)
    public static func milliseconds(_ nanoseconds: UInt64) -> Int32 {
        Int32(min((nanoseconds + 999_999) / 1_000_000, 60_000))
    }

    /// Milliseconds from `now` to `deadline`; 0 once it has passed.
    @inline(__always)
    public static func until(_ deadline: UInt64, now: UInt64) -> Int32 {
        deadline > now ? milliseconds(deadline - now) : 0
    }

    /// The sooner of two timeouts, -1 meaning none.
    @inline(__always)
    public static func sooner(_ a: Int32, _ b: Int32) -> Int32 {
        a < 0 ? b : b < 0 ? a : min(a, b)
    }
}
