import Foundation
import Glibc
import NetBack
import NetFrontKit
import Testing
import XenBus
import XenTestKit

extension Hostile {
    /// The toolstack changes a running vif's `rate` (Linux netback's credit
    /// watch, xen_net_rate_changed): it applies at once, a queue held for
    /// credit is let go at once when the limit is lifted, and a value that
    /// does not parse means unlimited. Needs root (taps, a bridge).
    @Suite struct NetRateChangeTests {
        @Test func aRateChangedWhileConnectedAppliesAtOnce() throws {
            let d = try HostileDom0()
            let net = try HostileNetback(d)
            defer { net.stop() }
            let g = try d.guest("rated", pages: XenBusVif.pages(slots: 1))
            let v = try XenBusVif(d, net, guest: g)
            let vif = try #require(net.vif(v.dev))
            #expect(vif.rate == nil)

            // 1000 bytes per 10 s, written while connected.
            try d.s.xenstore.write(v.dev.backendPath + "/rate", "1000,10000000")
            net.service.settle()
            #expect(vif.rate == RateLimit(bytesPerInterval: 1000, intervalMicroseconds: 10_000_000))
            for i in 0..<6 { #expect(try v.queue.send(testFrame(0x7100 + i, length: 600))) }
            try v.queue.pushTx()
            // One frame fits the credit; the rest wait for the next window, 10 s away.
            let early = try v.queue.txResponses(6, timeout: 500).count
            #expect(early == 1)
            #expect(vif.stats.snapshot.txRateLimited > 0)

            // The limit lifted: the held frames go now, not when the window ends.
            try d.s.xenstore.rm(v.dev.backendPath + "/rate")
            net.service.settle()
            #expect(vif.rate == nil)
            let start = RateLimiter.now()
            #expect(try v.queue.txResponses(6 - early, timeout: 5000).count == 6 - early)
            #expect(RateLimiter.now() - start < 5_000_000_000)

            // Unparseable: unlimited, as at probe.
            try d.s.xenstore.write(v.dev.backendPath + "/rate", "1000,1")
            net.service.settle()
            #expect(vif.rate != nil)
            try d.s.xenstore.write(v.dev.backendPath + "/rate", "10Mb/s")
            net.service.settle()
            #expect(vif.rate == nil)
            #expect(try vifCarriesFrames(v.queue, tap: v.tapName))
        }
    }
}
