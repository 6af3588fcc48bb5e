import Glibc
import XenHV

/// The vif's `rate` key: `bytes,usec` — at most `bytes` per `usec`
/// microseconds (what libxl writes for `rate=10Mb/s@20ms`).
public struct RateLimit: Sendable, Equatable {
    public var bytesPerInterval: UInt64
    public var intervalMicroseconds: UInt64

    public init(bytesPerInterval: UInt64, intervalMicroseconds: UInt64) {
        self.bytesPerInterval = bytesPerInterval
        self.intervalMicroseconds = intervalMicroseconds
    }

    /// Parses xenstore's `rate` value, "BYTES,USEC" (Linux's xen_net_read_rate).
    /// Returns nil for anything else (a number past UInt64, or zero, too),
    /// which means unlimited, as Linux does; the caller logs it. Any interval
    /// that parses is taken: the limiter's arithmetic saturates (Linux's
    /// msecs_to_jiffies caps a huge one the same way).
    public init?(xenstoreValue s: String) {
        let parts = s.split(separator: ",", omittingEmptySubsequences: false)
        guard parts.count == 2, let b = UInt64(parts[0]), let u = UInt64(parts[1]), b > 0, u > 0 else { return nil }
        self.init(bytesPerInterval: b, intervalMicroseconds: u)
    }
}

/// Credit-based transmit limiting, as Linux netback's `tx_credit_exceeded` /
/// `tx_add_credit`: every `interval` the credit grows by `bytes`, capped at
/// max(bytes, 128 KiB) so one jumbo/GSO packet can always pass. A packet
/// larger than the remaining credit waits for the next window.
public struct RateLimiter: Sendable {
    public private(set) var limit: RateLimit?
    private(set) var remainingCredit: UInt64
    private var windowStart: UInt64  // nanoseconds, CLOCK_MONOTONIC
    /// Set when a packet was held back; the caller sleeps until `nextCredit`.
    public private(set) var limited = false

    public init(_ limit: RateLimit?, now: UInt64 = RateLimiter.now()) {
        self.limit = limit
        remainingCredit = limit?.bytesPerInterval ?? .max
        windowStart = now
    }

    @inline(__always) public static func now() -> UInt64 { monotonicNanoseconds() }

    /// When the current window ends (nanoseconds, CLOCK_MONOTONIC).
    /// Saturates at UInt64.max for a huge interval (the toolstack's `rate`
    /// may name any number of microseconds): a window that never ends in
    /// practice, never a trap.
    public var nextCredit: UInt64 {
        guard let l = limit else { return 0 }
        let (ns, over) = l.intervalMicroseconds.multipliedReportingOverflow(by: 1000)
        let (end, past) = windowStart.addingReportingOverflow(ns)
        return over || past ? .max : end
    }

    private mutating func addCredit() {
        guard let l = limit else { return }
        let maxBurst = Swift.max(131_072, l.bytesPerInterval)
        let (sum, overflow) = remainingCredit.addingReportingOverflow(l.bytesPerInterval)
        remainingCredit = Swift.min(overflow ? .max : sum, maxBurst)
        limited = false
    }

    /// The toolstack changed `rate` while connected (Linux's
    /// xen_net_rate_changed): a queue held back for credit gets the new
    /// window's credit now (Linux fires its pending credit timer at once);
    /// otherwise the remaining credit is cut to the new window's bytes.
    public mutating func change(to new: RateLimit?, now: UInt64 = RateLimiter.now()) {
        limit = new
        guard let l = new else {
            remainingCredit = .max
            limited = false
            return
        }
        if limited {
            windowStart = now
            remainingCredit = 0
            addCredit()
        } else if remainingCredit > l.bytesPerInterval {
            remainingCredit = l.bytesPerInterval
        }
    }

    /// Whether a packet of `size` bytes may go now; if so its size is charged.
    /// When not, `nextCredit` says when to try again.
    @inline(__always)
    public mutating func admit(_ size: Int, now: UInt64 = RateLimiter.now()) -> Bool {
        guard limit != nil else { return true }
        let s = UInt64(size)
        if s > remainingCredit {
            if now >= nextCredit {
                windowStart = now
                addCredit()
            }
            if s > remainingCredit {
                // Hold until the next window; it starts where this one ends.
                limited = true
                return false
            }
        }
        remainingCredit -= s
        return true
    }
}
