import BlkBack
import BlkFrontKit
import Foundation
import Glibc
import Testing
import XenBus
import XenHV
import XenRing
import XenStore
import XenTestKit

extension Hostile {
    /// Frontends that lie in XenBus: garbage ring keys, state flapping, ring
    /// keys rewritten after Connected. blkback answers like xenbus_dev_fatal
    /// (`<backend>/error`, Closing) or ignores what it must, and a second
    /// guest's disk on the same daemons keeps working throughout.
    @Suite struct XenBusAbuseTests {
        @Test func garbageRingKeysCloseTheDeviceWithAnError() throws {
            let d = try HostileDom0()
            let h = try d.guest("liar"), g = try d.guest("bystander")
            let worker = try DiskWorker(try XenBusDisk(d.s, guest: g, bytes: 1 << 20))
            worker.start()
            let front = try XenBusDisk.makeFront(h, slot: 1)
            let good = XenBusDisk.frontendKeys(front, persistent: true)
            let foreign: GrantRef = 7100
            h.hypervisor.grantTable!.grantAccess(foreign, to: g.domid, frame: front.queues[0].ringFrame, readOnly: false)
            func with(_ change: [String: String?]) -> [String: String?] {
                var k: [String: String?] = good.mapValues { $0 }
                for (key, v) in change { k[key] = v }
                return k
            }
            let cases: [(String, [String: String?])] = [
                ("ring-ref abc", with(["ring-ref": "abc"])),
                ("ring-ref empty", with(["ring-ref": ""])),
                ("ring-ref negative", with(["ring-ref": "-1"])),
                ("ring-ref 99999999999", with(["ring-ref": "99999999999"])),
                ("ring-ref 4294967295", with(["ring-ref": "4294967295"])),
                ("ring-ref missing", with(["ring-ref": nil])),
                ("ring-ref granted to another domain", with(["ring-ref": "\(foreign)"])),
                ("ring-page-order 9", with(["ring-page-order": "9", "ring-ref0": "\(front.queues[0].ringRefs[0])"])),
                ("ring-page-order abc", with(["ring-page-order": "abc"])),
                // Linux reads ring-ref0 once the order is given, even 0.
                ("ring-page-order 0 with ring-ref only", with(["ring-page-order": "0"])),
                ("multi-queue-num-queues 1000", with(["multi-queue-num-queues": "1000"])),
                ("multi-queue-num-queues 0", with(["multi-queue-num-queues": "0"])),
                ("event-channel abc", with(["event-channel": "abc"])),
                ("event-channel 0", with(["event-channel": "0"])),
                ("event-channel 4095 (unbound)", with(["event-channel": "4095"])),
                ("event-channel 99999", with(["event-channel": "99999"])),
                ("event-channel missing", with(["event-channel": nil])),
                ("protocol garbage", with(["protocol": "mips-abi"])),
                // Quoted in dom0's log and <backend>/error: a forged log line, a terminal escape.
                ("ring-ref with control characters", with(["ring-ref": "1\nblkback: all is well\u{1B}[2J"])),
            ]
            var devs: [XenBusDevice] = []
            for (i, (what, keys)) in cases.enumerated() {
                let (dev, _) = try XenBusDisk.create(d.s, guest: h, devid: 51712 + 16 * (i + 1), bytes: 1 << 20)
                devs.append(dev)
                try XenBusDisk.publish(h, dev, keys.compactMapValues { $0 })
                let st = Dom0Harness.wait(d.s.xenstore, state: dev.backendPath, seconds: 10) { $0 == .closing || $0 == .connected }
                #expect(st == .closing, "\(what): backend state \(String(describing: st))")
                let error = try d.s.xenstore.readIfExists(dev.backendPath + "/error")
                #expect(error?.isEmpty == false, "\(what): no <backend>/error")
                #expect(error?.unicodeScalars.contains { $0.properties.generalCategory == .control } == false,
                        "\(what): <backend>/error quotes control characters: \(String(reflecting: error))")
                // Nothing of the ring stays mapped.
                for r in front.queues[0].ringRefs { #expect(h.hypervisor.grantTable!.flags(r) & 0x18 == 0, "\(what): ring left mapped") }
                try d.s.xenstore.destroyDevice(dev)
            }
            d.blkback.settle()
            // Only the bystander's disk is still open; the liar can still attach a good one.
            let gone = eventually(seconds: 5, every: 1) { d.blkback.deviceNames.count == 1 }
            #expect(gone, "devices left open: \(d.blkback.deviceNames)")
            // A late event must not re-create a removed device's directory (xenbus_switch_state).
            for dev in devs { #expect(try !d.s.xenstore.exists(dev.backendPath), "\(dev.backendPath) re-created") }
            let fine = try XenBusDisk(d.s, guest: h, devid: 51712, slot: 2)
            #expect(try fine.front.read(sector: 0, bytes: 4096).status == 0)
            let w = worker.stop()
            #expect(w.failures.isEmpty, "\(w.failures)")
            #expect(w.ops > 0)
        }

        @Test func flappingFrontendStatesLeaveTheBackendSane() throws {
            let d = try HostileDom0()
            let h = try d.guest("flapper"), g = try d.guest("bystander")
            let worker = try DiskWorker(try XenBusDisk(d.s, guest: g, bytes: 1 << 20))
            worker.start()
            let (dev, _) = try XenBusDisk.create(d.s, guest: h, bytes: 1 << 20)
            let front = try XenBusDisk.makeFront(h, slot: 1)
            try XenBusDisk.publish(h, dev, XenBusDisk.frontendKeys(front, persistent: true))
            // Connected, Closing, Closed, Initialising, Initialised, ... as fast as the guest can write.
            let sequence: [XenbusState] = [.connected, .closing, .closed, .initialising, .initialised, .unknown, .reconfiguring,
                                           .initialised, .closed, .connected]
            for _ in 0..<30 {
                for s in sequence { try h.xenstore.write(dev.frontendPath + "/state", "\(s.rawValue)") }
                try h.xenstore.write(dev.frontendPath + "/state", "garbage")
                try h.xenstore.write(dev.frontendPath + "/state", "99")
            }
            // A frontend that behaves again: Closed, the backend follows; nothing of the ring stays mapped.
            try h.xenstore.write(dev.frontendPath + "/state", "\(XenbusState.closed.rawValue)")
            #expect(Dom0Harness.wait(d.s.xenstore, state: dev.backendPath, seconds: 10) { $0 == .closed } == .closed)
            d.blkback.settle()
            for r in front.queues[0].ringRefs { #expect(front.endAccess(r), "ring ref \(r) still mapped after Closed") }
            #expect(d.device(dev)?.isConnected == false)
            // Reconnect: Initialising -> InitWait -> new ring -> Connected, and I/O works.
            try h.xenstore.write(dev.frontendPath + "/state", "\(XenbusState.initialising.rawValue)")
            #expect(Dom0Harness.wait(d.s.xenstore, state: dev.backendPath, seconds: 10) { $0 == .initWait } == .initWait)
            let again = try XenBusDisk.makeFront(h, slot: 2)
            try XenBusDisk.publish(h, dev, XenBusDisk.frontendKeys(again, persistent: true))
            #expect(Dom0Harness.wait(d.s.xenstore, state: dev.backendPath, seconds: 10) { $0 == .connected } == .connected)
            let b = try again.makeBuffer(pages: 1)
            try again.fill(b, with: blockPattern(3))
            #expect(try again.roundTrip(again.rwRequest(BlkifOp.write, sector: 8, buffer: b, bytes: 4096)).status == 0)
            #expect(try again.read(sector: 8, bytes: 4096) == (0, blockPattern(3)))
            #expect(d.blkback.deviceNames.count == 2)
            let w = worker.stop()
            #expect(w.failures.isEmpty, "\(w.failures)")
            #expect(w.ops > 0)
        }

        @Test func ringKeysRewrittenAfterConnectedAreIgnored() throws {
            let d = try HostileDom0()
            let h = try d.guest("rewriter"), g = try d.guest("bystander")
            let worker = try DiskWorker(try XenBusDisk(d.s, guest: g, bytes: 1 << 20))
            worker.start()
            let disk = try XenBusDisk(d.s, guest: h)
            #expect(try disk.front.write(sector: 0, blockPattern(5)) == 0)
            let other = try XenBusDisk.makeFront(h, slot: 1)  // a second, valid ring and port to point at
            let rewrites: [[String: String]] = [
                ["ring-ref": "abc", "event-channel": "xyz"],
                ["ring-ref": "99999999999", "event-channel": "4095", "ring-page-order": "9"],
                ["ring-ref": "\(other.queues[0].ringRefs[0])", "event-channel": "\(other.queues[0].port)"],
                ["multi-queue-num-queues": "1000", "protocol": "x86_32-abi"],
            ]
            for keys in rewrites {
                for (k, v) in keys { try h.xenstore.write(disk.dev.frontendPath + "/" + k, v) }
                // The state node rewritten too: the backend's watch fires on it.
                try h.xenstore.write(disk.dev.frontendPath + "/state", "\(XenbusState.connected.rawValue)")
                try h.xenstore.write(disk.dev.frontendPath + "/state", "\(XenbusState.initialised.rawValue)")
                d.blkback.settle()
                #expect(try d.s.xenstore.state(at: disk.dev.backendPath) == .connected, "\(keys)")
                #expect(try d.s.xenstore.readIfExists(disk.dev.backendPath + "/error") == nil, "\(keys)")
                // Still served on the original ring, never the new one.
                let b = try disk.front.makeBuffer(pages: 1)
                let r = try disk.answer(try disk.front.rwRequest(BlkifOp.read, sector: 0, buffer: b, bytes: 4096))
                #expect(r.status == 0 && r.paddingZero, "\(keys)")
                #expect(try disk.front.contents(b, count: 4096) == blockPattern(5), "\(keys)")
                #expect(h.hypervisor.grantTable!.flags(other.queues[0].ringRefs[0]) & 0x18 == 0, "the rewritten ring-ref was mapped")
            }
            // Closing and Closed still tear down cleanly.
            try h.xenstore.switchState(at: disk.dev.frontendPath, to: .closing)
            #expect(Dom0Harness.wait(d.s.xenstore, state: disk.dev.backendPath, seconds: 10) { $0 == .closing } == .closing)
            try h.xenstore.switchState(at: disk.dev.frontendPath, to: .closed)
            #expect(Dom0Harness.wait(d.s.xenstore, state: disk.dev.backendPath, seconds: 10) { $0 == .closed } == .closed)
            d.blkback.settle()
            for r in disk.front.queues[0].ringRefs { #expect(disk.front.endAccess(r), "ring ref \(r) still mapped after Closed") }
            let w = worker.stop()
            #expect(w.failures.isEmpty, "\(w.failures)")
            #expect(w.ops > 0)
        }
    }
}
