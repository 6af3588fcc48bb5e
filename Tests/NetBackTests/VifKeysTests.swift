import NetBack
import Testing

/// The xenstore keys the handshake will hand over, read as netback reads them.
@Suite struct VifKeysTests {
    @Test func singleQueueSharedChannel() throws {
        let keys = ["tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel": "12", "request-rx-copy": "1",
                    "feature-rx-notify": "1", "feature-sg": "1", "feature-gso-tcpv4": "1"]
        let c = try VifKeys.connection(maxQueues: 4) { keys[$0] }
        #expect(c.queues == [VifQueueRings(txRingRef: 8, rxRingRef: 9, events: .shared(12))])
        #expect(c.features == FrontendFeatures(rxNotify: true, sg: true, gsoTCPv4: true))
    }

    @Test func multiQueueSplitChannels() throws {
        var keys = ["multi-queue-num-queues": "2", "request-rx-copy": "1", "feature-ipv6-csum-offload": "1"]
        for q in 0..<2 {
            keys["queue-\(q)/tx-ring-ref"] = "\(10 + q)"
            keys["queue-\(q)/rx-ring-ref"] = "\(20 + q)"
            keys["queue-\(q)/event-channel-tx"] = "\(30 + q)"
            keys["queue-\(q)/event-channel-rx"] = "\(40 + q)"
        }
        let c = try VifKeys.connection(maxQueues: 2) { keys[$0] }
        #expect(c.queues.count == 2)
        #expect(c.queues[1] == VifQueueRings(txRingRef: 11, rxRingRef: 21, events: .split(tx: 31, rx: 41)))
        #expect(c.features.ipv6ChecksumOffload && !c.features.sg && !c.features.rxNotify)
    }

    @Test func refusals() {
        let base = ["tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel": "12", "request-rx-copy": "1"]
        func conn(_ extra: [String: String?], max: Int = 1) throws(VifKeys.KeyError) -> VifConnection {
            var k = base
            for (key, v) in extra { k[key] = v }
            return try VifKeys.connection(maxQueues: max) { k[$0] }
        }
        #expect(throws: VifKeys.KeyError.self) { try conn(["multi-queue-num-queues": "3"], max: 2) }
        #expect(throws: VifKeys.KeyError.self) { try conn(["multi-queue-num-queues": "0"]) }
        #expect(throws: VifKeys.KeyError.self) { try conn(["request-rx-copy": "0"]) }
        #expect(throws: VifKeys.KeyError.self) { try conn(["tx-ring-ref": nil]) }
        #expect(throws: VifKeys.KeyError.self) { try conn(["rx-ring-ref": "x"]) }
        #expect(throws: VifKeys.KeyError.self) { try conn(["event-channel": nil]) }
    }

    @Test func backendKeys() throws {
        let keys = ["mac": "00:16:3e:01:02:03", "mtu": "9000", "rate": "1250000,20000"]
        let c = try VifKeys.config(frontendDomid: 3, devid: 1, maxQueues: 2) { keys[$0] }
        #expect(c.mac == MACAddress([0, 0x16, 0x3e, 1, 2, 3]) && c.mtu == 9000)
        #expect(c.rate == RateLimit(bytesPerInterval: 1_250_000, intervalMicroseconds: 20000))
        #expect(throws: VifKeys.KeyError.self) { try VifKeys.config(frontendDomid: 3, devid: 1, maxQueues: 1) { $0 == "mac" ? "zz" : nil } }
        let unlimited = try VifKeys.config(frontendDomid: 3, devid: 1, maxQueues: 1) { $0 == "rate" ? "bogus" : nil }
        #expect(unlimited.rate == nil && unlimited.mtu == 1500 && unlimited.tapName == nil)
        // libxl's vifname names the tap; one the kernel would refuse or number itself is an error.
        #expect(try VifKeys.config(frontendDomid: 3, devid: 1, maxQueues: 1) { $0 == "vifname" ? "web0" : nil }.tapName == "web0")
        for bad in ["this-is-too-long0", "a/b", "a:1", "vif%d", "a b", ".."] {
            #expect(throws: VifKeys.KeyError.self, "\(bad)") { try VifKeys.config(frontendDomid: 3, devid: 1, maxQueues: 1) { $0 == "vifname" ? bad : nil } }
        }
        #expect(Vif.backendFeatures(maxQueues: 4).contains { $0 == ("multi-queue-max-queues", "4") })
    }

    /// Linux connect_data_rings: split channels first, `event-channel` only
    /// when they are not both there; a pair naming one port is that port.
    @Test func splitChannelsComeFirst() throws {
        var keys = ["tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel": "5", "event-channel-tx": "6",
                    "event-channel-rx": "7", "request-rx-copy": "1"]
        #expect(try VifKeys.connection(maxQueues: 1) { keys[$0] }.queues[0].events == .split(tx: 6, rx: 7))
        keys["event-channel-rx"] = "6"
        #expect(try VifKeys.connection(maxQueues: 1) { keys[$0] }.queues[0].events == .shared(6))
        keys["event-channel-rx"] = nil
        #expect(try VifKeys.connection(maxQueues: 1) { keys[$0] }.queues[0].events == .shared(5))
        keys["event-channel"] = nil
        #expect(throws: VifKeys.KeyError.self) { try VifKeys.connection(maxQueues: 1) { keys[$0] } }
    }

    /// A refused `rate` (not BYTES,USEC, a number past UInt64, a zero) is
    /// unlimited traffic and one warning; a huge interval that parses is kept.
    @Test func refusedRatesAreLoggedOnce() throws {
        for (value, refused) in [("bogus", true), ("1,99999999999999999999", true), ("0,100", true), ("100,0", true),
                                 ("1,18446744073709552", false), ("1250000,20000", false)] {
            var warnings: [String] = []
            let c = try VifKeys.config(frontendDomid: 3, devid: 1, maxQueues: 1, warn: { warnings.append($0) }) {
                $0 == "rate" ? value : nil
            }
            #expect((c.rate == nil) == refused, "\(value)")
            #expect(warnings.count == (refused ? 1 : 0), "\(value): \(warnings)")
        }
        var none: [String] = []
        _ = try VifKeys.config(frontendDomid: 3, devid: 1, maxQueues: 1, warn: { none.append($0) }) { _ in nil }
        #expect(none.isEmpty)
    }
}
