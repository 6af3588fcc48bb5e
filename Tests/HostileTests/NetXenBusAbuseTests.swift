import CXen
import Foundation
import Glibc
import NetBack
import NetFrontKit
import Testing
import XenBus
import XenHV
import XenStore
import XenTestKit

extension Hostile {
    /// vif frontends that lie in XenBus, against netback's handshake (the
    /// daemon's XenBus service and hotplug script): state flapping, ring keys
    /// and event channel rewritten after Connected. A second guest's vif on the
    /// same netback keeps carrying frames throughout. Needs root (taps, a bridge).
    @Suite struct NetXenBusAbuseTests {
        /// GTF_reading | GTF_writing: the grant is mapped by dom0.
        static let busy: UInt16 = 0x18

        @Test func flappingVifFrontendLeavesNetbackSane() throws {
            let d = try HostileDom0()
            let net = try HostileNetback(d)
            defer { net.stop() }
            let h = try d.guest("flapper", pages: XenBusVif.pages(slots: 3))
            let g = try d.guest("bystander", pages: XenBusVif.pages(slots: 1))
            let other = try XenBusVif(d, net, guest: g)
            let worker = NetWorker(other.queue)
            worker.start()

            let dev = try XenBusVif.create(d, net, guest: h)
            let front = try XenBusVif.makeFront(h, slot: 0)
            try front.queues[0].postRx()
            try XenBusVif.publish(h, dev, XenBusVif.frontendKeys(front))
            let sequence: [XenBus.XenbusState] = [.connected, .closing, .closed, .initialising, .initialised, .unknown, .reconfiguring,
                                           .initialised, .closed, .connected]
            for _ in 0..<30 {
                for s in sequence { try h.xenstore.write(dev.frontendPath + "/state", "\(s.rawValue)") }
                try h.xenstore.write(dev.frontendPath + "/state", "garbage")
                try h.xenstore.write(dev.frontendPath + "/state", "99")
            }
            // Behaving again: Closed, netback follows and lets go of the rings and the port.
            try h.xenstore.write(dev.frontendPath + "/state", "\(XenBus.XenbusState.closed.rawValue)")
            #expect(Dom0Harness.wait(d.s.xenstore, state: dev.backendPath, seconds: 10) { $0 == .closed } == .closed)
            net.service.settle()
            let rings = front.queues[0].rings
            for r in [rings.txRingRef, rings.rxRingRef] {
                #expect(h.hypervisor.grantTable!.flags(r) & Self.busy == 0, "ring ref \(r) still mapped after Closed")
            }
            if case .shared(let port) = rings.events {
                #expect(try h.hypervisor.status(of: port) == .unbound(remote: 0), "netback kept the event channel bound")
            }
            #expect(net.vif(dev)?.isConnected == false)
            #expect(net.vif(dev) != nil, "the vif itself stays until the toolstack removes it")

            // Reconnect: Initialising -> InitWait -> new rings -> Connected, and frames flow.
            try h.xenstore.write(dev.frontendPath + "/state", "\(XenBus.XenbusState.initialising.rawValue)")
            #expect(Dom0Harness.wait(d.s.xenstore, state: dev.backendPath, seconds: 10) { $0 == .initWait } == .initWait)
            let again = try XenBusVif.makeFront(h, slot: 1)
            try again.queues[0].postRx()
            try XenBusVif.publish(h, dev, XenBusVif.frontendKeys(again))
            #expect(Dom0Harness.wait(d.s.xenstore, state: dev.backendPath, seconds: 10) { $0 == .connected } == .connected)
            #expect(try vifCarriesFrames(again.queues[0], tap: "vif\(h.domid).0"))
            #expect(net.service.deviceNames.count == 2)

            let w = worker.stop()
            #expect(w.failures.isEmpty, "\(w.failures)")
            #expect(w.packets > 0)
            #expect(try vifCarriesFrames(other.queue, tap: other.tapName))
        }

        /// A netfront that starts over while connected (its driver reloaded,
        /// a kexec'd kernel): Initialising takes netback back to InitWait,
        /// letting go of the old rings, and the new rings carry frames, as
        /// Linux netback's frontend_changed does. Before, netback stayed
        /// Connected on the old rings and the vif was dead until Closed.
        @Test func aNetfrontStartingOverWhileConnectedGetsItsNewRings() throws {
            let d = try HostileDom0()
            let net = try HostileNetback(d)
            defer { net.stop() }
            let h = try d.guest("kexeced", pages: XenBusVif.pages(slots: 2))
            let first = try XenBusVif(d, net, guest: h)
            #expect(try vifCarriesFrames(first.queue, tap: first.tapName))
            try h.xenstore.write(first.dev.frontendPath + "/state", "\(XenBus.XenbusState.initialising.rawValue)")
            #expect(Dom0Harness.wait(d.s.xenstore, state: first.dev.backendPath, seconds: 10) { $0 == .initWait } == .initWait)
            net.service.settle()
            let rings = first.front.queues[0].rings
            for r in [rings.txRingRef, rings.rxRingRef] {
                #expect(h.hypervisor.grantTable!.flags(r) & Self.busy == 0, "old ring ref \(r) still mapped")
            }
            let again = try XenBusVif.makeFront(h, slot: 1)
            try again.queues[0].postRx()
            try XenBusVif.publish(h, first.dev, XenBusVif.frontendKeys(again))
            #expect(Dom0Harness.wait(d.s.xenstore, state: first.dev.backendPath, seconds: 10) { $0 == .connected } == .connected)
            #expect(try vifCarriesFrames(again.queues[0], tap: first.tapName))
        }

        @Test func vifRingKeysRewrittenAfterConnectedAreIgnored() throws {
            let d = try HostileDom0()
            let net = try HostileNetback(d)
            defer { net.stop() }
            let h = try d.guest("rewriter", pages: XenBusVif.pages(slots: 2))
            let g = try d.guest("bystander", pages: XenBusVif.pages(slots: 1))
            let other = try XenBusVif(d, net, guest: g)
            let worker = NetWorker(other.queue)
            worker.start()

            let vif = try XenBusVif(d, net, guest: h)
            #expect(try vifCarriesFrames(vif.queue, tap: vif.tapName))
            // A second, valid set of rings and a port to point at.
            let decoy = try XenBusVif.makeFront(h, slot: 1)
            let dr = decoy.queues[0].rings
            guard case .shared(let decoyPort) = dr.events else { Issue.record("decoy has split channels"); return }
            let rewrites: [[String: String]] = [
                ["tx-ring-ref": "abc", "rx-ring-ref": "", "event-channel": "xyz"],
                ["tx-ring-ref": "99999999999", "rx-ring-ref": "4294967295", "event-channel": "4095"],
                ["tx-ring-ref": "\(dr.txRingRef)", "rx-ring-ref": "\(dr.rxRingRef)", "event-channel": "\(decoyPort)"],
                ["multi-queue-num-queues": "1000", "request-rx-copy": "0", "event-channel-tx": "\(decoyPort)"],
            ]
            for keys in rewrites {
                for (k, v) in keys { try h.xenstore.write(vif.dev.frontendPath + "/" + k, v) }
                // The state node rewritten too: netback's watch fires on it.
                try h.xenstore.write(vif.dev.frontendPath + "/state", "\(XenBus.XenbusState.connected.rawValue)")
                try h.xenstore.write(vif.dev.frontendPath + "/state", "\(XenBus.XenbusState.initialised.rawValue)")
                try h.xenstore.write(vif.dev.frontendPath + "/state", "\(XenBus.XenbusState.connected.rawValue)")
                net.service.settle()
                #expect(try d.s.xenstore.state(at: vif.dev.backendPath) == .connected, "\(keys)")
                #expect(try d.s.xenstore.readIfExists(vif.dev.backendPath + "/error") == nil, "\(keys)")
                // Still served on the original rings, never the new ones.
                #expect(try vifCarriesFrames(vif.queue, tap: vif.tapName, n: 2), "\(keys)")
                for r in [dr.txRingRef, dr.rxRingRef] {
                    #expect(h.hypervisor.grantTable!.flags(r) & Self.busy == 0, "\(keys): the rewritten ref \(r) was mapped")
                }
                #expect(try h.hypervisor.status(of: decoyPort) == .unbound(remote: 0), "\(keys): the rewritten port was bound")
            }
            // Closing and Closed still tear down cleanly, releasing the original rings and port.
            try h.xenstore.switchState(at: vif.dev.frontendPath, to: .closing)
            #expect(Dom0Harness.wait(d.s.xenstore, state: vif.dev.backendPath, seconds: 10) { $0 == .closing } == .closing)
            try h.xenstore.switchState(at: vif.dev.frontendPath, to: .closed)
            #expect(Dom0Harness.wait(d.s.xenstore, state: vif.dev.backendPath, seconds: 10) { $0 == .closed } == .closed)
            net.service.settle()
            let rings = vif.queue.rings
            for r in [rings.txRingRef, rings.rxRingRef] {
                #expect(h.hypervisor.grantTable!.endAccess(r), "ring ref \(r) still mapped after Closed")
            }
            if case .shared(let port) = rings.events {
                #expect(try h.hypervisor.status(of: port) == .unbound(remote: 0), "netback kept the event channel bound")
            }
            #expect(net.vif(vif.dev)?.isConnected == false)
            // The toolstack removes the device: its tap goes.
            try d.s.xenstore.destroyDevice(vif.dev)
            #expect(eventually(seconds: 10, every: 1) { if_nametoindex(vif.tapName) == 0 }, "\(vif.tapName) outlived its device")

            let w = worker.stop()
            #expect(w.failures.isEmpty, "\(w.failures)")
            #expect(w.packets > 0)
            #expect(try vifCarriesFrames(other.queue, tap: other.tapName))
        }
    }
}
