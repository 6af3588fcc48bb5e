import CNetShim
import CXen
import Foundation
import Glibc
import NetBack
import NetFrontKit
import Synchronization
import Testing
import XenHV
import XenRing
import XenTestKit

/// A vif's tap seen from the host: an AF_PACKET socket on it, keeping only
/// frames of the test's own ethertype that netback wrote into the tap.
final class TapCapture {
    static let etherType: UInt16 = 0x88B5  // IEEE local experimental
    let fd: CInt

    init(_ name: String) throws {
        let ethPAll = UInt16(3)  // ETH_P_ALL
        // Protocol 0 until bound (packet(7)): a socket made with ETH_P_ALL
        // takes every interface's frames until bind narrows it to ours, and
        // a bystander guest's frames queued in that window were read as this
        // tap's (a fresh-clone run failed so).
        let s = socket(AF_PACKET, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { throw FrontError("AF_PACKET socket: \(errno)") }
        // struct sockaddr_ll (linux/if_packet.h, not in Glibc's module): family u16,
        // protocol be16, ifindex i32, hatype u16, pkttype u8, halen u8, addr[8].
        var sll = [UInt8](repeating: 0, count: 20)
        sll.withUnsafeMutableBytes { b in
            b.storeBytes(of: UInt16(AF_PACKET), toByteOffset: 0, as: UInt16.self)
            b.storeBytes(of: ethPAll.bigEndian, toByteOffset: 2, as: UInt16.self)
            b.storeBytes(of: Int32(cnet_ifindex(name)), toByteOffset: 4, as: Int32.self)
        }
        let r = sll.withUnsafeBytes { bind(s, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), 20) }
        guard r == 0 else { close(s); throw FrontError("bind to \(name): \(errno)") }
        // Room for every frame of a run, read only at its end (SO_RCVBUFFORCE: root).
        var size: Int32 = 32 << 20
        setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &size, 4)
        fd = s
    }

    /// The next frame of our ethertype, or nil after `ms` without one.
    func next(ms: Int32 = 5000) -> [UInt8]? {
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&pfd, 1, ms) > 0 else { return nil }
            let n = recv(fd, &buf, buf.count, 0)
            guard n >= 0 else { return nil }
            if n < 14 { return Array(buf[..<n]) }  // a runt: report it too
            if UInt16(buf[12]) << 8 | UInt16(buf[13]) == Self.etherType { return Array(buf[..<n]) }
        }
    }

    deinit { close(fd) }
}

/// Frame `i` of `length` bytes: broadcast, our ethertype, then i and a pattern.
func testFrame(_ i: Int, length: Int) -> [UInt8] {
    var f: [UInt8] = Array(repeating: 0xFF, count: 6) + [0x00, 0x16, 0x3E, 0x11, 0x22, 0x33]
    f += [UInt8(TapCapture.etherType >> 8), UInt8(TapCapture.etherType & 0xFF)]
    f += [UInt8(i >> 8 & 0xFF), UInt8(i & 0xFF)]
    while f.count < length { f.append(UInt8(truncatingIfNeeded: f.count &* 7 &+ i)) }
    return f
}

extension Hostile {
    /// XSA-155 on netif tx: the guest rewrites a published request's size between
    /// the real frame length and a runt (which netback must drop with ERROR,
    /// the vif staying up). Every OKAY must put exactly the validated frame on
    /// the tap, every ERROR nothing; another guest's vif keeps carrying frames.
    /// Needs root (taps and an AF_PACKET socket); the taps go with their vifs.
    @Suite struct NetDoubleFetchTests {
        @Test func txSizesRewrittenAfterPublishingActOnlyOnValidatedValues() throws {
            let d = try HostileDom0()
            let dom0 = try d.s.dom0Hypervisor()
            let netlink = try Netlink()
            func vif(_ g: Dom0Harness.Guest, _ tag: String) throws -> (Vif, NetFront) {
                let front = try NetFront(guest: g.hypervisor)
                let v = try Vif(hypervisor: dom0, config: VifConfig(frontendDomid: g.domid, devid: 0,
                                                                     tapName: "hx\(tag)\(getpid() % 100000)"))
                for q in front.queues { try q.postRx() }
                try v.connect(front.connection(features: .all))
                try netlink.setUp(v.name)
                return (v, front)
            }
            let h = try d.guest("txracer", pages: 2048), g = try d.guest("bystander", pages: 2048)
            let (hv, hf) = try vif(h, "r")
            defer { hv.close() }
            let (gv, gf) = try vif(g, "b")
            defer { gv.close() }
            let hcap = try TapCapture(hv.name), gcap = try TapCapture(gv.name)
            let q = hf.queues[0]

            // The racer flips the size field (offset 10 of netif_tx_request; the 4-byte
            // response at the slot's start is never touched) of the armed slot.
            let ring = SlotPointer(base: try hf.guest.memory!.region.slice(offset: q.txPage(0) * 4096 - 2 * 4096, length: 4096).unsafeBaseAddress)
            let armed = Atomic<Int>(-1), quit = Atomic<Bool>(false), acked = Atomic<Int>(-1), started = Atomic<Int>(-1)
            let racer = TestThread {
                var x: UInt64 = 0x1234_5678_9ABC_DEF1
                while !quit.load(ordering: .acquiring) {
                    let a = armed.load(ordering: .acquiring)
                    if a < 0 || acked.load(ordering: .relaxed) == a { continue }
                    let idx = UInt32(a & 0xFFFF), good = UInt16(a >> 16 & 0xFFFF)
                    let size = (ring.base + 64 + Int(idx & 255) * 12 + 10).assumingMemoryBound(to: UInt16.self)
                    let rspProd = (ring.base + 8).assumingMemoryBound(to: UInt32.self)
                    while cxen_load_acquire_u32(rspProd) == idx && !quit.load(ordering: .relaxed) {
                        x ^= x << 13; x ^= x >> 7; x ^= x << 17
                        cxen_store_release_u16(size, x & 3 == 0 ? 10 : good)
                        started.store(a, ordering: .relaxed)
                    }
                    acked.store(a, ordering: .releasing)
                }
            }
            let packets = 300
            var statuses: [Int16] = []
            var lengths: [Int] = []
            for i in 0..<packets {
                let len = 60 + (i * 37) % 1400
                lengths.append(len)
                let id = try #require(q.takeTxID())
                try q.writeTxBuffer(id, offset: 0, testFrame(i, length: len))
                var r = netif_tx_request()
                r.gref = q.txRef(id); r.offset = 0; r.flags = 0; r.id = id; r.size = UInt16(len)
                let idx = q.tx.reqProdPvt
                q.sendRaw([.request(r)])
                let a = Int(idx & 0xFFFF) | len << 16
                armed.store(a, ordering: .releasing)
                // Publish only once the racer is rewriting the slot.
                #expect(eventually(seconds: 10, every: 1) { started.load(ordering: .relaxed) == a })
                try q.pushTxAndKick()
                let resp = try q.txResponses(1)
                #expect(resp.count == 1 && resp.first?.id == id)
                statuses.append(resp.first?.status ?? 99)
                #expect(eventually(seconds: 10, every: 1) { acked.load(ordering: .acquiring) == a })
                if hv.isDisabled { break }
            }
            quit.store(true, ordering: .releasing)
            racer.join()
            #expect(!hv.isDisabled, "vif disabled: \(hv.disabledReason ?? "")")

            // A last, untouched frame marks the end of what the racer's packets put on the tap.
            #expect(try q.send(testFrame(0xFFFF, length: 64)))
            try q.pushTx()
            #expect(try q.txResponses(1).first?.status == Int16(NETIF_RSP_OKAY))
            var captured: [[UInt8]] = []
            while let f = hcap.next(), f != testFrame(0xFFFF, length: 64) { captured.append(f) }
            let expected = (0..<statuses.count).filter { statuses[$0] == Int16(NETIF_RSP_OKAY) }.map { testFrame($0, length: lengths[$0]) }
            let refused = statuses.filter { $0 != Int16(NETIF_RSP_OKAY) }
            #expect(refused.allSatisfy { $0 == Int16(NETIF_RSP_ERROR) })
            let firstDiff = zip(captured, expected).enumerated().first { $0.element.0 != $0.element.1 }.map { i, p in
                "frame \(i): \(p.0.count) bytes, id \(p.0.count > 15 ? Int(p.0[14]) << 8 | Int(p.0[15]) : -1); expected \(p.1.count) bytes, id \(Int(p.1[14]) << 8 | Int(p.1[15]))"
            }
            #expect(captured.count == expected.count && firstDiff == nil,
                    "\(captured.count) frames on the tap for \(expected.count) OKAY responses; \(firstDiff ?? "")")
            #expect(!expected.isEmpty && !refused.isEmpty, "ok \(expected.count) refused \(refused.count)")
            print("netif tx double fetch: \(expected.count) sent, \(refused.count) dropped with ERROR")

            // The other guest's vif carries frames as before.
            let gq = gf.queues[0]
            for i in 0..<20 {
                #expect(try gq.send(testFrame(i, length: 100 + i)))
                try gq.pushTx()
                #expect(try gq.txResponses(1).first?.status == Int16(NETIF_RSP_OKAY))
                #expect(gcap.next() == testFrame(i, length: 100 + i))
            }
        }
    }
}
