import XenHV

/// Polls `condition` until it holds or `seconds` pass, pausing `every`
/// milliseconds between tries, and returns its last answer. For what another
/// process or thread makes true with nothing a test could wait on (a /proc
/// entry, a counter, a link's carrier): bounded, and never a sleep standing
/// in for a signal.
public func eventually(seconds: Double = 10, every milliseconds: Int32 = 10,
                       _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = monotonicSeconds() + seconds
    while monotonicSeconds() < deadline {
        if try condition() { return true }
        idle(milliseconds: milliseconds)
    }
    return try condition()
}
