import CNetShim
import CXen
import NetBack
import NetFrontKit
import Testing
import XenRing

/// The transmit parser on private copies: one test per row of the
/// malformed-transmit table (xen-facts.md, Linux netback), plus the
/// well-formed shapes it must accept.
@Suite struct TxParserTests {
    static func req(id: UInt16, size: UInt16, offset: UInt16 = 0, flags: UInt16 = 0, gref: UInt32 = 100) -> netif_tx_request {
        var r = netif_tx_request()
        r.id = id; r.size = size; r.offset = offset; r.flags = flags; r.gref = gref
        return r
    }

    static func extra(type: UInt8, more: Bool = false, gsoSize: UInt16 = 1448, gsoType: UInt8 = 1) -> netif_tx_request {
        var x = netif_extra_info()
        x.type = type
        x.flags = more ? UInt8(XEN_NETIF_EXTRA_FLAG_MORE) : 0
        x.u.gso.size = gsoSize
        x.u.gso.type = gsoType
        var r = netif_tx_request()
        withUnsafeMutableBytes(of: &r) { p in withUnsafeBytes(of: x) { p.copyMemory(from: $0) } }
        return r
    }

    static let more = UInt16(NETTXF_more_data)
    static let extraFlag = UInt16(NETTXF_extra_info)

    /// Parses `slots` as published requests (the first is taken, the rest outstanding).
    static func parse(_ slots: [netif_tx_request], outstanding: Int? = nil) throws(TxFatal) -> TxPacket {
        var p = TxPacket()
        var i = 1
        try TxParser.parse(first: slots[0], outstanding: outstanding ?? slots.count - 1, next: { () throws(TxFatal) -> netif_tx_request in
            defer { i += 1 }
            return slots[i]
        }, into: &p)
        return p
    }

    /// A packet of `total` slots: first announces the size, each fragment 100 bytes.
    static func chain(_ total: Int) -> [netif_tx_request] {
        let frags = total - 1
        var s = [req(id: 0, size: UInt16(100 * total), flags: frags > 0 ? more : 0)]
        for k in 0..<frags { s.append(req(id: UInt16(k + 1), size: 100, flags: k + 1 < frags ? more : 0)) }
        return s
    }

    @Test func singleSlotPacket() throws {
        let p = try Self.parse([Self.req(id: 7, size: 60)])
        #expect(p.drop == nil)
        #expect(p.first.size == 60 && p.totalSize == 60 && p.slots == 1 && p.gso == nil)
    }

    @Test func multiSlotWithGSOExtra() throws {
        let s = [Self.req(id: 1, size: 9000, flags: Self.more | Self.extraFlag),
                 Self.extra(type: UInt8(XEN_NETIF_EXTRA_TYPE_GSO), gsoSize: 1448, gsoType: 1),
                 Self.req(id: 2, size: 4096, flags: Self.more), Self.req(id: 3, size: 904)]
        let p = try Self.parse(s)
        #expect(p.drop == nil)
        #expect(p.first.size == 4000)  // what is left for the first slot
        #expect(p.extraCount == 1 && p.fragments.count == 2 && p.slots == 4)
        #expect(p.gso == TxGSO(type: 1, size: 1448))
    }

    @Test func zeroSizeFragmentIsAccepted() throws {
        let s = [Self.req(id: 1, size: 100, flags: Self.more), Self.req(id: 2, size: 0, flags: Self.more, gref: 0xFFFF_FFFF),
                 Self.req(id: 3, size: 40)]
        let p = try Self.parse(s)
        #expect(p.drop == nil && p.first.size == 60 && p.fragments.count == 2)
    }

    @Test func nineteenSlotsAreAccepted() throws {
        // XEN_NETIF_NR_SLOTS_MIN (18) slots after the first is still legal.
        let p = try Self.parse(Self.chain(19))
        #expect(p.drop == nil && p.slots == 19)
    }

    @Test func twentyAndTwentyOneSlotsAreDropped() throws {
        for n in [20, 21] {
            let p = try Self.parse(Self.chain(n))
            #expect(p.drop == .tooManySlots(19), "\(n) slots")
            #expect(p.slots == n)  // every slot consumed, each gets an ERROR response
        }
    }

    @Test func twentyTwoSlotsAreFatal() {
        #expect(throws: TxFatal.maliciousSlotCount(20)) { try Self.parse(Self.chain(22)) }
    }

    @Test func moreSlotsThanOutstandingRequestsIsFatal() {
        var s = Self.chain(3)
        s.removeLast()
        #expect(throws: TxFatal.slotsExceedRequests(slots: 2, outstanding: 1)) { try Self.parse(s) }
    }

    @Test func slotCrossingAPageIsFatal() {
        #expect(throws: TxFatal.slotCrossesPage(offset: 4000, size: 200)) {
            try Self.parse([Self.req(id: 1, size: 200, offset: 4000)])
        }
        #expect(throws: TxFatal.slotCrossesPage(offset: 100, size: 4000)) {
            try Self.parse([Self.req(id: 1, size: 4100, flags: Self.more), Self.req(id: 2, size: 4000, offset: 100)])
        }
    }

    @Test func fragmentLargerThanRemainingIsDropped() throws {
        let s = [Self.req(id: 1, size: 100, flags: Self.more), Self.req(id: 2, size: 60, flags: Self.more), Self.req(id: 3, size: 50)]
        let p = try Self.parse(s)
        #expect(p.drop == .fragmentLargerThanRemaining(size: 50, remaining: 40))
        #expect(p.slots == 3)
    }

    @Test func firstSlotShorterThanEthernetHeaderIsDropped() throws {
        #expect(try Self.parse([Self.req(id: 1, size: 13)]).drop == .firstSlotTooShort(13))
        let s = [Self.req(id: 1, size: 100, flags: Self.more), Self.req(id: 2, size: 90)]
        #expect(try Self.parse(s).drop == .firstSlotTooShort(10))
    }

    @Test func missingExtraInfoIsFatal() {
        #expect(throws: TxFatal.missingExtraInfo) { try Self.parse([Self.req(id: 1, size: 60, flags: Self.extraFlag)]) }
        // An extra that says "more" with nothing after it.
        #expect(throws: TxFatal.missingExtraInfo) {
            try Self.parse([Self.req(id: 1, size: 60, flags: Self.extraFlag), Self.extra(type: 1, more: true)])
        }
    }

    @Test func invalidExtraTypeIsFatal() {
        for t: UInt8 in [0, 5, 200] {
            #expect(throws: TxFatal.invalidExtraType(t)) {
                try Self.parse([Self.req(id: 1, size: 60, flags: Self.extraFlag), Self.extra(type: t)])
            }
        }
    }

    @Test func gsoSizeZeroAndUnknownGSOTypeAreFatal() {
        #expect(throws: TxFatal.gsoSizeZero) {
            try Self.parse([Self.req(id: 1, size: 60, flags: Self.extraFlag), Self.extra(type: 1, gsoSize: 0)])
        }
        #expect(throws: TxFatal.badGSOType(3)) {
            try Self.parse([Self.req(id: 1, size: 60, flags: Self.extraFlag), Self.extra(type: 1, gsoType: 3)])
        }
        #expect(throws: TxFatal.badGSOType(0)) {
            try Self.parse([Self.req(id: 1, size: 60, flags: Self.extraFlag), Self.extra(type: 1, gsoType: 0)])
        }
    }

    @Test func multicastControlIsAnsweredNotSent() throws {
        let p = try Self.parse([Self.req(id: 1, size: 0, flags: Self.extraFlag), Self.extra(type: UInt8(XEN_NETIF_EXTRA_TYPE_MCAST_ADD))])
        #expect(p.multicastControl && p.drop == nil && p.slots == 2)
    }

    // MARK: Checksum and GSO setup on the private copy

    static let mac1: [UInt8] = [2, 0, 0, 0, 0, 1], mac2: [UInt8] = [2, 0, 0, 0, 0, 2]
    static let ip1: [UInt8] = [10, 0, 0, 1], ip2: [UInt8] = [10, 0, 0, 2]

    static func header(_ frame: [UInt8], flags: UInt16, gso: TxGSO? = nil) throws(ChecksumSetupError) -> (VnetHeader, [UInt8]) {
        var f = frame
        let r: Result<VnetHeader, ChecksumSetupError> = f.withUnsafeMutableBytes { p in
            Result { () throws(ChecksumSetupError) -> VnetHeader in try TxParser.vnetHeader(flags: flags, gso: gso, data: p) }
        }
        return (try r.get(), f)
    }

    @Test func csumBlankUDPAsksTheKernelToChecksum() throws {
        let f = Frames.udp(srcMAC: Self.mac1, dstMAC: Self.mac2, src: Self.ip1, dst: Self.ip2, sport: 1, dport: 2,
                           payload: Array(repeating: 7, count: 30), checksumBlank: true)
        let (h, out) = try Self.header(f, flags: UInt16(NETTXF_csum_blank))
        #expect(h.flags == CNET_VNET_F_NEEDS_CSUM && h.csumStart == 34 && h.csumOffset == 6 && h.gsoType == 0)
        #expect(out == f)  // the guest's partial sum is trusted, not rewritten
    }

    @Test func gsoTCPBecomesAVnetGSORequest() throws {
        let f = Frames.tcp(srcMAC: Self.mac1, dstMAC: Self.mac2, src: Self.ip1, dst: Self.ip2, sport: 1, dport: 2, seq: 1,
                           ack: 1, flags: 0x18, options: [1, 1, 8, 10] + Array(repeating: 0, count: 8),
                           payload: Array(repeating: 1, count: 3000), checksumBlank: true)
        let (h, _) = try Self.header(f, flags: UInt16(NETTXF_csum_blank), gso: TxGSO(type: 1, size: 1448))
        #expect(h.flags == CNET_VNET_F_NEEDS_CSUM && h.csumStart == 34 && h.csumOffset == 16)
        #expect(h.gsoType == CNET_VNET_GSO_TCPV4 && h.gsoSize == 1448 && h.headerLength == 34 + 32)
    }

    @Test func gsoWithoutCsumBlankGetsThePseudoHeaderSum() throws {
        let f = Frames.tcp(srcMAC: Self.mac1, dstMAC: Self.mac2, src: Self.ip1, dst: Self.ip2, sport: 1, dport: 2, seq: 1,
                           ack: 1, flags: 0x18, payload: Array(repeating: 1, count: 3000), checksumBlank: false)
        let (h, out) = try Self.header(f, flags: 0, gso: TxGSO(type: 1, size: 1000))
        #expect(h.needsChecksum && h.gsoType == CNET_VNET_GSO_TCPV4)
        let partial = Frames.partialChecksum(src: Self.ip1, dst: Self.ip2, proto: 6, length: 20 + 3000)
        #expect(UInt16(out[50]) << 8 | UInt16(out[51]) == partial)
    }

    /// A packet read in place gets its header from its first slot alone: the
    /// same vnet header, and the pseudo-header sum still counts every L4 byte.
    @Test func theHeadAloneGivesTheSameHeaderAsTheWholePacket() throws {
        let f = Frames.tcp(srcMAC: Self.mac1, dstMAC: Self.mac2, src: Self.ip1, dst: Self.ip2, sport: 1, dport: 2, seq: 1,
                           ack: 1, flags: 0x18, payload: Array(repeating: 1, count: 9000), checksumBlank: false)
        let (whole, out) = try Self.header(f, flags: 0, gso: TxGSO(type: 1, size: 1448))
        var head = Array(f[0..<4096])
        let r: Result<VnetHeader, ChecksumSetupError> = head.withUnsafeMutableBytes { p in
            Result { () throws(ChecksumSetupError) -> VnetHeader in
                try TxParser.vnetHeader(flags: 0, gso: TxGSO(type: 1, size: 1448), data: p, totalLength: f.count)
            }
        }
        #expect(try r.get() == whole)
        #expect(head == Array(out[0..<4096]))
        // Headers cut by the end of the head: refused, so the caller copies the whole packet.
        var cut = Array(f[0..<40])
        let refused: Result<VnetHeader, ChecksumSetupError> = cut.withUnsafeMutableBytes { p in
            Result { () throws(ChecksumSetupError) -> VnetHeader in
                try TxParser.vnetHeader(flags: 0, gso: TxGSO(type: 1, size: 1448), data: p, totalLength: f.count)
            }
        }
        #expect(throws: ChecksumSetupError.truncated("TCP")) { try refused.get() }
    }

    @Test func gsoTypeMustMatchTheIPVersion() {
        let f = Frames.tcp(srcMAC: Self.mac1, dstMAC: Self.mac2, src: Self.ip1, dst: Self.ip2, sport: 1, dport: 2, seq: 1,
                           ack: 1, flags: 0x18, payload: [1, 2, 3], checksumBlank: true)
        #expect(throws: ChecksumSetupError.badIPHeader) { try Self.header(f, flags: UInt16(NETTXF_csum_blank), gso: TxGSO(type: 2, size: 100)) }
    }

    @Test func checksumSetupFailures() {
        var arp = Frames.ethernet(dst: Self.mac2, src: Self.mac1, type: 0x0806, Array(repeating: 0, count: 28))
        #expect(throws: ChecksumSetupError.notIP(etherType: 0x0806)) { try Self.header(arp, flags: UInt16(NETTXF_csum_blank)) }
        var frag = Frames.udp(srcMAC: Self.mac1, dstMAC: Self.mac2, src: Self.ip1, dst: Self.ip2, sport: 1, dport: 2, payload: [1])
        frag[20] = 0x20  // more fragments
        #expect(throws: ChecksumSetupError.fragment) { try Self.header(frag, flags: UInt16(NETTXF_csum_blank)) }
        let icmp = Frames.icmpEcho(srcMAC: Self.mac1, dstMAC: Self.mac2, src: Self.ip1, dst: Self.ip2, reply: false, id: 1, seq: 1, payload: [])
        #expect(throws: ChecksumSetupError.unsupportedProtocol(1)) { try Self.header(icmp, flags: UInt16(NETTXF_csum_blank)) }
        let short = Array(Frames.udp(srcMAC: Self.mac1, dstMAC: Self.mac2, src: Self.ip1, dst: Self.ip2, sport: 1, dport: 2, payload: [])[..<38])
        #expect(throws: ChecksumSetupError.truncated("UDP")) { try Self.header(short, flags: UInt16(NETTXF_csum_blank)) }
        arp[12] = 0x08
        _ = arp
    }

    @Test func dataValidatedWithoutCsumBlank() throws {
        let f = Frames.udp(srcMAC: Self.mac1, dstMAC: Self.mac2, src: Self.ip1, dst: Self.ip2, sport: 1, dport: 2, payload: [1])
        let (h, _) = try Self.header(f, flags: UInt16(NETTXF_data_validated))
        #expect(h == VnetHeader(flags: CNET_VNET_F_DATA_VALID, gsoType: 0, headerLength: 0, gsoSize: 0, csumStart: 0, csumOffset: 0))
        let (none, _) = try Self.header(f, flags: 0)
        #expect(none == VnetHeader())
    }

    @Test func ipv6ExtensionHeadersAreWalked() throws {
        // Ethernet + IPv6 (next: hop-by-hop) + 8-byte HBH (next: UDP) + UDP.
        var f = Self.mac2 + Self.mac1 + [0x86, 0xDD]
        f += [0x60, 0, 0, 0, 0, 16, 0, 64] + Array(repeating: 1, count: 16) + Array(repeating: 2, count: 16)
        f += [17, 0, 0, 0, 0, 0, 0, 0]
        f += [0, 1, 0, 2, 0, 8, 0, 0]
        let loc = try f.withUnsafeBytes { p in
            Result { () throws(ChecksumSetupError) -> ChecksumLocation in try PacketParser.checksumLocation(p) }
        }.get()
        #expect(loc.l4Offset == 14 + 40 + 8 && loc.checksumOffset == 6 && loc.l4Protocol == 17 && loc.isIPv6)
        #expect(loc.headerLength == 14 + 40 + 16)
    }
}

@Suite struct RateLimiterTests {
    @Test func creditRefillsPerWindow() {
        let t0: UInt64 = 1_000_000_000
        var r = RateLimiter(RateLimit(bytesPerInterval: 10_000, intervalMicroseconds: 100_000), now: t0)
        do { let ok = r.admit(6000, now: t0); #expect(ok) }
        do { let ok = r.admit(4000, now: t0); #expect(ok) }
        do { let ok = r.admit(1, now: t0 + 50_000_000); #expect(!ok) }  // window not over
        #expect(r.nextCredit == t0 + 100_000_000)
        do { let ok = r.admit(1, now: t0 + 100_000_000); #expect(ok) }  // new window, fresh credit
    }

    /// xen_net_rate_changed: a queue held for credit gets the new window's
    /// credit now; one that is not is cut to the new window; nil lifts it.
    @Test func aChangedRateAppliesAsLinuxDoes() {
        let t0: UInt64 = 1_000_000_000
        var held = RateLimiter(RateLimit(bytesPerInterval: 1000, intervalMicroseconds: 10_000_000), now: t0)
        do { let ok = held.admit(900, now: t0); #expect(ok) }
        do { let ok = held.admit(900, now: t0 + 1); #expect(!ok && held.limited) }
        held.change(to: RateLimit(bytesPerInterval: 5000, intervalMicroseconds: 10_000_000), now: t0 + 2)
        do { let ok = held.admit(900, now: t0 + 2); #expect(ok) }  // not 10 s later
        #expect(held.nextCredit == t0 + 2 + 10_000_000_000)

        var running = RateLimiter(nil, now: t0)
        running.change(to: RateLimit(bytesPerInterval: 1000, intervalMicroseconds: 10_000_000), now: t0)
        do { let ok = running.admit(1000, now: t0); #expect(ok) }
        do { let ok = running.admit(1, now: t0); #expect(!ok) }  // cut to the new window's bytes
        running.change(to: nil, now: t0)
        do { let ok = running.admit(Int(UInt32.max), now: t0); #expect(ok) }
    }

    @Test func aJumboPacketAlwaysFitsEventually() {
        var r = RateLimiter(RateLimit(bytesPerInterval: 1000, intervalMicroseconds: 1000), now: 0)
        var now: UInt64 = 0
        var tries = 0
        while !r.admit(65535, now: now) { now += 1_000_000; tries += 1 }
        #expect(tries > 0 && tries < 100)  // credit accumulates up to the 128 KiB burst
    }

    @Test func unlimitedAndXenstoreValues() {
        var r = RateLimiter(nil)
        let ok = r.admit(Int(UInt32.max))
        #expect(ok)
        #expect(RateLimit(xenstoreValue: "1250000,20000") == RateLimit(bytesPerInterval: 1_250_000, intervalMicroseconds: 20000))
        #expect(RateLimit(xenstoreValue: "10Mb/s") == nil)
        #expect(RateLimit(xenstoreValue: "0,100") == nil)
    }

    /// Whatever `rate` the toolstack wrote, the limiter does arithmetic, not a
    /// trap (Linux: msecs_to_jiffies saturates a huge interval). Run in a
    /// child process: a trap would otherwise take the whole test run down.
    @Test func hugeIntervalsSaturate() async {
        await #expect(processExitsWith: .success) {
            for value in ["1,18446744073709552", "1,18446744073709551615", "18446744073709551615,18446744073709551615"] {
                var l = RateLimiter(RateLimit(xenstoreValue: value)!, now: 0)
                _ = l.admit(60, now: 1)
                _ = l.admit(65535, now: 2)
                _ = l.nextCredit
            }
            // A window that starts late on the clock.
            var late = RateLimiter(RateLimit(bytesPerInterval: 1, intervalMicroseconds: 1_000_000), now: UInt64.max - 10)
            _ = late.admit(60, now: UInt64.max - 5)
            _ = late.nextCredit
        }
        // And what it computes: the window saturates, it never wraps into the past.
        var l = RateLimiter(RateLimit(xenstoreValue: "1,18446744073709552")!, now: 0)
        do { let ok = l.admit(60, now: 1); #expect(!ok) }
        #expect(l.nextCredit == .max)
        do { let ok = l.admit(1, now: 2); #expect(ok) }  // within the window's credit
    }
}
