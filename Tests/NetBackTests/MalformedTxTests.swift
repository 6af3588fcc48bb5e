import CXen
import Foundation
import Glibc
import NetBack
import NetFrontKit
import Testing
import XenHV

/// Each malformed transmit of the table gets Linux netback's treatment on a
/// real vif — ERROR responses and a vif that stays up, or the vif disabled as
/// fatal — while a second vif on the same bridge keeps carrying traffic.
/// Needs root: bridge, veth, namespace and taps, removed in defers.
@Suite(.serialized) struct MalformedTxTests {
    static let more = UInt16(NETTXF_more_data), extraInfo = UInt16(NETTXF_extra_info)
    static let okay = Int16(NETIF_RSP_OKAY), error = Int16(NETIF_RSP_ERROR), null = Int16(NETIF_RSP_NULL)

    final class Bed {
        let fixture: HypervisorFixture
        let net: PeerNetwork
        let hostile: GuestVif
        let good: GuestVif
        let sock: CInt
        var tag: UInt8 = 0

        init() throws {
            fixture = try HypervisorFixture()
            net = try PeerNetwork()
            do {
                hostile = try GuestVif(fixture: fixture, network: net, devid: 0, ipLastOctet: 1)
                good = try GuestVif(fixture: fixture, network: net, devid: 1, ipLastOctet: 3)
                sock = try net.socket(type: Int32(SOCK_DGRAM.rawValue), port: 5000)
            } catch {
                net.tearDown()
                throw error
            }
        }

        func tearDown() {
            close(sock)
            hostile.close()
            good.close()
            net.tearDown()
        }

        /// Sends one UDP datagram from `g` and reports whether the peer got exactly it.
        func flows(_ g: GuestVif, wait: Bool = true) throws -> Bool {
            tag &+= 1
            let payload = [tag] + Array("from \(g.vif.name)".utf8)
            let f = Frames.udp(srcMAC: g.mac, dstMAC: net.peerMAC, src: g.ip, dst: net.peerIP, sport: 6000, dport: 5000, payload: payload)
            guard try g.queue.send(f) else { return false }
            try g.queue.pushTx()
            guard wait else { return true }
            let r = try g.queue.txResponses(1)
            guard r.first?.status == MalformedTxTests.okay else { return false }
            while let d = receiveDatagram(sock, timeout: 3000) { if d == payload { return true } }
            return false
        }

        /// A request for tx buffer id with `size` bytes of a real frame in it.
        func request(size: UInt16, flags: UInt16 = 0, offset: UInt16 = 0, gref: GrantRef? = nil) throws -> netif_tx_request {
            let q = hostile.queue
            let id = try #require(q.takeTxID())
            try q.writeTxBuffer(id, offset: Int(offset), Array(repeating: 0xAB, count: min(Int(size), 4096 - Int(offset))))
            var r = netif_tx_request()
            r.id = id; r.gref = gref ?? q.txRef(id); r.offset = offset; r.flags = flags; r.size = size
            return r
        }

        func extra(type: UInt8, gsoSize: UInt16 = 1448, gsoType: UInt8 = 1, more: Bool = false) -> TxSlot {
            var x = netif_extra_info()
            x.type = type
            x.flags = more ? UInt8(XEN_NETIF_EXTRA_FLAG_MORE) : 0
            x.u.gso.size = gsoSize
            x.u.gso.type = gsoType
            return .extra(x)
        }
    }

    /// Runs `body` on a fresh bed, always tearing it down.
    func withBed(_ body: (Bed) throws -> Void) throws {
        let bed = try Bed()
        defer { bed.tearDown() }
        #expect(try bed.flows(bed.good))
        #expect(try bed.flows(bed.hostile))
        try body(bed)
    }

    /// A dropped packet: ERROR for its slots, NULL for extras, the vif stays up.
    func expectDropped(_ slots: [TxSlot], statuses: [Int16], counter: VifCounter) throws {
        try withBed { bed in
            bed.hostile.queue.sendRaw(slots)
            try bed.hostile.queue.pushTxAndKick()
            let r = try bed.hostile.queue.txResponses(statuses.count)
            #expect(r.map(\.status) == statuses)
            #expect(!bed.hostile.vif.isDisabled)
            #expect(bed.hostile.vif.stats.snapshot[counter] == 1)
            #expect(try bed.flows(bed.hostile))
            #expect(try bed.flows(bed.good))
        }
    }

    /// A fatal error: the vif is disabled with a reason, the other vif flows,
    /// and a reconnect re-arms the disabled one.
    func expectFatal(_ reason: String, publish: Bool = true, _ build: (Bed) throws -> Void) throws {
        try withBed { bed in
            try build(bed)
            if publish { try bed.hostile.queue.pushTxAndKick() } else { try bed.hostile.queue.txChannel.notify() }
            // The other vif keeps flowing meanwhile.
            #expect(try bed.flows(bed.good))
            let deadline = Date().addingTimeInterval(5)
            while !bed.hostile.vif.isDisabled && Date() < deadline { _ = bed.hostile.queue.txChannel.wait(milliseconds: 20) }
            #expect(bed.hostile.vif.isDisabled)
            #expect(bed.hostile.vif.disabledReason?.contains(reason) == true, "\(bed.hostile.vif.disabledReason ?? "nil")")
            #expect(bed.hostile.vif.stats.snapshot.txErrors == 1)
            #expect(try bed.flows(bed.good))
            // Disabled: a good frame now gets no answer.
            #expect(try bed.flows(bed.hostile, wait: false))
            #expect(try bed.hostile.queue.txResponses(1, timeout: 300).isEmpty)
            // Reconnecting with fresh rings brings it back.
            bed.hostile.vif.disconnect()
            let front = try NetFront(guest: bed.hostile.guest)
            try front.queues[0].postRx()
            try bed.hostile.vif.connect(front.connection())
            #expect(!bed.hostile.vif.isDisabled)
            let f = Frames.udp(srcMAC: bed.hostile.mac, dstMAC: bed.net.peerMAC, src: bed.hostile.ip, dst: bed.net.peerIP,
                               sport: 6000, dport: 5000, payload: Array("again".utf8))
            // The carrier comes back on through the kernel's link watch, which
            // may take a moment to let the bridge port forward: resend until then.
            var got = false
            for _ in 0..<10 where !got {
                try front.queues[0].send(f)
                try front.queues[0].pushTx()
                #expect(try front.queues[0].txResponses(1).first?.status == MalformedTxTests.okay)
                while !got, let d = receiveDatagram(bed.sock, timeout: 500) { got = d == Array("again".utf8) }
            }
            #expect(got)
        }
    }

    // MARK: Drops

    @Test func twentySlotsAreDroppedWithErrors() throws {
        var bedSlots: (Bed) throws -> [TxSlot] = { _ in [] }
        bedSlots = { bed in
            var s: [TxSlot] = [.request(try bed.request(size: 2000, flags: Self.more))]
            for k in 0..<19 { s.append(.request(try bed.request(size: 100, flags: k < 18 ? Self.more : 0))) }
            return s
        }
        try withBed { bed in
            bed.hostile.queue.sendRaw(try bedSlots(bed))
            try bed.hostile.queue.pushTxAndKick()
            let r = try bed.hostile.queue.txResponses(20)
            #expect(r.count == 20 && r.allSatisfy { $0.status == Self.error })
            #expect(!bed.hostile.vif.isDisabled)
            #expect(bed.hostile.vif.stats.snapshot[.txTooManySlots] == 1)
            #expect(try bed.flows(bed.hostile))
            #expect(try bed.flows(bed.good))
        }
    }

    @Test func fragmentLargerThanRemainingIsDropped() throws {
        try withBed { bed in
            bed.hostile.queue.sendRaw([.request(try bed.request(size: 100, flags: Self.more)),
                                      .request(try bed.request(size: 200))])
            try bed.hostile.queue.pushTxAndKick()
            #expect(try bed.hostile.queue.txResponses(2).map(\.status) == [Self.error, Self.error])
            #expect(!bed.hostile.vif.isDisabled)
            #expect(bed.hostile.vif.stats.snapshot[.txFragmentLargerThanRemaining] == 1)
            #expect(try bed.flows(bed.hostile))
        }
    }

    @Test func firstSlotShorterThanEthernetIsDropped() throws {
        try withBed { bed in
            bed.hostile.queue.sendRaw([.request(try bed.request(size: 12))])
            try bed.hostile.queue.pushTxAndKick()
            #expect(try bed.hostile.queue.txResponses(1).map(\.status) == [Self.error])
            #expect(bed.hostile.vif.stats.snapshot[.txFirstSlotTooShort] == 1)
            #expect(try bed.flows(bed.hostile))
        }
    }

    @Test func checksumSetupFailureIsDropped() throws {
        try withBed { bed in
            // csum_blank on an ICMP packet (not TCP/UDP), with a GSO extra: the extra gets NULL.
            let icmp = Frames.icmpEcho(srcMAC: bed.hostile.mac, dstMAC: bed.net.peerMAC, src: bed.hostile.ip, dst: bed.net.peerIP,
                                       reply: false, id: 1, seq: 1, payload: [1, 2, 3])
            try bed.hostile.queue.send(icmp, flags: UInt16(NETTXF_csum_blank), gso: TxGSO(type: 1, size: 1000))
            try bed.hostile.queue.pushTxAndKick()
            #expect(try bed.hostile.queue.txResponses(2).map(\.status) == [Self.error, Self.null])
            #expect(!bed.hostile.vif.isDisabled)
            #expect(bed.hostile.vif.stats.snapshot[.txChecksumSetup] == 1)
            #expect(try bed.flows(bed.hostile))
        }
    }

    @Test func zeroSizeFragmentIsAnsweredOkayWithoutTouchingItsGrant() throws {
        try withBed { bed in
            let payload = Array("zero-size fragment".utf8)
            let f = Frames.udp(srcMAC: bed.hostile.mac, dstMAC: bed.net.peerMAC, src: bed.hostile.ip, dst: bed.net.peerIP,
                               sport: 6000, dport: 5000, payload: payload)
            let q = bed.hostile.queue
            let id = try #require(q.takeTxID())
            try q.writeTxBuffer(id, offset: 0, f)
            var first = netif_tx_request()
            first.id = id; first.gref = q.txRef(id); first.size = UInt16(f.count); first.flags = Self.more
            var zero = netif_tx_request()
            zero.id = 999; zero.gref = 0xFFFF_FFF0; zero.size = 0  // a grant that does not exist
            q.sendRaw([.request(first), .request(zero)])
            try q.pushTxAndKick()
            #expect(try q.txResponses(2).map(\.status) == [Self.okay, Self.okay])
            var got = false
            while !got, let d = receiveDatagram(bed.sock, timeout: 3000) { got = d == payload }
            #expect(got)
        }
    }

    // MARK: Fatal

    @Test func producerOverflowIsFatal() throws {
        try expectFatal("bogus ring requests", publish: false) { bed in
            // Publish a req_prod a ring and more past our responses, by hand.
            let q = bed.hostile.queue
            try bed.hostile.guest.memory!.region.store(q.tx.reqProdPvt &+ 300, at: q.txPage(0) * 4096 - 2 * 4096)
        }
    }

    @Test func twentyTwoSlotsAreFatal() throws {
        try expectFatal("malicious frontend") { bed in
            var s: [TxSlot] = [.request(try bed.request(size: 2200, flags: Self.more))]
            for k in 0..<21 { s.append(.request(try bed.request(size: 100, flags: k < 20 ? Self.more : 0))) }
            bed.hostile.queue.sendRaw(s)
        }
    }

    @Test func moreSlotsThanPublishedIsFatal() throws {
        try expectFatal("outstanding") { bed in
            bed.hostile.queue.sendRaw([.request(try bed.request(size: 200, flags: Self.more))])
        }
    }

    @Test func slotCrossingAPageIsFatal() throws {
        try expectFatal("crosses page") { bed in
            bed.hostile.queue.sendRaw([.request(try bed.request(size: 200, offset: 4000))])
        }
    }

    @Test func missingExtraInfoIsFatal() throws {
        try expectFatal("missing extra info") { bed in
            bed.hostile.queue.sendRaw([.request(try bed.request(size: 60, flags: Self.extraInfo))])
        }
    }

    @Test func invalidExtraTypeIsFatal() throws {
        try expectFatal("invalid extra type 9") { bed in
            bed.hostile.queue.sendRaw([.request(try bed.request(size: 60, flags: Self.extraInfo)), bed.extra(type: 9)])
        }
    }

    @Test func gsoSizeZeroIsFatal() throws {
        try expectFatal("GSO size must not be zero") { bed in
            bed.hostile.queue.sendRaw([.request(try bed.request(size: 60, flags: Self.extraInfo)), bed.extra(type: 1, gsoSize: 0)])
        }
    }

    @Test func unknownGSOTypeIsFatal() throws {
        try expectFatal("bad GSO type 7") { bed in
            bed.hostile.queue.sendRaw([.request(try bed.request(size: 60, flags: Self.extraInfo)), bed.extra(type: 1, gsoType: 7)])
        }
    }

    /// Random bytes in every tx slot, published in bursts: the daemon must
    /// survive (dropping or disabling the vif, never trapping), and the other
    /// vif keeps flowing.
    @Test func randomGarbageOnTheTxRing() throws {
        try withBed { bed in
            var g = TxParserFuzzTests.SplitMix(state: 42)
            let q = bed.hostile.queue
            for _ in 0..<20 {
                for _ in 0..<Int.random(in: 1...40, using: &g) {
                    var r = TxParserFuzzTests.randomRequest(&g)
                    if Bool.random(using: &g) { r.gref = q.txRef(UInt16.random(in: 0..<256, using: &g)) }
                    guard q.tx.enqueue(r) else { break }
                }
                try q.pushTxAndKick()
                _ = try q.txResponses(Int(q.tx.reqProdPvt &- q.tx.rspCons), timeout: 50)
                if bed.hostile.vif.isDisabled { break }
            }
            #expect(try bed.flows(bed.good))
            let s = bed.hostile.vif.stats.snapshot
            #expect(bed.hostile.vif.isDisabled || s.txDrops > 0, "\(s)")
        }
    }
}
