import CXen
import Dispatch
import Foundation
import Glibc
import Synchronization
import Testing
@testable import XenHV
import XenRing

@Suite struct EventChannelTests {
    /// Also for a domain whose ports' wake-up sets xenhv makes as the guest's
    /// uid (a toolstack that names its guests' uid range, as xenctl does).
    @Test(arguments: [UInt32(0), 0x7000_0000])
    func notifyWakesThePeerBothWays(guestIDBase: UInt32) throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest(guestIDBase: guestIDBase)
        let port = EventPort(g.send("alloc 0"))!
        #expect(try f.dom0.status(of: port, in: d.domid) == .unbound(remote: 0))
        let ch = try f.dom0.bindInterdomain(remote: d.domid, remotePort: port)
        #expect(try f.dom0.status(of: port, in: d.domid) == .interdomain(remote: 0, remotePort: ch.port))
        #expect(try f.dom0.status(of: ch.port) == .interdomain(remote: d.domid, remotePort: port))
        // Binding conservatively raises the new local port (Xen does the same).
        #expect(ch.consume())
        #expect(!ch.consume())
        g.post("wait \(port)")
        try ch.notify()
        #expect(g.readLine() == "woke")
        #expect(g.send("notify \(port)") == "ok")
        #expect(ch.wait(milliseconds: 10_000))
        #expect(!ch.consume())
    }

    /// Each time the guest rebinds to our port, the next send fetches the new
    /// peer and dup2s it over the same descriptor number (a send racing with a
    /// rebind can never hit a closed and reused number); the channel and
    /// Hypervisor.notify share that one descriptor.
    @Test func sendsFollowRebindsOnOneDescriptor() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        let ours = try f.dom0.allocUnbound(remote: d.domid)
        let ch = try f.dom0.channel(ours)
        #expect(f.dom0.peerDescriptor(ours) === ch.peer, "one send side for the channel and Hypervisor.notify")
        var number: CInt?
        for round in 0..<12 {
            let theirs = EventPort(g.send("bind 0 \(ours)"))!
            g.post("wait \(theirs)")
            if round % 2 == 0 { try ch.notify() } else { try f.dom0.notify(ours) }
            #expect(g.readLine() == "woke")
            g.post("wait \(theirs)")
            if round % 2 == 0 { try f.dom0.notify(ours) } else { try ch.notify() }
            #expect(g.readLine() == "woke")
            if round == 0 { number = ch.peer.descriptor }
            #expect(number != nil && ch.peer.descriptor == number, "round \(round): the same descriptor number")
            #expect(g.send("close \(theirs)") == "ok")
        }
    }

    /// xenhv's descriptors per port: a wake-up set for each port and a send
    /// eventfd for each end of a binding (a kick of its own only once xenhv
    /// has raised the port); a close gives them back.
    @Test func portsCostXenhvOneDescriptorEachAndABindingTwoMore() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        // Event-channel descriptors only (eventfds and epoll sets): xenhv's
        // connections and anything else it opens meanwhile are not counted.
        func xenhvDescriptors() throws -> Int {
            let dir = "/proc/\(f.daemon.pid)/fd"
            return try FileManager.default.contentsOfDirectory(atPath: dir).filter { fd in
                guard let target = try? FileManager.default.destinationOfSymbolicLink(atPath: dir + "/" + fd) else { return false }
                return target == "anon_inode:[eventfd]" || target == "anon_inode:[eventpoll]"
            }.count
        }
        let before = try xenhvDescriptors()
        let offered = try (0..<40).map { _ in try f.dom0.allocUnbound(in: d.domid, remote: 0) }
        #expect(try xenhvDescriptors() == before + 40)
        let bound = try offered.prefix(20).map { try f.dom0.bindInterdomain(remote: d.domid, remotePort: $0) }
        // Per binding: our new port's set, and one send eventfd each way.
        #expect(try xenhvDescriptors() == before + 40 + 20 * 3)
        // The guest's side still wakes on our send (and ours on its).
        g.post("wait \(offered[0])")
        try bound[0].notify()
        #expect(g.readLine() == "woke")
        for ch in bound { try ch.close() }
        // Back to the guest's 40 (unbound again; a close does not raise the peer, as on Xen).
        #expect(try xenhvDescriptors() == before + 40)
    }

    @Test func maskedEventIsDeliveredOnUnmask() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        let port = EventPort(g.send("alloc 0"))!
        let ch = try f.dom0.bindInterdomain(remote: d.domid, remotePort: port)
        _ = ch.consume()
        ch.mask()
        #expect(g.send("notify \(port)") == "ok")
        // The kick arrived (the guest replied after sending): it becomes pending, not delivered.
        #expect(!ch.consume())
        #expect(f.dom0.sharedInfo.isPending(ch.port))
        ch.unmask()
        #expect(ch.wait(milliseconds: 10_000))
        #expect(!f.dom0.sharedInfo.isPending(ch.port))
    }

    @Test func portsBeyondTheLimitGetXensErrors() throws {
        let f = try HypervisorFixture()
        let (d, _) = try f.guest()
        #expect(throws: XenErrno.EINVAL) { try f.dom0.bindInterdomain(remote: d.domid, remotePort: 4097) }
        #expect(throws: XenErrno.EINVAL) { try f.dom0.status(of: 4097, in: d.domid) }
        #expect(throws: XenErrno.EINVAL) { try f.dom0.notify(4097) }
        #expect(throws: XenErrno.EINVAL) { try f.dom0.bindInterdomain(remote: d.domid, remotePort: 0) }
        // A port that is not offered to us.
        let p = try f.dom0.allocUnbound(in: d.domid, remote: 5)
        #expect(throws: XenErrno.EINVAL) { try f.dom0.bindInterdomain(remote: d.domid, remotePort: p) }
        // Fill the guest's 4095 usable ports (store, console and `p` are taken).
        var last: EventPort = 0
        for _ in 0..<4092 { last = try f.dom0.allocUnbound(in: d.domid, remote: 0) }
        #expect(last == 4095)
        #expect(throws: XenErrno.ENOSPC) { try f.dom0.allocUnbound(in: d.domid, remote: 0) }
        #expect(throws: XenErrno.ESRCH) { try f.dom0.allocUnbound(in: 4000, remote: 0) }
    }

    /// XEN_DOMCTL_set_max_evtchn: the domain's ports stop at the limit
    /// (ENOSPC past it, for the guest itself as for dom0 on its behalf), the
    /// ports it already holds stay when it is lowered, and only dom0 may set it.
    @Test func theToolstacksPortLimitBoundsADomain() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        // store and console hold ports 1 and 2.
        try f.dom0.setMaxEventChannels(d.domid, 5)
        #expect(try f.dom0.allocUnbound(in: d.domid, remote: 0) == 3)
        #expect(g.send("alloc 0") == "4")
        #expect(try f.dom0.allocUnbound(in: d.domid, remote: 0) == 5)
        #expect(throws: XenErrno.ENOSPC) { try f.dom0.allocUnbound(in: d.domid, remote: 0) }
        #expect(g.send("alloc 0").contains("ENOSPC"))
        // The guest binding to a port of ours takes one of its own.
        let ours = try f.dom0.allocUnbound(in: 0, remote: d.domid)
        #expect(g.send("bind 0 \(ours)").contains("ENOSPC"))
        try f.dom0.setMaxEventChannels(d.domid, 6)
        #expect(g.send("bind 0 \(ours)") == "6")
        // Lowered below what it holds: the held ports stay, nothing new is given.
        try f.dom0.setMaxEventChannels(d.domid, 1)
        #expect(try f.dom0.status(of: 5, in: d.domid) == .unbound(remote: 0))
        #expect(g.send("close 4") == "ok")
        #expect(throws: XenErrno.ENOSPC) { try f.dom0.allocUnbound(in: d.domid, remote: 0) }
        // Past the ABI it is the ABI's 4095.
        try f.dom0.setMaxEventChannels(d.domid, 100_000)
        #expect(try f.dom0.allocUnbound(in: d.domid, remote: 0) == 4)
        #expect(g.send("setmax \(d.domid) 4095").contains("EPERM"))
        #expect(throws: XenErrno.ESRCH) { try f.dom0.setMaxEventChannels(999, 5) }
    }

    @Test func destroyingADomainTellsItsPeers() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        let virq = try f.dom0.bindVirq(UInt32(VIRQ_DOM_EXC))
        #expect(try f.dom0.status(of: virq.port) == .virq(UInt32(VIRQ_DOM_EXC)))
        let store = try f.dom0.bindInterdomain(remote: d.domid, remotePort: d.storePort)
        _ = store.consume()
        #expect(g.send("info").contains("store_port \(d.storePort)"))
        #expect(try f.dom0.listDomains().map(\.domid) == [0, d.domid])
        try f.dom0.destroyDomain(d.domid)
        #expect(virq.wait(milliseconds: 10_000))
        #expect(store.wait(milliseconds: 10_000))
        #expect(try f.dom0.status(of: store.port) == .unbound(remote: d.domid))
        #expect(try f.dom0.listDomains().map(\.domid) == [0])
        g.reap()  // the guest process was killed with its domain
        #expect(throws: XenErrno.ESRCH) { try f.dom0.destroyDomain(d.domid) }
    }

    @Test func pauseAndUnpause() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        try f.dom0.pauseDomain(d.domid)
        #expect(try f.dom0.listDomains().first { $0.domid == d.domid }?.stateLetters == "--p---")
        try f.dom0.unpauseDomain(d.domid)
        #expect(try f.dom0.listDomains().first { $0.domid == d.domid }?.stateLetters == "r-----")
        #expect(g.send("info").hasPrefix("domid \(d.domid)"))
    }

    /// SCHEDOP_shutdown: the reason is recorded once (xc_domaininfo's
    /// shutdown_reason), VIRQ_DOM_EXC is raised, a reason past SHUTDOWN_MAX is
    /// -EINVAL, and the guest exiting afterwards is no crash.
    @Test func shutdownRecordsTheReason() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        let virq = try f.dom0.bindVirq(UInt32(VIRQ_DOM_EXC))
        _ = virq.consume()
        #expect(g.send("shutdown \(SHUTDOWN_MAX + 1)").contains("EINVAL"))
        #expect(try f.dom0.listDomains().first { $0.domid == d.domid }?.stateLetters == "r-----")
        #expect(g.send("shutdown \(SHUTDOWN_reboot)") == "ok")
        #expect(virq.wait(milliseconds: 10_000))
        var info = try f.dom0.listDomains().first { $0.domid == d.domid }
        #expect(info?.stateLetters == "---s--" && info?.shutdownReason == .reboot && info?.isShutdown == true)
        // The first reason stays, as on Xen.
        #expect(g.send("shutdown \(SHUTDOWN_crash)") == "ok")
        _ = g.send("exit")
        g.reap()
        info = try f.dom0.listDomains().first { $0.domid == d.domid }
        #expect(info?.stateLetters == "---s--" && info?.shutdownReason == .reboot)
        let running = try f.dom0.listDomains().first { $0.domid == 0 }
        #expect(running?.shutdownReason == nil && running?.isShutdown == false)
        try f.dom0.renameDomain(d.domid, to: "renamed")
        #expect(try f.dom0.listDomains().first { $0.domid == d.domid }?.name == "renamed")
        let (_, other) = try f.guest(name: "other")
        #expect(throws: XenErrno.EEXIST) { try f.dom0.renameDomain(d.domid, to: "other") }
        _ = other
        try f.dom0.destroyDomain(d.domid)
    }

    @Test func startInfoIsWhatTheBuilderWrote() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest(pages: 256)
        let info = g.send("info")
        #expect(info == "domid \(d.domid) pages 256 store_mfn \(d.storeMFN) store_port \(d.storePort) magic xen-3.0-x86_64")
        #expect(d.storeMFN == 254)
        #expect(throws: XenErrno.EEXIST) { try f.dom0.createDomain(pages: 64, name: "guest") }
        #expect(throws: XenErrno.EINVAL) { try f.dom0.createDomain(pages: 2, name: "tiny") }
    }
}

@Suite struct RingOverGrantTests {
    @Test func lyingProducerIsReportedAndTheConsumerSurvives() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        for (ref, frame) in [(7, 12), (8, 13)] {
            #expect(g.send("ring-init \(frame)") == "ok")
            #expect(g.send("grant \(ref) 0 \(frame) rw") == "ok")
        }
        let m1 = try f.dom0.mapGrant(domid: d.domid, ref: 7, writable: true).get()
        let m2 = try f.dom0.mapGrant(domid: d.domid, ref: 8, writable: true).get()
        var back = BackRing(attaching: try m1.region.ring(BlkifRing.self, pages: 1))
        #expect(g.send("ring-push 12 3") == "notify")
        var ids: [UInt64] = []
        try back.consumeRequests { ids.append($0.id) }
        #expect(ids == [0, 1, 2])
        for id in ids { var r = blkif_response(); r.id = id; back.enqueue(r) }
        _ = back.pushResponsesAndCheckNotify()

        #expect(g.send("ring-lie 12 1000") == "ok")
        #expect(throws: RingError.requestProducerOverflow(reqProd: 1000, rspProdPvt: 3, size: 32)) {
            try back.unconsumedRequests()
        }
        #expect(throws: RingError.self) { try back.consumeRequests { _ in Issue.record("consumed a bogus request") } }
        // The consumer lives on and serves another guest ring.
        var other = BackRing(attaching: try m2.region.ring(BlkifRing.self, pages: 1))
        #expect(g.send("ring-push 13 32") == "notify")
        #expect(try other.consumeRequests { _ in } == 32)
        #expect(g.send("ring-push 13 1") == "full")
        f.dom0.unmapGrant(m1)
        f.dom0.unmapGrant(m2)
    }
}

@Suite struct DetachedThreadTests {
    /// A named thread shows its name where top -H and perf read it.
    @Test func aDetachedThreadCarriesItsName() throws {
        let seen = Mutex<String?>(nil)
        let done = DispatchSemaphore(value: 0)
        DetachedThread.start(name: "vbd12345q0-and-more") {
            let comm = try? String(contentsOfFile: "/proc/thread-self/comm", encoding: .utf8)
            seen.withLock { $0 = comm?.trimmingCharacters(in: .whitespacesAndNewlines) }
            done.signal()
        }
        #expect(done.wait(timeout: .now() + 10) == .success)
        #expect(seen.withLock { $0 } == "vbd12345q0-and-")  // the kernel keeps 15 bytes
    }

    /// A drain of a descriptor another holder shares never blocks, whatever
    /// mode the descriptor is in.
    @Test func eventfdDrainNeverBlocksOnABlockingDescriptor() throws {
        let fd = cxen_eventfd(0, Int32(O_CLOEXEC))  // blocking, as a hostile holder can make it
        #expect(fd >= 0)
        defer { close(fd) }
        #expect(cxen_evtfd_drain(fd) == 0)  // empty: returns at once
        var one: UInt64 = 1
        #expect(write(fd, &one, 8) == 8 && write(fd, &one, 8) == 8)
        #expect(cxen_evtfd_drain(fd) == 2)
        var ceiling: UInt64 = 0xFFFF_FFFF_FFFF_FFFD
        #expect(write(fd, &ceiling, 8) == 8)
        #expect(cxen_evtfd_drain(fd) == ceiling)
        #expect(cxen_evtfd_drain(fd) == 0)
    }

    /// Making a wake-up set as a guest's uid (the kernel charges its watches
    /// to that user) leaves the thread as it was: real, effective and saved uid.
    @Test func aSetMadeAsTheGuestLeavesTheThreadsIDs() {
        /// This thread's real, effective, saved and filesystem uids.
        func ids() -> String {
            ((try? String(contentsOfFile: "/proc/thread-self/status", encoding: .utf8)) ?? "")
                .split(separator: "\n").first { $0.hasPrefix("Uid:") }.map(String.init) ?? "?"
        }
        let before = ids()
        let fd = cxen_wake_create_as(0x7000_7777)
        let after = ids()
        #expect(fd >= 0 && after == before && before != "?", "\(after) after, \(before) before")
        if fd >= 0 { close(fd) }
    }
}
