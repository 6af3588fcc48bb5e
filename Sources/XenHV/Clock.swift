import Glibc

/// CLOCK_MONOTONIC in nanoseconds: deadlines, timeouts and rate windows
/// everywhere in the project.
@inline(__always)
public func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

/// CLOCK_MONOTONIC in seconds.
@inline(__always)
public func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// Sleeps for `milliseconds` (poll with no descriptors): the pause of a
/// bounded retry loop, never a stand-in for a readiness signal.
public func idle(milliseconds: Int32) {
    var p = pollfd(fd: -1, events: 0, revents: 0)
    _ = poll(&p, 0, milliseconds)
}
