/// At most one log line a second for an event that repeats, with a count of
/// the lines left out (Linux's `net_ratelimit`, Xen's `printk_ratelimit` for
/// guest-caused messages): a guest repeating a fault cannot fill dom0's logs.
/// One per source (a client, a queue), owned by the thread that logs.
public struct LogRateLimit: Sendable {
    public static let intervalNanoseconds: UInt64 = 1_000_000_000

    private var lastLine: UInt64 = 0
    private var logged = false
    private var leftOut = 0

    public init() {}

    /// Counts one event at `now` (CLOCK_MONOTONIC ns). Returns nil when its
    /// line is to be left out, else how many were left out since the last one.
    public mutating func admit(now: UInt64) -> Int? {
        if logged && now &- lastLine < Self.intervalNanoseconds {
            leftOut += 1
            return nil
        }
        defer { logged = true; lastLine = now; leftOut = 0 }
        return leftOut
    }

    /// " (N more since the last report)" after a line that stands for others, else "".
    public static func suffix(_ leftOut: Int) -> String {
        leftOut > 0 ? " (\(leftOut) more since the last report)" : ""
    }
}
