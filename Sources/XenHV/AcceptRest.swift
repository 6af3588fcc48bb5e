import Glibc

/// A listening socket out of descriptors. accept(2) failing with EMFILE or
/// ENFILE leaves the connection queued and the socket readable, so polling it
/// again at once would spin; the listener rests instead (its owner leaves it
/// out of the poll set) for ``restNanoseconds`` at a time, and the queued
/// client is served once a descriptor is free. xenhv's and xenstored's
/// listeners rest this way.
public struct AcceptRest: Sendable {
    /// How long a listener out of descriptors stays out of the poll set.
    public static let restNanoseconds: UInt64 = 100_000_000

    /// When the rest ends (CLOCK_MONOTONIC ns); 0 while listening.
    public private(set) var until: UInt64 = 0
    /// A spell without descriptors: from the first refused accept to the next one that works.
    private var starved = false

    public init() {}

    /// What a failed accept means for the listener.
    public enum Failure: Equatable, Sendable {
        /// Not for want of descriptors (EAGAIN on a drained non-blocking listener, say).
        case other
        /// No descriptor left: the listener rests; `first` for the first
        /// failure of a spell (the owner says so, once).
        case outOfDescriptors(first: Bool)
    }

    /// Looks at a failed accept's errno: no descriptor left starts a rest.
    public mutating func acceptFailed(errno e: Int32, now: UInt64) -> Failure {
        guard e == EMFILE || e == ENFILE else { return .other }
        until = now &+ Self.restNanoseconds
        defer { starved = true }
        return .outOfDescriptors(first: !starved)
    }

    /// Records an accept that worked; returns true when it ends a spell.
    public mutating func accepted() -> Bool {
        defer { starved = false }
        return starved
    }

    /// Whether the listener rests at `now`; a rest that is over ends here
    /// (the owner polls the listener again).
    public mutating func resting(now: UInt64) -> Bool {
        guard until != 0 else { return false }
        if now < until { return true }
        until = 0
        return false
    }

    /// `timeout` (poll(2) milliseconds, -1 for none), shortened to wake when the rest ends.
    public func pollTimeout(_ timeout: Int32, now: @autoclosure () -> UInt64) -> Int32 {
        guard until != 0 else { return timeout }
        return PollTimeout.sooner(timeout, PollTimeout.until(until, now: now()))
    }
}
