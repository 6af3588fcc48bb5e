import CXen
import NetBack
import NetFrontKit
import Testing

/// Randomised request sequences through the transmit parser and header
/// setup (seeded, so a failure reproduces): it must never trap, never read
/// past what was published, and every verdict must match the rules.
@Suite struct TxParserFuzzTests {
    struct SplitMix: RandomNumberGenerator {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
    }

    static func randomRequest(_ g: inout SplitMix) -> netif_tx_request {
        var r = netif_tx_request()
        withUnsafeMutableBytes(of: &r) { p in for i in 0..<p.count { p[i] = UInt8.random(in: 0...255, using: &g) } }
        // Bias towards the interesting shapes: small sizes and offsets, chained slots.
        if Bool.random(using: &g) { r.size = UInt16.random(in: 0...4200, using: &g) }
        if Bool.random(using: &g) { r.offset = UInt16.random(in: 0...200, using: &g) }
        if Int.random(in: 0..<4, using: &g) != 0 { r.flags &= 0x0F }
        return r
    }

    @Test(arguments: 0..<8) func parserNeverOverreadsAndVerdictsHold(seed: UInt64) {
        var g = SplitMix(state: seed &* 0x1234_5678 &+ 1)
        for _ in 0..<20_000 {
            let n = Int.random(in: 1...30, using: &g)
            let slots = (0..<n).map { _ in Self.randomRequest(&g) }
            var p = TxPacket()
            var taken = 1
            do {
                try TxParser.parse(first: slots[0], outstanding: n - 1, next: { () throws(TxFatal) -> netif_tx_request in
                    precondition(taken < n, "parser read past the published requests")
                    defer { taken += 1 }
                    return slots[taken]
                }, into: &p)
                // Not fatal: every slot it took is accounted for, each frame bounded.
                #expect(p.slots == taken)
                #expect(p.fragments.count <= TxParser.fatalSlots)
                if p.drop == nil && !p.multicastControl {
                    #expect(p.first.size >= 14 && Int(p.first.offset) + Int(p.first.size) <= 4096)
                    #expect(p.fragments.count <= TxParser.legacySlotsMax)
                    let total = Int(p.first.size) + p.fragments.reduce(0) { $0 + Int($1.size) }
                    #expect(total == p.totalSize)
                    #expect(p.fragments.allSatisfy { Int($0.offset) + Int($0.size) <= 4096 })
                    if let gso = p.gso { #expect(gso.size > 0 && (gso.type == 1 || gso.type == 2)) }
                }
            } catch {
                #expect(taken <= n)
            }
        }
    }

    @Test(arguments: 0..<4) func headerSetupNeverTrapsOnGarbage(seed: UInt64) {
        var g = SplitMix(state: seed &+ 99)
        let base = Frames.tcp(srcMAC: [2, 0, 0, 0, 0, 1], dstMAC: [2, 0, 0, 0, 0, 2], src: [10, 0, 0, 1], dst: [10, 0, 0, 2],
                              sport: 1, dport: 2, seq: 1, ack: 1, flags: 0x18, payload: Array(repeating: 0, count: 100))
        for _ in 0..<50_000 {
            var f = Array(base.prefix(Int.random(in: 0...base.count, using: &g)))
            for _ in 0..<Int.random(in: 0...6, using: &g) where !f.isEmpty {
                f[Int.random(in: 0..<f.count, using: &g)] = UInt8.random(in: 0...255, using: &g)
            }
            if Bool.random(using: &g), f.count > 13 { f[12] = 0x86; f[13] = 0xDD }
            let flags = UInt16.random(in: 0...3, using: &g)
            let gso: TxGSO? = Bool.random(using: &g) ? TxGSO(type: UInt8.random(in: 1...2, using: &g), size: 100) : nil
            f.withUnsafeMutableBytes { p in
                if let h = try? TxParser.vnetHeader(flags: flags, gso: gso, data: p), h.needsChecksum {
                    #expect(Int(h.csumStart) + Int(h.csumOffset) + 2 <= p.count)
                    if h.gsoType != 0 { #expect(Int(h.headerLength) <= p.count) }
                }
            }
        }
    }
}
