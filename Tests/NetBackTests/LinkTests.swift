import CNetShim
import Foundation
import Glibc
import NetBack
import NetFrontKit
import Testing
import XenTestKit

/// Taps, bridges and the xen-netlink tool against the real kernel.
/// Needs root (CAP_NET_ADMIN) and /dev/net/tun; every link is removed in a defer.
@Suite(.serialized) struct LinkTests {
    static let IFF_TAP: Int32 = 0x0002, IFF_NO_PI: Int32 = 0x1000, IFF_VNET_HDR: Int32 = 0x4000, IFF_MULTI_QUEUE: Int32 = 0x0100

    @Test func tapHasVnetHeaderAndGoesAwayWhenClosed() throws {
        let name = uniqueName("nbt")
        let nl = try Netlink()
        do {
            let tap = try Tap(name: name)
            defer { _ = try? nl.deleteLink(name) }
            #expect(tap.name == name)
            #expect(tap.flags & (Self.IFF_TAP | Self.IFF_NO_PI | Self.IFF_VNET_HDR) == Self.IFF_TAP | Self.IFF_NO_PI | Self.IFF_VNET_HDR)
            #expect(tap.flags & Self.IFF_MULTI_QUEUE == 0)
            #expect(try nl.link(name).kind == "tun")
            try tap.setOffload(checksum: true, tso4: true, tso6: true)
            try tap.setCarrier(false)
        }
        // Not persistent: closing the last queue removes the device.
        #expect(!nl.exists(name))
    }

    @Test func multiQueueTapAttachesQueues() throws {
        let name = uniqueName("nbt")
        let nl = try Netlink()
        let tap = try Tap(name: name, queues: 1, multiQueue: true)
        defer { _ = try? nl.deleteLink(name) }
        #expect(tap.flags & Self.IFF_MULTI_QUEUE != 0)
        let q2 = try tap.openQueue()
        defer { close(q2) }
        #expect(cnet_tap_get_flags(q2) & Self.IFF_MULTI_QUEUE != 0)
        let single = try Tap(name: uniqueName("nbt"))
        defer { _ = try? nl.deleteLink(single.name) }
        #expect(throws: TapError.self) { try single.openQueue() }
        // An exclusive open never joins a tap that exists (IFF_TUN_EXCL: EBUSY).
        let joined = #expect(throws: TapError.self) { try Tap(name: name, queues: 1, multiQueue: true, exclusive: true) }
        #expect(joined?.errno == EBUSY)
        let fresh = uniqueName("nbt")
        let own = try Tap(name: fresh, queues: 2, multiQueue: true, exclusive: true)
        defer { _ = try? nl.deleteLink(fresh) }
        #expect(own.queues.count == 2)
    }

    @Test func bridgeEnslaveMTUUpRelease() throws {
        let nl = try Netlink()
        let br = uniqueName("nbb"), dev = uniqueName("nbt")
        try nl.addBridge(br)
        defer { _ = try? nl.deleteLink(br) }
        let tap = try Tap(name: dev)
        defer { _ = try? nl.deleteLink(tap.name) }
        try nl.setMTU(br, 9000)
        try nl.setMTU(dev, 9000)
        try nl.enslave(dev, to: br)
        try nl.setUp(dev)
        try nl.setUp(br)
        let b = try nl.link(br), d = try nl.link(dev)
        #expect(b.kind == "bridge" && b.mtu == 9000 && b.isUp)
        #expect(d.master == b.ifindex && d.mtu == 9000 && d.isUp)
        try nl.release(dev)
        #expect(try nl.link(dev).master == 0)
        // Enslaving to something that is not a bridge is refused.
        #expect(throws: NetlinkError.self) { try nl.enslave(dev, to: "lo") }
        #expect(throws: NetlinkError.self) { try nl.deleteBridge(dev) }
        try nl.deleteBridge(br)
        #expect(!nl.exists(br))
        let missing = #expect(throws: NetlinkError.self) { try nl.setUp(br) }
        #expect(missing?.description.hasPrefix("up \(br):") == true)
        #expect(throws: NetlinkError.self) { try nl.addBridge("bad name") }
        #expect(throws: NetlinkError.self) { try nl.addBridge("waytoolongforaninterface") }
    }

    @Test func xenNetlinkToolDoesTheHotplugSteps() throws {
        let tool = BuildProducts.path("xen-netlink")
        let nl = try Netlink()
        let br = uniqueName("nbb")
        let tap = try Tap(name: uniqueName("nbt"))
        defer {
            _ = try? nl.deleteLink(tap.name)
            _ = try? nl.deleteLink(br)
        }
        #expect(try run(tool, ["bridge-add", br]).status == 0)
        #expect(try run(tool, ["bridge-add", "--exist-ok", br]).status == 0)
        #expect(try run(tool, ["enslave", tap.name, br]).status == 0)
        #expect(try run(tool, ["set-mtu", tap.name, "1400"]).status == 0)
        #expect(try run(tool, ["up", tap.name]).status == 0)
        let show = try run(tool, ["show", tap.name])
        #expect(show.out == "\(tap.name) kind=tun mtu=1400 up master=\(try nl.link(br).ifindex)\n")
        #expect(try run(tool, ["release", tap.name]).status == 0)
        #expect(try nl.link(tap.name).master == 0)
        #expect(try run(tool, ["bridge-del", br]).status == 0)
        #expect(!nl.exists(br))
        // Failures: exit status 1 and exactly one line naming the operation.
        for args in [["bridge-del", br], ["enslave", "nosuchdev0", "nosuchbr0"], ["up", "nosuchdev0"],
                     ["release", "nosuchdev0"]] {
            let r = try run(tool, args)
            #expect(r.status == 1, "\(args)")
            #expect(r.err.hasPrefix("xen-netlink: ") && r.err.filter { $0 == "\n" }.count == 1, "\(args): \(r.err)")
            #expect(r.out.isEmpty)
        }
        #expect(try run(tool, ["set-mtu", tap.name, "10"]).status != 0)
    }

    @Test func vifBridgeHotplugScriptBridgesAndReleases() throws {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("scripts/vif-bridge").path
        let nl = try Netlink()
        let br = uniqueName("nbb")
        let tap = try Tap(name: uniqueName("nbt"))
        defer {
            _ = try? nl.deleteLink(tap.name)
            _ = try? nl.deleteLink(br)
        }
        func hotplug(_ arg: String, vif: String, mtu: String? = nil) throws -> CommandResult {
            var env = ["vif": vif, "bridge": br, "XEN_NETLINK": BuildProducts.path("xen-netlink"), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"]
            if let mtu { env["mtu"] = mtu }
            return CommandResult.run("/bin/bash", [script, arg], environment: env)
        }
        // The bridge does not exist yet: the script creates it.
        let on = try hotplug("online", vif: tap.name, mtu: "1400")
        #expect(on.status == 0, "\(on.err)")
        let b = try nl.link(br), d = try nl.link(tap.name)
        #expect(b.kind == "bridge" && b.isUp)
        #expect(d.master == b.ifindex && d.isUp && d.mtu == 1400)
        #expect(try hotplug("offline", vif: tap.name).status == 0)
        #expect(try nl.link(tap.name).master == 0)
        let bad = try hotplug("online", vif: "nosuchvif0")
        #expect(bad.status == 1 && bad.err.contains("vif-bridge: xen-netlink"))
    }
}

/// The netback executable serves one vif from its arguments and removes the
/// tap on SIGTERM. Needs root (/dev/net/tun); the tap goes with the process.
@Suite struct NetbackExecutableTests {
    @Test func servesAVifUntilSIGTERM() throws {
        let f = try HypervisorFixture()
        let (domid, guest) = try f.guest(pages: NetFront.pagesNeeded(queues: 1), name: uniqueName("exec"))
        let front = try NetFront(guest: guest)
        let q = front.queues[0]
        guard case .shared(let port) = q.rings.events else { Issue.record("expected a shared channel"); return }
        let nl = try Netlink()
        let devid = UInt32(getpid() % 100000)  // vif names are per domid; make ours unique to this run
        let name = "vif\(domid).\(devid)"
        defer { _ = try? nl.deleteLink(name) }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: BuildProducts.path("netback"))
        p.arguments = ["--xenhv-socket", f.socket, "--domid", "\(domid)", "--devid", "\(devid)",
                       "--queue", "\(q.rings.txRingRef),\(q.rings.rxRingRef),\(port)", "--log-level", "error"]
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() } }
        // The ready line, waited for with a deadline so a silent child cannot hang the run.
        var line = Data()
        let fd = out.fileHandleForReading.fileDescriptor
        while !line.contains(10) {
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&pfd, 1, 10_000) > 0 else { break }
            var buf = [UInt8](repeating: 0, count: 256)
            let n = read(fd, &buf, buf.count)
            if n <= 0 { break }
            line.append(contentsOf: buf[..<n])
        }
        #expect(String(decoding: line, as: UTF8.self) == "netback ready \(name)\n")
        #expect(nl.exists(name))
        // The rings are served: a frame (to a down tap) is answered.
        try nl.setUp(name)
        try q.send(Frames.udp(srcMAC: [2, 0, 0, 0, 0, 1], dstMAC: [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF], src: [10, 0, 0, 1],
                              dst: [10, 0, 0, 2], sport: 1, dport: 2, payload: [1]))
        try q.pushTx()
        #expect(try q.txResponses(1).first?.status == 0)
        kill(p.processIdentifier, SIGTERM)
        // SIGTERM must end it promptly; SIGKILL after 10 s so the run never hangs.
        let deadline = Date().addingTimeInterval(10)
        while p.isRunning && Date() < deadline { var pfd = pollfd(); _ = poll(&pfd, 0, 20) }
        #expect(!p.isRunning)
        if p.isRunning { kill(p.processIdentifier, SIGKILL) }
        p.waitUntilExit()
        #expect(p.terminationReason == .exit && p.terminationStatus == 0)
        #expect(!nl.exists(name))
        let bad = try run(BuildProducts.path("netback"), ["--domid", "1", "--queue", "1,2"])
        #expect(bad.status != 0 && bad.err.contains("--queue"))
    }
}
