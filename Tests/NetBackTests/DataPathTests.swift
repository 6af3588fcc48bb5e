import CNetShim
import CXen
import Foundation
import Glibc
import NetBack
import NetFrontKit
import Testing
import XenHV

/// guest (this process) <-> rings <-> netback <-> vif tap <-> bridge <-> veth
/// <-> peer namespace, where real sockets and `ping` run.
/// Needs root: creates a bridge, veth pair, namespace and taps, all removed in defers.
@Suite(.serialized) struct DataPathTests {
    static func pattern(_ n: Int, seed: UInt8 = 0) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) } }

    /// Guest -> peer UDP, then peer -> guest UDP, payloads compared byte for byte.
    func udpBothWays(mtu: UInt32, features: FrontendFeatures, size: Int, split: Bool = false, csumBlank: Bool = false,
                     fragmentSize: Int = 4096) throws {
        let f = try HypervisorFixture()
        let net = try PeerNetwork(mtu: mtu)
        defer { net.tearDown() }
        let g = try GuestVif(fixture: f, network: net, split: split, features: features, mtu: mtu)
        defer { g.close() }
        let sock = try net.socket(type: Int32(SOCK_DGRAM.rawValue), port: 5000)
        defer { close(sock) }

        let out = Self.pattern(size, seed: 3)
        let frame = Frames.udp(srcMAC: g.mac, dstMAC: net.peerMAC, src: g.ip, dst: net.peerIP, sport: 6000, dport: 5000,
                               payload: out, checksumBlank: csumBlank)
        #expect(try g.queue.send(frame, flags: csumBlank ? UInt16(NETTXF_csum_blank) : 0, fragmentSize: fragmentSize))
        try g.queue.pushTx()
        let slots = (frame.count + fragmentSize - 1) / fragmentSize
        let rsp = try g.queue.txResponses(slots)
        #expect(rsp.count == slots && rsp.allSatisfy { $0.status == Int16(NETIF_RSP_OKAY) })
        // The peer's socket only delivers a datagram whose checksum is right.
        #expect(receiveDatagram(sock) == out)

        let back = Self.pattern(size, seed: 9)
        #expect(sendDatagram(sock, to: g.ip, port: 6000, back) == size)
        var got: Frames.Parsed?
        var received: ReceivedFrame?
        for _ in 0..<20 {
            guard let r = try g.queue.receive(timeout: 5000) else { break }
            if let p = Frames.parse(r.bytes), p.proto == 17, p.dport == 6000 { got = p; received = r; break }
        }
        let p = try #require(got)
        #expect(p.udpPayload == back)
        #expect(p.dstMAC == g.mac && p.src == net.peerIP)
        if let r = received, r.flags & UInt16(NETRXF_csum_blank) == 0 { #expect(p.l4ChecksumOK) }
        #expect(received!.slots == (p.udpPayload.count + 42 + 4095) / 4096)
        let s = g.vif.stats.snapshot
        #expect(s.txPackets >= 1 && s.rxPackets >= 1 && s.txDrops == 0 && s.txErrors == 0)
        #expect(s.txBytes >= UInt64(frame.count))
    }

    @Test func udpMTU1500() throws { try udpBothWays(mtu: 1500, features: .all, size: 1400) }
    @Test func udpMTU1500WithoutOffloads() throws { try udpBothWays(mtu: 1500, features: FrontendFeatures(), size: 1000) }
    @Test func udpMTU9000WithSG() throws { try udpBothWays(mtu: 9000, features: .all, size: 8900) }
    @Test func udpChecksumBlankIsCompletedByTheKernel() throws {
        try udpBothWays(mtu: 9000, features: .all, size: 6000, csumBlank: true)
    }
    /// Fragments are read in place for the tap write, but here the first slot
    /// (16 bytes) cuts the IP header: netback copies the whole frame to find
    /// the checksum, and the peer's socket still gets it intact.
    @Test func udpHeadersSplitAcrossSlots() throws {
        try udpBothWays(mtu: 1500, features: .all, size: 200, csumBlank: true, fragmentSize: 16)
    }
    /// Jumbo frames without GSO, read straight into the posted buffers once a
    /// first one (copied) has shown that frames are large: their data moves
    /// down past the slot a GSO extra would have taken, and every datagram
    /// arrives whole, in three slots.
    @Test func jumboFramesAreReadInPlace() throws {
        let f = try HypervisorFixture()
        let net = try PeerNetwork(mtu: 9000)
        defer { net.tearDown() }
        let g = try GuestVif(fixture: f, network: net, features: .all, mtu: 9000)
        defer { g.close() }
        let sock = try net.socket(type: Int32(SOCK_DGRAM.rawValue), port: 5000)
        defer { close(sock) }
        for k in 0..<4 {
            let back = Self.pattern(8900, seed: UInt8(20 + k))
            #expect(sendDatagram(sock, to: g.ip, port: 6000, back) == back.count)
            var got: (Frames.Parsed, ReceivedFrame)?
            for _ in 0..<20 {
                guard let r = try g.queue.receive(timeout: 5000) else { break }
                if let p = Frames.parse(r.bytes), p.proto == 17, p.dport == 6000 { got = (p, r); break }
            }
            let (p, r) = try #require(got, "datagram \(k)")
            let intact = p.udpPayload == back
            #expect(intact, "datagram \(k): payload differs")
            #expect(r.slots == 3 && r.flags & UInt16(NETRXF_extra_info) == 0, "datagram \(k): \(r.slots) slots")
        }
        let s = g.vif.stats.snapshot
        #expect(s.rxInPlace > 0 && s.rxDrops == 0, "\(s.rxInPlace) frames read in place; \(s)")
    }

    @Test func udpWithoutRxNotify() throws {
        try udpBothWays(mtu: 1500, features: FrontendFeatures(rxNotify: false, sg: true), size: 900)
    }
    @Test func udpSplitEventChannels() throws { try udpBothWays(mtu: 1500, features: .all, size: 512, split: true) }

    @Test func pingBothWays() throws {
        let f = try HypervisorFixture()
        let net = try PeerNetwork()
        defer { net.tearDown() }
        let g = try GuestVif(fixture: f, network: net)
        defer { g.close() }

        // Guest pings the peer: the peer's kernel answers.
        let payload = Self.pattern(56)
        for seq: UInt16 in 1...3 {
            let req = Frames.icmpEcho(srcMAC: g.mac, dstMAC: net.peerMAC, src: g.ip, dst: net.peerIP, reply: false,
                                      id: 0x4242, seq: seq, payload: payload)
            try g.queue.send(req)
            try g.queue.pushTx()
            var replied = false
            while !replied, let r = try g.queue.receive(timeout: 5000) {
                guard let p = Frames.parse(r.bytes), p.proto == 1, p.l4[0] == 0 else { continue }
                #expect(p.l4ChecksumOK && Array(p.l4[8...]) == payload)
                #expect(UInt16(p.l4[6]) << 8 | UInt16(p.l4[7]) == seq)
                replied = true
            }
            #expect(replied, "no echo reply for seq \(seq)")
        }

        // The peer runs the real ping; the guest answers each echo request.
        let ping = Process()
        ping.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        ping.arguments = ["netns", "exec", net.namespace, "ping", "-c", "3", "-i", "0.2", "-W", "5", net.guestAddress.replacingOccurrences(of: ".1", with: ".1")]
        ping.arguments![ping.arguments!.count - 1] = g.ip.map(String.init).joined(separator: ".")
        ping.standardOutput = FileHandle.nullDevice
        try ping.run()
        var answered = 0
        while ping.isRunning {
            guard let r = try g.queue.receive(timeout: 200) else { continue }
            guard let p = Frames.parse(r.bytes), p.proto == 1, p.l4[0] == 8, p.dst == g.ip else { continue }
            let reply = Frames.icmpEcho(srcMAC: g.mac, dstMAC: p.srcMAC, src: g.ip, dst: p.src, reply: true,
                                        id: UInt16(p.l4[4]) << 8 | UInt16(p.l4[5]), seq: UInt16(p.l4[6]) << 8 | UInt16(p.l4[7]),
                                        payload: Array(p.l4[8...]))
            try g.queue.send(reply)
            try g.queue.pushTx()
            _ = try g.queue.reapTx()
            answered += 1
        }
        ping.waitUntilExit()
        #expect(ping.terminationStatus == 0)
        #expect(answered >= 3)
    }

    /// TCP from the guest's mini stack to a real socket in the peer namespace,
    /// and back, with the data checked; GSO super-packets when `gso`.
    func tcpBothWays(mtu: UInt32, gso: Bool) throws {
        let f = try HypervisorFixture()
        let net = try PeerNetwork(mtu: mtu)
        defer { net.tearDown() }
        let features = gso ? FrontendFeatures.all : FrontendFeatures(sg: true)
        let g = try GuestVif(fixture: f, network: net, features: features, mtu: mtu)
        defer { g.close() }
        let listener = try net.socket(type: Int32(SOCK_STREAM.rawValue), port: 7000)
        defer { close(listener) }
        #expect(listen(listener, 4) == 0)
        let tcp = MiniTCP(queue: g.queue, mac: g.mac, peerMAC: net.peerMAC, ip: g.ip, peerIP: net.peerIP, port: 40000, peerPort: 7000)
        try tcp.connect()
        let conn = accept(listener, nil, nil)
        #expect(conn >= 0)
        defer { close(conn) }

        let up = Self.pattern(300_000, seed: 5)
        // The peer reads on its own thread while the guest sends.
        final class Sink: @unchecked Sendable { var data: [UInt8] = [] }
        let sink = Sink()
        let done = DispatchSemaphore(value: 0)
        let reader = Thread {
            defer { done.signal() }
            var buf = [UInt8](repeating: 0, count: 65536)
            while sink.data.count < up.count {
                var pfd = pollfd(fd: conn, events: Int16(POLLIN), revents: 0)
                guard poll(&pfd, 1, 10000) > 0 else { break }
                let n = recv(conn, &buf, buf.count, 0)
                if n <= 0 { break }
                sink.data += buf[..<n]
            }
        }
        reader.start()
        try tcp.send(up, gso: gso)
        #expect(done.wait(timeout: .now() + 15) == .success)
        #expect(sink.data.count == up.count)
        #expect(sink.data == up)

        let down = Self.pattern(200_000, seed: 11)
        let sent = down.withUnsafeBytes { p -> Int in
            var at = 0
            while at < p.count {
                let n = Glibc.send(conn, p.baseAddress! + at, min(65536, p.count - at), Int32(MSG_DONTWAIT))
                if n > 0 { at += n; continue }
                guard errno == EAGAIN else { return at }
                try? tcp.pollIncoming(timeout: 20)
            }
            return at
        }
        #expect(sent == down.count)
        #expect(try tcp.receive(count: down.count) == down)
        // With GSO negotiated the peer's TSO segments reach the guest whole,
        // over several slots with a GSO extra; without it, never.
        if gso { #expect(tcp.gsoFramesReceived > 0 && tcp.multiSlotFramesReceived > 0) } else { #expect(tcp.gsoFramesReceived == 0) }
        let s = g.vif.stats.snapshot
        #expect(s.txDrops == 0 && s.rxDrops == 0, "\(s)")
        // Multi-slot packets go between tap and guest pages without our copy:
        // fragments written from them, large frames read into them. (Without
        // GSO MiniTCP's MSS keeps every packet to one slot.)
        if gso {
            #expect(s.txInPlace > 0 && s.rxInPlace > 0, "\(s.txInPlace) packets sent, \(s.rxInPlace) frames received in place")
        } else {
            #expect(s.txInPlace == 0 && s.rxInPlace == 0, "single-slot packets are copied")
        }
    }

    @Test func tcpMTU1500NoGSO() throws { try tcpBothWays(mtu: 1500, gso: false) }
    @Test func tcpMTU1500GSO() throws { try tcpBothWays(mtu: 1500, gso: true) }
    @Test func tcpMTU9000NoGSO() throws { try tcpBothWays(mtu: 9000, gso: false) }
    @Test func tcpMTU9000GSO() throws { try tcpBothWays(mtu: 9000, gso: true) }

    /// IPv6 UDP both ways; the guest's datagram leaves with csum_blank
    /// (feature-ipv6-csum-offload) and the kernel completes the checksum.
    /// fd00:0:<subnet>::2 on the peer's veth (no DAD), and the guest's
    /// fd00:0:<subnet>::1 as its neighbour at `guestMAC`.
    static func ipv6(_ net: PeerNetwork, guestMAC: [UInt8]) throws -> (peer: [UInt8], guest: [UInt8]) {
        let sub = UInt8(net.subnet)
        let peer6: [UInt8] = [0xfd, 0, 0, 0, 0, sub, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]
        let guest6: [UInt8] = [0xfd, 0, 0, 0, 0, sub, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
        func text(_ a: [UInt8]) -> String {
            stride(from: 0, to: 16, by: 2).map { String(UInt16(a[$0]) << 8 | UInt16(a[$0 + 1]), radix: 16) }.joined(separator: ":")
        }
        try ip("-n", net.namespace, "addr", "add", "\(text(peer6))/64", "dev", net.vethPeer, "nodad")
        try ip("-n", net.namespace, "neigh", "replace", text(guest6), "lladdr", MACAddress(guestMAC).description, "dev", net.vethPeer)
        return (peer6, guest6)
    }

    @Test func udpOverIPv6WithChecksumOffload() throws {
        let f = try HypervisorFixture()
        let net = try PeerNetwork()
        defer { net.tearDown() }
        let g = try GuestVif(fixture: f, network: net)
        defer { g.close() }
        let (peer6, guest6) = try Self.ipv6(net, guestMAC: g.mac)
        let sock = try net.socket(type: Int32(SOCK_DGRAM.rawValue), port: 5000, ipv6: true)
        defer { close(sock) }
        let out = Self.pattern(1200, seed: 6)
        let frame = Frames.udp6(srcMAC: g.mac, dstMAC: net.peerMAC, src: guest6, dst: peer6, sport: 6000, dport: 5000,
                                payload: out, checksumBlank: true)
        try g.queue.send(frame, flags: UInt16(NETTXF_csum_blank))
        try g.queue.pushTx()
        #expect(try g.queue.txResponses(1).first?.status == Int16(NETIF_RSP_OKAY))
        #expect(receiveDatagram(sock) == out)

        let back = Self.pattern(700, seed: 2)
        #expect(sendDatagram6(sock, to: guest6, port: 6000, back) == back.count)
        var got = false
        for _ in 0..<20 where !got {
            guard let r = try g.queue.receive(timeout: 3000) else { break }
            // Ethernet + IPv6 (next header UDP) + UDP to our port.
            if r.bytes.count >= 62, r.bytes[12] == 0x86, r.bytes[13] == 0xDD, r.bytes[20] == 17,
               UInt16(r.bytes[56]) << 8 | UInt16(r.bytes[57]) == 6000 {
                got = Array(r.bytes[62...]) == back
            }
        }
        #expect(got)
    }

    /// A frontend that did not write feature-ipv6-csum-offload gets IPv6
    /// frames fully checksummed, never csum_blank (Linux xenvif_fix_features
    /// clears NETIF_F_IPV6_CSUM, and the stack completes the checksum).
    @Test func ipv6ChecksumsAreCompletedForAFrontendWithoutIPv6Offload() throws {
        let f = try HypervisorFixture()
        let net = try PeerNetwork()
        defer { net.tearDown() }
        let g = try GuestVif(fixture: f, network: net, features: FrontendFeatures(sg: true))
        defer { g.close() }
        let (_, guest6) = try Self.ipv6(net, guestMAC: g.mac)
        let sock = try net.socket(type: Int32(SOCK_DGRAM.rawValue), port: 5000, ipv6: true)
        defer { close(sock) }
        let back = Self.pattern(700, seed: 3)
        #expect(sendDatagram6(sock, to: guest6, port: 6000, back) == back.count)
        var frame: ReceivedFrame?
        for _ in 0..<20 where frame == nil {
            guard let r = try g.queue.receive(timeout: 3000) else { break }
            if r.bytes.count >= 62, r.bytes[12] == 0x86, r.bytes[13] == 0xDD, r.bytes[20] == 17,
               UInt16(r.bytes[56]) << 8 | UInt16(r.bytes[57]) == 6000, Array(r.bytes[62...]) == back {
                frame = r
            }
        }
        let r = try #require(frame)
        #expect(r.flags & UInt16(NETRXF_csum_blank) == 0, "flags \(r.flags)")
        // The UDP checksum over the IPv6 pseudo-header (addresses, length, next header) and the datagram.
        let udp = Array(r.bytes[54...])
        var pseudo: UInt32 = UInt32(udp.count) + 17
        for i in stride(from: 22, to: 54, by: 2) { pseudo += UInt32(r.bytes[i]) << 8 | UInt32(r.bytes[i + 1]) }
        #expect(udp.withUnsafeBytes { PacketParser.internetChecksum($0, initial: pseudo) } == 0, "UDP checksum not complete")
    }

    /// TSO6 goes with IPv6 checksum offload (Linux: netdev_fix_features drops
    /// TSO6 without NETIF_F_IPV6_CSUM).
    @Test func tapOffloadsFollowTheFrontendsFeatures() {
        #expect(Vif.tapOffloads(.all) == (true, true, true))
        #expect(Vif.tapOffloads(FrontendFeatures(sg: true, gsoTCPv4: true, gsoTCPv6: true)) == (true, true, false))
        #expect(Vif.tapOffloads(FrontendFeatures(gsoTCPv4: true, gsoTCPv6: true, ipv6ChecksumOffload: true)) == (true, false, false))
        #expect(Vif.tapOffloads(FrontendFeatures(noChecksumOffload: true)) == (false, false, false))
    }
}
