import Glibc
import Testing
import XenHV

/// The XSA-332 back-off every backend shares, on a clock the test drives.
@Suite struct KickStormGuardTests {
    static let ms: UInt64 = 1_000_000

    /// `stormKicks` empty wake-ups; returns whether the last one started a mute.
    static func storm(_ g: inout KickStormGuard, at now: UInt64) -> Bool {
        var started = false
        var early = 0
        for i in 0..<KickStormGuard.stormKicks {
            started = g.turn(kicked: true, foundWork: false, now: now)
            if started && i < KickStormGuard.stormKicks - 1 { early += 1 }
        }
        #expect(early == 0, "a mute before \(KickStormGuard.stormKicks) empty kicks")
        return started
    }

    @Test func aStormMutesThePortAndTheMuteDoublesWhileTheStormGoesOn() {
        var g = KickStormGuard()
        var now: UInt64 = 1_000 * Self.ms
        var mutes: [UInt64] = []
        for _ in 0..<8 {
            #expect(Self.storm(&g, at: now))
            let left = g.muted(now: now)
            mutes.append(left ?? 0)
            now += left ?? 0
            let after = g.muted(now: now)
            #expect(after == nil, "the mute ends on time")
        }
        #expect(mutes == [1, 2, 4, 8, 16, 32, 32, 32].map { $0 * Self.ms })
        #expect(PollTimeout.milliseconds(1) == 1 && PollTimeout.milliseconds(2 * Self.ms) == 2)
    }

    @Test func workEndsTheEscalationAndBreaksACountOfEmptyKicks() {
        var g = KickStormGuard()
        var now: UInt64 = 1_000 * Self.ms
        for _ in 0..<3 { #expect(Self.storm(&g, at: now)); now += g.muted(now: now)!; _ = g.muted(now: now) }
        // A turn that found work: the next storm starts over at the first mute.
        let worked = g.turn(kicked: true, foundWork: true, now: now)
        #expect(!worked)
        #expect(Self.storm(&g, at: now))
        let first = g.muted(now: now)
        #expect(first == Self.ms)
        now += Self.ms
        let ended = g.muted(now: now)
        #expect(ended == nil)
        // Empty kicks broken by work never add up to a storm.
        var mutes = 0
        for _ in 0..<10 {
            for _ in 0..<(KickStormGuard.stormKicks - 1) where g.turn(kicked: true, foundWork: false, now: now) { mutes += 1 }
            if g.turn(kicked: false, foundWork: true, now: now) { mutes += 1 }
        }
        // Turns the port did not start (a timer, a completion) are not kicks.
        for _ in 0..<(2 * KickStormGuard.stormKicks) where g.turn(kicked: false, foundWork: false, now: now) { mutes += 1 }
        #expect(mutes == 0)
        let never = g.muted(now: now)
        #expect(never == nil)
    }

    @Test func stormsFarApartAreNotOneStorm() {
        var g = KickStormGuard()
        var now: UInt64 = 1_000 * Self.ms
        for _ in 0..<4 { #expect(Self.storm(&g, at: now)); now += g.muted(now: now)!; _ = g.muted(now: now) }
        // Quiet for longer than the longest mute, then kicking again: 1 ms first.
        now += KickStormGuard.longestMuteNanoseconds + Self.ms
        #expect(Self.storm(&g, at: now))
        let left = g.muted(now: now)
        #expect(left == Self.ms)
    }
}

/// xenhv's and xenstored's listeners out of descriptors, and the poll
/// timeouts every event loop derives from its deadlines.
@Suite struct AcceptRestTests {
    static let ms: UInt64 = 1_000_000

    @Test func aListenerOutOfDescriptorsRestsAndIsReportedOncePerSpell() {
        var r = AcceptRest()
        let rest = AcceptRest.restNanoseconds
        var failure = r.acceptFailed(errno: EAGAIN, now: 0)
        #expect(failure == .other, "a drained listener is no starvation")
        var resting = r.resting(now: 0)
        #expect(!resting && r.pollTimeout(-1, now: 0) == -1)
        let t0 = 5 * Self.ms
        failure = r.acceptFailed(errno: EMFILE, now: t0)
        #expect(failure == .outOfDescriptors(first: true))
        resting = r.resting(now: t0 + rest - 1)
        #expect(resting)
        #expect(r.pollTimeout(-1, now: t0) == 100 && r.pollTimeout(7, now: t0) == 7)
        resting = r.resting(now: t0 + rest)
        #expect(!resting, "the rest ends on time")
        #expect(r.pollTimeout(-1, now: t0 + rest) == -1)
        // Still no descriptor: the same spell, rested again but not reported again.
        failure = r.acceptFailed(errno: ENFILE, now: t0 + rest)
        #expect(failure == .outOfDescriptors(first: false))
        resting = r.resting(now: t0 + rest)
        #expect(resting)
        var ended = r.accepted()
        #expect(ended, "an accept that works ends the spell")
        ended = r.accepted()
        #expect(!ended)
        failure = r.acceptFailed(errno: EMFILE, now: t0 + 10 * rest)
        #expect(failure == .outOfDescriptors(first: true))
    }

    @Test func pollTimeoutsRoundUpAndTakeTheSoonerDeadline() {
        #expect(PollTimeout.milliseconds(0) == 0 && PollTimeout.milliseconds(Self.ms + 1) == 2)
        #expect(PollTimeout.milliseconds(UInt64.max / 2) == 60_000)
        #expect(PollTimeout.until(10 * Self.ms, now: 3 * Self.ms) == 7 && PollTimeout.until(3, now: 10) == 0)
        #expect(PollTimeout.sooner(-1, 5) == 5 && PollTimeout.sooner(5, -1) == 5 && PollTimeout.sooner(9, 4) == 4)
        #expect(PollTimeout.sooner(-1, -1) == -1)
    }
}

/// Guest-caused log lines, one a second at most per source.
@Suite struct LogRateLimitTests {
    @Test func oneLineASecondWithTheCountOfThoseLeftOut() {
        var l = LogRateLimit()
        let s = LogRateLimit.intervalNanoseconds
        var admitted = l.admit(now: 7)
        #expect(admitted == 0)
        for i in 1...5 {
            admitted = l.admit(now: 7 + UInt64(i) * s / 10)
            #expect(admitted == nil)
        }
        admitted = l.admit(now: 7 + s)
        #expect(admitted == 5)
        admitted = l.admit(now: 7 + s + 1)
        #expect(admitted == nil)
        admitted = l.admit(now: 7 + 5 * s)
        #expect(admitted == 1)
        #expect(LogRateLimit.suffix(0) == "" && LogRateLimit.suffix(3) == " (3 more since the last report)")
    }
}
