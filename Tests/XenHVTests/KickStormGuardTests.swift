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
        #expect(KickStormGuard.pollMilliseconds(1) == 1 && KickStormGuard.pollMilliseconds(2 * Self.ms) == 2)
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
