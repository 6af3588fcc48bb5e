import CXen
import Foundation
import Glibc
import NetBack
import NetFrontKit
import Testing
import XenHV
import XenTestKit

/// Receive backlog bounds, stalled-guest carrier, multi-queue and rate
/// limiting on a real vif. Needs root: bridge, veth, namespace and taps,
/// removed in defers.
@Suite(.serialized) struct QueueTests {

    @Test func backlogIsBoundedAndAStalledGuestLosesCarrier() throws {
        let f = try HypervisorFixture()
        let net = try PeerNetwork()
        defer { net.tearDown() }
        // No rx buffers posted; a backlog of 8 frames; stalled after 300 ms.
        let g = try GuestVif(fixture: f, network: net, rxQueueLimit: 8, stallTimeoutMs: 300, postRx: false)
        defer { g.close() }
        let sock = try net.socket(type: Int32(SOCK_DGRAM.rawValue), port: 5000)
        defer { close(sock) }
        for i in 0..<40 { _ = sendDatagram(sock, to: g.ip, port: 6000, [UInt8(i)] + Array(repeating: 0, count: 100)) }
        // The carrier goes off once the guest has posted nothing for the stall timeout.
        #expect(try eventually { try !net.netlink.link(g.vif.name).carrier })
        let s = g.vif.stats.snapshot
        #expect(s.rxPackets == 0)
        // The backlog dropped at the stall never held more than its bound.
        #expect(s[.rxStalledFlush] >= 1 && s[.rxStalledFlush] <= 8)
        // Posting buffers brings the carrier back and traffic flows again.
        try g.queue.postRx()
        #expect(try eventually { try net.netlink.link(g.vif.name).carrier })
        let payload = Array("after the stall".utf8)
        var got = false
        for _ in 0..<20 where !got {
            _ = sendDatagram(sock, to: g.ip, port: 6000, payload)
            while let r = try g.queue.receive(timeout: 300) {
                if let p = Frames.parse(r.bytes), p.proto == 17, p.udpPayload == payload { got = true; break }
            }
        }
        #expect(got)
    }

    /// A vif has carrier only while a frontend is connected (Linux's
    /// xenvif_alloc, xenvif_disconnect_data), and the frames it held when the
    /// frontend left are dropped, not handed to the next one.
    @Test func carrierOnlyWhileConnectedAndNoFramesFromBefore() throws {
        let f = try HypervisorFixture()
        let net = try PeerNetwork()
        defer { net.tearDown() }
        let (domid, guest) = try f.guest(pages: NetFront.pagesNeeded(queues: 2), name: uniqueName("netfront"))
        var cfg = VifConfig(frontendDomid: domid, devid: 0, tapName: uniqueName("nbv"))
        cfg.rxQueueLimit = 4
        let vif = try Vif(hypervisor: f.dom0, config: cfg)
        defer { vif.close() }
        try net.plug(vif)
        #expect(try !net.netlink.link(vif.name).carrier)
        // A frontend that posts no buffers: what is sent to it waits, in the
        // vif's backlog (4 frames) and in the tap.
        let first = try NetFront(guest: guest)
        try vif.connect(first.connection(features: .all))
        #expect(try net.netlink.link(vif.name).carrier)
        let s = try tapSender(vif.name)
        defer { close(s) }
        func frame(_ tag: UInt8) -> [UInt8] {
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x16, 0x3e, 0x77, 0x77, 0x77, 0x88, 0xB5] + [UInt8](repeating: tag, count: 100)
        }
        for _ in 0..<40 { #expect(frame(1).withUnsafeBytes { send(s, $0.baseAddress, $0.count, 0) } == 114) }
        vif.disconnect()
        #expect(try !net.netlink.link(vif.name).carrier)
        // The next frontend gets only what is sent after it connected.
        let second = try NetFront(guest: guest, firstPage: NetFront.pagesPerQueue, firstRef: 16 + GrantRef(NetFront.pagesPerQueue))
        let q = second.queues[0]
        try q.postRx()
        try vif.connect(second.connection(features: .all))
        #expect(try net.netlink.link(vif.name).carrier)
        #expect(frame(2).withUnsafeBytes { send(s, $0.baseAddress, $0.count, 0) } == 114)
        var tags: [UInt8] = []
        while !tags.contains(2), let r = try q.receive(timeout: 2000) {
            if r.bytes.count == 114, r.bytes[12] == 0x88, r.bytes[13] == 0xB5 { tags.append(r.bytes[14]) }
        }
        #expect(tags == [2], "frames from before the reconnect: \(tags.filter { $0 == 1 }.count)")
    }

    /// The backlog is bounded in bytes too (Linux's XENVIF_RX_QUEUE_BYTES):
    /// large frames fill it long before its frame limit.
    @Test func backlogOfLargeFramesIsBoundedInBytes() throws {
        let f = try HypervisorFixture()
        let net = try PeerNetwork()
        defer { net.tearDown() }
        let g = try GuestVif(fixture: f, network: net, rxQueueLimit: 64, stallTimeoutMs: 300, postRx: false)
        defer { g.close() }
        try net.netlink.setMTU(g.vif.name, 65000)
        // Frames sent out through the tap itself, so netback reads them.
        let s = try tapSender(g.vif.name)
        defer { close(s) }
        let size = 60000
        let frame = g.mac + [0x00, 0x16, 0x3e, 0x77, 0x77, 0x77, 0x88, 0xB5] + [UInt8](repeating: 0x42, count: size - 14)
        for _ in 0..<30 { #expect(frame.withUnsafeBytes { send(s, $0.baseAddress, $0.count, 0) } == size) }
        #expect(try eventually { try !net.netlink.link(g.vif.name).carrier })
        let flushed = g.vif.stats.snapshot[.rxStalledFlush]
        // 512 KiB of backlog plus room for one largest read: 9 frames of 60000 bytes, far below 64
        // (the host's own small frames on the new link, IPv6 solicitations, may come on top).
        #expect(flushed >= 1 && flushed <= UInt64(512 * 1024 / size + 4), "backlog held \(flushed) frames")
    }

    /// A guest that receives slowly but steadily is not stalled: the stall
    /// clock runs from the last frame delivered (Linux's last_rx_time, set per
    /// packet), not from when the backlog began to wait. Here frames wait
    /// for five stall timeouts in all while the guest takes one every 40 ms.
    @Test func aSlowButSteadyReceiverKeepsItsCarrier() throws {
        let f = try HypervisorFixture()
        let net = try PeerNetwork()
        defer { net.tearDown() }
        let g = try GuestVif(fixture: f, network: net, rxQueueLimit: 64, stallTimeoutMs: 200, postRx: false)
        defer { g.close() }
        let s = try tapSender(g.vif.name)
        defer { close(s) }
        let frame = g.mac + [0x00, 0x16, 0x3e, 0x77, 0x77, 0x77, 0x88, 0xB5] + [UInt8](repeating: 0x42, count: 100)
        for _ in 0..<40 { #expect(frame.withUnsafeBytes { send(s, $0.baseAddress, $0.count, 0) } == frame.count) }
        let start = Date()
        var received = 0
        while Date().timeIntervalSince(start) < 1.0 {
            try g.queue.postRx(1)
            guard try g.queue.receive(timeout: 2000) != nil else { break }
            received += 1
            idle(milliseconds: 40)  // the guest's pace, not synchronisation
        }
        #expect(Date().timeIntervalSince(start) >= 1.0, "the guest got no frame after \(received)")
        #expect(received >= 10)
        #expect(g.vif.stats.snapshot[.rxStalledFlush] == 0)
        #expect(try net.netlink.link(g.vif.name).carrier)
    }

    @Test func backlogHoldsFramesUntilBuffersArrive() throws {
        let f = try HypervisorFixture()
        let net = try PeerNetwork()
        defer { net.tearDown() }
        let g = try GuestVif(fixture: f, network: net, rxQueueLimit: 4, postRx: false)
        defer { g.close() }
        let sock = try net.socket(type: Int32(SOCK_DGRAM.rawValue), port: 5000)
        defer { close(sock) }
        for i in 0..<3 { _ = sendDatagram(sock, to: g.ip, port: 6000, [UInt8(i), 0xEE]) }
        // Nothing is delivered without buffers, and nothing is lost while the backlog has room.
        #expect(try g.queue.receive(timeout: 200) == nil)
        try g.queue.postRx(16)
        var seen: [UInt8] = []
        while seen.count < 3, let r = try g.queue.receive(timeout: 3000) {
            if let p = Frames.parse(r.bytes), p.proto == 17, p.udpPayload.count == 2 { seen.append(p.udpPayload[0]) }
        }
        #expect(seen == [0, 1, 2])
        #expect(g.vif.stats.snapshot.rxDrops == 0)
    }

    @Test func multiQueueVifServesEveryQueue() throws {
        let f = try HypervisorFixture()
        let net = try PeerNetwork()
        defer { net.tearDown() }
        let g = try GuestVif(fixture: f, network: net, queues: 2, split: true)
        defer { g.close() }
        #expect(g.vif.tap!.multiQueue)
        let sock = try net.socket(type: Int32(SOCK_DGRAM.rawValue), port: 5000)
        defer { close(sock) }
        for (i, q) in g.front.queues.enumerated() {
            let payload = Array("queue \(i)".utf8)
            try q.send(Frames.udp(srcMAC: g.mac, dstMAC: net.peerMAC, src: g.ip, dst: net.peerIP, sport: 6000 + UInt16(i),
                                  dport: 5000, payload: payload))
            try q.pushTx()
            #expect(try q.txResponses(1).first?.status == Int16(NETIF_RSP_OKAY))
            var got = false
            while !got, let d = receiveDatagram(sock, timeout: 3000) { got = d == payload }
            #expect(got, "queue \(i)")
        }
        // Frames from the peer arrive on whichever queue the kernel picked, all of them.
        for i in 0..<8 { _ = sendDatagram(sock, to: g.ip, port: 7000 + UInt16(i), [UInt8(i)]) }
        var seen = Set<UInt16>()
        let deadline = Date().addingTimeInterval(5)
        while seen.count < 8 && Date() < deadline {
            for q in g.front.queues {
                while let r = try q.receive(timeout: 20) {
                    if let p = Frames.parse(r.bytes), p.proto == 17, p.dport >= 7000 { seen.insert(p.dport) }
                }
            }
        }
        #expect(seen.count == 8)
    }

    @Test func rateLimitHoldsTransmitsToTheCredit() throws {
        let f = try HypervisorFixture()
        let net = try PeerNetwork()
        defer { net.tearDown() }
        // 20 000 bytes per 50 ms.
        let g = try GuestVif(fixture: f, network: net, rate: RateLimit(bytesPerInterval: 20_000, intervalMicroseconds: 50_000))
        defer { g.close() }
        let sock = try net.socket(type: Int32(SOCK_DGRAM.rawValue), port: 5000)
        defer { close(sock) }
        let start = RateLimiter.now()
        var answered = 0
        for i in 0..<100 {
            let frame = Frames.udp(srcMAC: g.mac, dstMAC: net.peerMAC, src: g.ip, dst: net.peerIP, sport: 6000, dport: 5000,
                                   payload: [UInt8(i)] + Array(repeating: 0, count: 957))
            while !(try g.queue.send(frame)) { answered += try g.queue.txResponses(1).count }
            try g.queue.pushTx()
        }
        answered += try g.queue.txResponses(100 - answered, timeout: 10_000).count
        let elapsed = RateLimiter.now() - start
        #expect(answered == 100)
        // 100 kB at 20 kB per 50 ms, credit starting at one window: the window
        // began when the vif was set up, before `start`, so the first refill
        // may come at once (Linux's credit timer does the same); the other
        // three each wait a full window. Unlimited, this takes a few ms.
        #expect(elapsed >= 3 * 50_000_000, "took \(elapsed / 1_000_000) ms")
        #expect(g.vif.stats.snapshot.txRateLimited > 0)
        var got = 0
        while got < 100, receiveDatagram(sock, timeout: 2000) != nil { got += 1 }
        #expect(got == 100)
    }

    @Test func frontendWithoutSGCapsTheMTU() throws {
        let f = try HypervisorFixture()
        let net = try PeerNetwork(mtu: 9000)
        defer { net.tearDown() }
        let plain = try GuestVif(fixture: f, network: net, devid: 0, features: FrontendFeatures(), mtu: 9000, ipLastOctet: 1)
        defer { plain.close() }
        let sg = try GuestVif(fixture: f, network: net, devid: 1, features: .all, mtu: 9000, ipLastOctet: 3)
        defer { sg.close() }
        #expect(try net.netlink.link(plain.vif.name).mtu == 1500)
        #expect(try net.netlink.link(sg.vif.name).mtu == 9000)
    }

    @Test func notificationStormBacksOff() throws {
        let f = try HypervisorFixture()
        let g = try GuestVif(fixture: f, network: nil)
        defer { g.close() }
        // Kicks with nothing on the rings: the worker must stop reacting to each one.
        let deadline = Date().addingTimeInterval(5)
        var kicks = 0
        while g.vif.stats.eventStormBackoffs.load(ordering: .relaxed) == 0 && Date() < deadline {
            for _ in 0..<1000 { try g.queue.txChannel.notify() }
            kicks += 1000
        }
        #expect(g.vif.stats.eventStormBackoffs.load(ordering: .relaxed) > 0, "after \(kicks) kicks")
        // Real work still gets done (the tap must be up to take frames).
        try Netlink().setUp(g.vif.name)
        let frame = Frames.udp(srcMAC: g.mac, dstMAC: [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF], src: g.ip, dst: [10, 0, 0, 9],
                               sport: 1, dport: 2, payload: [1, 2, 3])
        try g.queue.send(frame)
        try g.queue.pushTx()
        #expect(try g.queue.txResponses(1).first?.status == Int16(NETIF_RSP_OKAY))
    }

    @Test func aGuestPostingNoBuffersDoesNotHoldUpAnotherVif() throws {
        let f = try HypervisorFixture()
        let net = try PeerNetwork()
        defer { net.tearDown() }
        let silent = try GuestVif(fixture: f, network: net, devid: 0, ipLastOctet: 1, rxQueueLimit: 4, postRx: false)
        defer { silent.close() }
        let good = try GuestVif(fixture: f, network: net, devid: 1, ipLastOctet: 3)
        defer { good.close() }
        let sock = try net.socket(type: Int32(SOCK_DGRAM.rawValue), port: 5000)
        defer { close(sock) }
        var one: Int32 = 1
        setsockopt(sock, SOL_SOCKET, SO_BROADCAST, &one, 4)
        // Broadcasts reach both taps; the silent guest's backlog fills, the other guest gets every one.
        var got = 0
        for i in 0..<50 {
            _ = sendDatagram(sock, to: [net.peerIP[0], net.peerIP[1], net.peerIP[2], 255], port: 6000, [UInt8(i)])
            while let r = try good.queue.receive(timeout: 2000) {
                if let p = Frames.parse(r.bytes), p.proto == 17, p.udpPayload == [UInt8(i)] { got += 1; break }
            }
        }
        #expect(got == 50)
        #expect(silent.vif.stats.snapshot.rxPackets == 0)
    }

    @Test func rxProducerOverflowIsFatal() throws {
        let f = try HypervisorFixture()
        let g = try GuestVif(fixture: f, network: nil, postRx: false)
        defer { g.close() }
        // The rx ring's req_prod, a ring and more ahead of the responses.
        try g.guest.memory!.region.store(UInt32(300), at: (g.queue.rxPage(0) - 256 - 1) * 4096)
        try g.queue.txChannel.notify()
        #expect(eventually { g.vif.isDisabled })
        #expect(g.vif.disabledReason?.contains("bogus ring requests") == true)
    }

    /// Without feature-rx-notify Linux turns rx stall detection off
    /// (read_xenbus_vif_flags: stall_timeout = 0): such a frontend posts
    /// buffers without a kick, so netback polls for them instead, and the
    /// waiting frames are kept for it, the carrier on.
    @Test func withoutRxNotifyThereIsNoStallTimeout() throws {
        let f = try HypervisorFixture()
        let net = try PeerNetwork()
        defer { net.tearDown() }
        let g = try GuestVif(fixture: f, network: net, features: FrontendFeatures(rxNotify: false, sg: true),
                             stallTimeoutMs: 200, postRx: false)
        defer { g.close() }
        let sock = try net.socket(type: Int32(SOCK_DGRAM.rawValue), port: 5000)
        defer { close(sock) }
        let payload = Array("kept past the stall timeout".utf8)
        #expect(sendDatagram(sock, to: g.ip, port: 6000, payload) == payload.count)
        // Four stall timeouts (the worker looks every 10 ms while frames wait):
        // the carrier stays on and nothing is flushed.
        #expect(try !eventually(seconds: 0.8) { try !net.netlink.link(g.vif.name).carrier })
        #expect(g.vif.stats.snapshot[.rxStalledFlush] == 0)
        // Buffers posted with no notification, as such a frontend does: the frame that waited arrives.
        for _ in 0..<64 {
            let id = UInt16(g.queue.rx.reqProdPvt & 255)
            var r = netif_rx_request()
            r.id = id
            r.gref = g.queue.rxRef(id)
            g.queue.rx.enqueue(r)
        }
        g.queue.rx.pushRequests()
        var got = false
        while !got, let r = try g.queue.receive(timeout: 2000) {
            if let p = Frames.parse(r.bytes), p.proto == 17, p.udpPayload == payload { got = true }
        }
        #expect(got)
    }

    /// A split pair whose tx and rx ports are the same port is one event
    /// channel, bound once (Linux xenvif_connect_data: tx_evtchn == rx_evtchn).
    @Test func splitChannelsWithOnePortBindOnce() throws {
        let f = try HypervisorFixture()
        let (domid, guest) = try f.guest(pages: NetFront.pagesNeeded(queues: 1), name: uniqueName("netfront"))
        let front = try NetFront(guest: guest)
        let q = front.queues[0]
        guard case .shared(let port) = q.rings.events else { Issue.record("one channel expected"); return }
        let vif = try Vif(hypervisor: f.dom0, config: VifConfig(frontendDomid: domid, devid: 0, tapName: uniqueName("nbv")))
        defer { vif.close() }
        try q.postRx()
        var rings = q.rings
        rings.events = .split(tx: port, rx: port)
        try vif.connect(VifConnection(queues: [rings], features: .all))
        try Netlink().setUp(vif.name)
        // Transmit: answered through that port.
        let mac: [UInt8] = [0x00, 0x16, 0x3e, 0x7e, 0x7e, 0x7e]
        try q.send(Frames.udp(srcMAC: mac, dstMAC: [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF], src: [10, 0, 0, 1],
                              dst: [10, 0, 0, 9], sport: 1, dport: 2, payload: [1, 2, 3]))
        try q.pushTx()
        #expect(try q.txResponses(1).first?.status == Int16(NETIF_RSP_OKAY))
        // Receive: a frame sent out through the tap.
        let s = try tapSender(vif.name)
        defer { close(s) }
        let marker: [UInt8] = Array("one port, both ways".utf8)
        let frame = mac + [0x00, 0x16, 0x3e, 0x77, 0x77, 0x77, 0x88, 0xB5] + marker + [UInt8](repeating: 0, count: 40)
        #expect(frame.withUnsafeBytes { send(s, $0.baseAddress, $0.count, 0) } == frame.count)
        var got = false
        while !got, let r = try q.receive(timeout: 3000) { got = r.bytes.count >= 14 + marker.count && Array(r.bytes[14..<14 + marker.count]) == marker }
        #expect(got)
    }
}
