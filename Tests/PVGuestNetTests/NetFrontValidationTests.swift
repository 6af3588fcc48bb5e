import CXen
import Foundation
import Glibc
import PVGuest
import Synchronization
import Testing
import XenBus
import XenHV
import XenRing
import XenStore
import XenTestKit

/// pvguest's netfront against a lying backend played by this test (dom0 maps
/// the rings and writes the responses by hand): every bad value the backend
/// writes is refused and counted, the frame it belonged to is dropped, and
/// good frames after it still reach the NIC. Needs root (network namespace).
@Suite struct NetFrontValidationTests {
    static let mac = "00:16:3e:5a:0c:01"

    /// A frame of `n` bytes: broadcast, our source, an ethertype no stack cares about.
    static func frame(_ n: Int, fill: UInt8) -> [UInt8] {
        var f = [UInt8](repeating: 0xFF, count: 6) + [0x00, 0x16, 0x3E, 0x5A, 0x0C, 0x02] + [0x88, 0xB5]
        f += [UInt8](repeating: fill, count: n - f.count)
        return f
    }

    /// pvguest's netfront on a vif whose backend the test plays through
    /// xenstore: the device's keys, InitWait, and Connected once the
    /// frontend is. `close()` takes the backend away first (so the frontend's
    /// orderly close does not wait for it), stops the frontend and deletes
    /// its namespace.
    final class PlayedBackend {
        let dom0: Dom0Harness
        let guest: Dom0Harness.Guest
        let ns: String
        let be: String, fe: String
        /// The backend's own xenstore connection, for waiting on the frontend's state.
        let bx: XenBusClient
        let nic: NetFrontDevice

        init(_ name: String, features: [String]) throws {
            dom0 = try Dom0Harness(buildDirectory: Dom0Harness.buildDirectory(packageRoot: NetPathTests.root))
            guest = try dom0.createGuest(name: name, pages: 2048)
            ns = "\(name.prefix(4))\(getpid() % 100000)"
            let dev = XenBusDevice(type: "vif", frontendDomid: XenStore.DomID(guest.domid), devid: 0)
            try dom0.xenstore.createDevice(dev, backend: ["mac": NetFrontValidationTests.mac], frontend: ["mac": NetFrontValidationTests.mac])
            be = dev.backendPath
            fe = dev.frontendPath
            for k in features { try dom0.xenstore.write(be + "/" + k, "1") }
            try dom0.xenstore.switchState(at: be, to: .initWait)
            bx = try dom0.dom0XenStore()
            let (bx, fe, be) = (bx, fe, be)
            Thread {
                _ = bx.awaitState(at: fe, seconds: 20) { $0 == .connected }
                try? bx.switchState(at: be, to: .connected)
            }.start()
            do {
                nic = try NetFrontDevice(hypervisor: guest.hypervisor, xenstore: guest.xenstore, frontendPath: fe,
                                         pages: try GuestPages(hypervisor: guest.hypervisor),
                                         grants: try GrantRefs(hypervisor: guest.hypervisor), namespace: ns)
            } catch {
                _ = try? NetPathTests.run("/usr/sbin/ip", ["netns", "del", ns])
                throw error
            }
        }

        func close() {
            try? dom0.xenstore.switchState(at: be, to: .closed)
            nic.stop()
            _ = try? NetPathTests.run("/usr/sbin/ip", ["netns", "del", ns])
        }
    }

    /// The guest deletes its NIC (`ip link del eth0` in its namespace): tun
    /// then answers every poll with POLLERR at once, and every read with
    /// EBADFD. The queue stops reading it, says so once, and does not spin.
    @Test func aDeletedNICDoesNotMakeTheQueueSpin() throws {
        let before = Set(threadCPUTimes().keys)
        let p = try PlayedBackend("nfgone", features: ["feature-rx-copy"])
        defer { p.close() }
        // Its queue's thread is started before the connection is counted.
        #expect(eventually { p.nic.connections == 1 })
        let appeared = Set(threadCPUTimes().keys).subtracting(before)
        try NetPathTests.ip("-n", p.ns, "link", "del", p.nic.interfaceName)
        #expect(eventually { p.nic.stats.nicGone.load(ordering: .relaxed) == 1 }, "the queue did not see its NIC go")
        let c0 = threadCPUTimes(), t0 = Date()
        idle(milliseconds: 1000)  // a measurement window, not synchronisation
        let c1 = threadCPUTimes()
        let queue = Set(c1.filter { appeared.contains($0.key) && $0.value.name == "nf-\(p.nic.interfaceName)q0" }.keys)
        #expect(queue.count == 1)
        let used = cpuSeconds(of: queue, from: c0, to: c1) / Date().timeIntervalSince(t0)
        #expect(used < 0.1, "the queue used \(used) of a core after its NIC was deleted")
        #expect(p.nic.stats.nicGone.load(ordering: .relaxed) == 1)
    }

    @Test func badRxAndTxResponsesAreRefusedAndGoodFramesStillPass() throws {
        let p = try PlayedBackend("nfhostile", features: ["feature-rx-copy", "feature-sg", "feature-gso-tcpv4"])
        defer { p.close() }
        let (dom0, guest, ns, be, fe, bx, nic) = (p.dom0, p.guest, p.ns, p.be, p.fe, p.bx, p.nic)
        #expect(nic.createdNamespace && access("/run/netns/" + ns, F_OK) == 0)
        #expect(nic.mac.description == Self.mac)
        #expect(try dom0.xenstore.read(fe + "/request-rx-copy") == "1")
        #expect(try dom0.xenstore.read(fe + "/feature-gso-tcpv6") == "0", "the backend offered no tcpv6 GSO")

        // The lying backend: the frontend's rings, its event channel.
        let hv0 = try dom0.dom0Hypervisor()
        let txRef = GrantRef(try dom0.xenstore.read(fe + "/tx-ring-ref"))!
        let rxRef = GrantRef(try dom0.xenstore.read(fe + "/rx-ring-ref"))!
        let port = EventPort(try dom0.xenstore.read(fe + "/event-channel"))!
        let txm = try hv0.mapGrant(domid: guest.domid, ref: txRef, writable: true).get()
        let rxm = try hv0.mapGrant(domid: guest.domid, ref: rxRef, writable: true).get()
        var tx = BackRing(attaching: try txm.region.ring(NetifTxRing.self, pages: 1))
        var rx = BackRing(attaching: try rxm.region.ring(NetifRxRing.self, pages: 1))
        let channel = try hv0.bindInterdomain(remote: guest.domid, remotePort: port)

        var posted: [netif_rx_request] = []
        while let r = try rx.nextRequest() { posted.append(r) }
        #expect(posted.count == 256, "netfront keeps the whole rx ring posted")
        #expect(posted.enumerated().allSatisfy { $0.element.id == UInt16($0.offset) }, "rx ids are the slots")
        var next = 0
        func take() -> netif_rx_request { defer { next += 1 }; return posted[next] }
        func data(_ bytes: [UInt8], into req: netif_rx_request, offset: UInt16 = 0) {
            var ops = [GrantCopy]()
            var copy = bytes
            copy.withUnsafeMutableBytes { p in
                ops = [GrantCopy(source: .local(p.baseAddress!), dest: .grant(domid: guest.domid, ref: req.gref, offset: offset),
                                 length: UInt16(bytes.count))]
                hv0.copyGrants(&ops)
            }
            #expect(ops[0].status == .okay)
        }
        func extra(type: UInt8, gsoType: UInt8 = 0, size: UInt16 = 0) -> netif_rx_response {
            var x = netif_extra_info()
            x.type = type
            x.u.gso.type = gsoType
            x.u.gso.size = size
            // Sound: both are 8-byte plain C structs that share an rx ring slot.
            return unsafeBitCast(x, to: netif_rx_response.self)
        }

        // 1. A good frame.
        let good = Self.frame(60, fill: 0xA1)
        var r = take(); data(good, into: r)
        rx.enqueue(netif_rx_response(id: r.id, offset: 0, flags: 0, status: Int16(good.count)))
        // 2. The id of another slot.
        r = take(); data(good, into: r)
        rx.enqueue(netif_rx_response(id: r.id &+ 7, offset: 0, flags: 0, status: Int16(good.count)))
        // 3. offset + size past the page.
        r = take()
        rx.enqueue(netif_rx_response(id: r.id, offset: 4000, flags: 0, status: 200))
        // 4. An error status (not a lie: just a dropped frame).
        r = take()
        rx.enqueue(netif_rx_response(id: r.id, offset: 0, flags: 0, status: Int16(NETIF_RSP_ERROR)))
        // 5. An extra-info slot of an unknown type.
        r = take(); data(good, into: r)
        rx.enqueue(netif_rx_response(id: r.id, offset: 0, flags: UInt16(NETRXF_extra_info), status: Int16(good.count)))
        _ = take(); rx.enqueue(extra(type: 9))
        // 6. A GSO extra of size 0.
        r = take(); data(good, into: r)
        rx.enqueue(netif_rx_response(id: r.id, offset: 0, flags: UInt16(NETRXF_extra_info), status: Int16(good.count)))
        _ = take(); rx.enqueue(extra(type: UInt8(XEN_NETIF_EXTRA_TYPE_GSO), gsoType: UInt8(XEN_NETIF_GSO_TYPE_TCPV4), size: 0))
        // 7. A two-slot frame whose second slot lies about its id: the whole frame goes.
        r = take(); data(good, into: r)
        rx.enqueue(netif_rx_response(id: r.id, offset: 0, flags: UInt16(NETRXF_more_data), status: Int16(good.count)))
        r = take(); data(good, into: r)
        rx.enqueue(netif_rx_response(id: r.id &+ 1, offset: 0, flags: 0, status: Int16(good.count)))
        // 8. A good two-slot frame at an offset: 4096 + 100 bytes.
        let big = Self.frame(4196, fill: 0xB2)
        r = take(); data(Array(big[0..<4000]), into: r, offset: 96)
        rx.enqueue(netif_rx_response(id: r.id, offset: 96, flags: UInt16(NETRXF_more_data), status: 4000))
        r = take(); data(Array(big[4000...]), into: r)
        rx.enqueue(netif_rx_response(id: r.id, offset: 0, flags: 0, status: Int16(big.count - 4000)))
        // 9. A good checksum-offloaded UDP frame whose headers run past its first
        //    slot (20 bytes): the frontend gathers it to find the checksum.
        var udp = [UInt8](repeating: 0xFF, count: 6) + [0x00, 0x16, 0x3E, 0x5A, 0x0C, 0x02] + [0x08, 0x00]
        udp += [0x45, 0, 0, 28 + 32, 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 214, 0, 1, 10, 214, 0, 2]  // IPv4, UDP
        udp += [0, 9, 0, 9, 0, 8 + 32, 0, 0] + [UInt8](repeating: 0xC3, count: 32)
        r = take(); data(Array(udp[0..<20]), into: r)
        rx.enqueue(netif_rx_response(id: r.id, offset: 0, flags: UInt16(NETRXF_more_data | NETRXF_csum_blank), status: 20))
        r = take(); data(Array(udp[20...]), into: r)
        rx.enqueue(netif_rx_response(id: r.id, offset: 0, flags: 0, status: Int16(udp.count - 20)))
        rx.pushResponses()
        try channel.notify()

        _ = eventually {
            nic.stats.rxPackets.load(ordering: .relaxed) + nic.stats.rxDropped.load(ordering: .relaxed) >= 9
                && nic.stats.protocolErrors.load(ordering: .relaxed) >= 5
        }
        #expect(nic.stats.rxPackets.load(ordering: .relaxed) == 3, "the three good frames reach the NIC")
        #expect(nic.stats.rxBytes.load(ordering: .relaxed) == UInt64(good.count + big.count + udp.count))
        #expect(nic.stats.rxDropped.load(ordering: .relaxed) == 6)
        // Bad id, page overrun, unknown extra, GSO size 0, bad id in a second slot.
        #expect(nic.stats.protocolErrors.load(ordering: .relaxed) == 5)

        // The frontend reposted every slot it consumed, with the slot as id.
        var reposted: [netif_rx_request] = []
        while let q = try rx.nextRequest() { reposted.append(q) }
        #expect(reposted.count == next)
        #expect(reposted.enumerated().allSatisfy { Int($0.element.id) == $0.offset })

        // Transmit: make the guest's stack send (ARP for a neighbour nobody
        // answers), take the request, answer it with an id never handed out.
        try NetPathTests.ip("-n", ns, "addr", "add", "10.214.0.2/24", "dev", "eth0")
        let pinger = Process()
        pinger.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        pinger.arguments = ["netns", "exec", ns, "ping", "-c", "1", "-W", "1", "10.214.0.1"]
        pinger.standardOutput = FileHandle.nullDevice
        pinger.standardError = FileHandle.nullDevice
        try pinger.run()
        defer { pinger.waitUntilExit() }
        var txReq: netif_tx_request?
        #expect(try eventually { txReq = try tx.nextRequest(); return txReq != nil }, "the guest's stack sent nothing")
        if let q = txReq {
            #expect(q.size >= 14 && q.size <= 1514 && Int(q.offset) + Int(q.size) <= 4096)
            let lie: UInt16 = q.id == 200 ? 201 : 200
            tx.enqueue(netif_tx_response(id: lie, status: Int16(NETIF_RSP_OKAY)))
            tx.pushResponses()
            try channel.notify()
            #expect(eventually { nic.stats.protocolErrors.load(ordering: .relaxed) == 6 }, "an unknown tx id is refused")
        }

        // A producer index past everything posted is fatal for the data path:
        // the frontend closes the device and connects again (this test plays
        // the backend's side of Closing -> Closed -> InitWait -> Connected).
        #expect(nic.connections == 1)
        // rsp_prod (offset 8 of the shared ring header) a ring and more ahead of what was posted.
        try rxm.region.store(rx.rspProdPvt &+ 300, at: 8)
        try channel.notify()
        #expect(bx.awaitState(at: fe, seconds: 10) { $0 == .closing } == .closing, "the frontend did not close")
        try dom0.xenstore.switchState(at: be, to: .closing)
        #expect(bx.awaitState(at: fe, seconds: 10) { $0 == .closed } == .closed)
        try dom0.xenstore.switchState(at: be, to: .closed)
        #expect(bx.awaitState(at: fe, seconds: 10) { $0 == .initialising } == .initialising, "Closed -> Initialising is the reconnect")
        try dom0.xenstore.switchState(at: be, to: .initWait)
        #expect(bx.awaitState(at: fe, seconds: 10) { $0 == .connected } == .connected)
        try dom0.xenstore.switchState(at: be, to: .connected)
        #expect(eventually { nic.connections == 2 }, "the frontend did not connect again")
        // Fresh rings on the same pages: the whole rx ring posted again from index 0.
        var again = BackRing(attaching: try rxm.region.ring(NetifRxRing.self, pages: 1))
        var reposted2: [netif_rx_request] = []
        #expect(try eventually {
            while let q = try again.nextRequest() { reposted2.append(q) }
            return reposted2.count == 256
        })
        _ = txm
        _ = rxm
    }
}
