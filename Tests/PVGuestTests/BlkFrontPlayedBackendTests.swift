import Foundation
import Glibc
import Synchronization
import Testing
import PVGuest
import XenBus
import XenHV
import XenStore
import XenTestKit

/// pvguest's blkfront against a backend the test plays over dom0's
/// xenstore, so a handshake can be refused at will, with or without a ring
/// mapped, and the backend's keys can lie. Its ring pages go back to the
/// guest whenever a handshake fails, and never a page the backend still maps
/// (Linux's blkfront frees a ring only after gnttab_end_foreign_access).
@Suite struct BlkFrontPlayedBackendTests {
    /// One vbd offering two queues of order-1 rings, and the guest's side of
    /// it in this process (its page pool and grant refs, to count with).
    final class PlayedDisk: @unchecked Sendable {
        let dom0: Dom0Harness
        let guest: Dom0Harness.Guest
        let be: String, fe: String
        /// The backend's own connections.
        let bx: XenBusClient
        let hv0: Hypervisor
        let pages: GuestPages
        let grants: GrantRefs

        init(_ name: String, sectors: String = "2048", keys: [String: String] = [:]) throws {
            dom0 = try Dom0Harness(buildDirectory: Dom0Harness.buildDirectory(packageRoot: DiskPathTests.root))
            guest = try dom0.createGuest(name: name, pages: 8192)
            let dev = XenBusDevice(type: "vbd", frontendDomid: XenStore.DomID(guest.domid), devid: 51712)
            try dom0.xenstore.createDevice(dev, backend: ["max-ring-page-order": "1", "multi-queue-max-queues": "2",
                                                          "sectors": sectors, "info": "0", "sector-size": "512"]
                                                .merging(keys) { $1 },
                                           frontend: ["virtual-device": "51712", "device-type": "disk"])
            be = dev.backendPath
            fe = dev.frontendPath
            bx = try dom0.dom0XenStore()
            hv0 = try dom0.dom0Hypervisor()
            pages = try GuestPages(hypervisor: guest.hypervisor)
            grants = try GrantRefs(hypervisor: guest.hypervisor)
            try bx.switchState(at: be, to: .initWait)
        }

        func connect() throws -> BlkFrontDevice {
            let (bx, fe, be) = (bx, fe, be)
            Thread {
                _ = bx.awaitState(at: fe, seconds: 20) { $0 == .initialised }
                try? bx.switchState(at: be, to: .connected)
            }.start()
            return try BlkFrontDevice(hypervisor: guest.hypervisor, xenstore: guest.xenstore, frontendPath: fe,
                                      pages: pages, grants: grants, ringPageOrder: 1, queues: 2)
        }

        /// Waits for the frontend's `state`, then moves the backend to `next`.
        func answer(_ state: XenBus.XenbusState, with next: XenBus.XenbusState, sourceLocation: SourceLocation = #_sourceLocation) throws {
            let seen = bx.awaitState(at: fe, seconds: 20) { $0 == state }
            #expect(seen == state, "the frontend did not go \(state)", sourceLocation: sourceLocation)
            try bx.switchState(at: be, to: next)
        }

        /// An outage as a restarted backend plays it: Closing, then Closed
        /// and InitWait as the frontend closes and starts over.
        func restartBackend(sourceLocation: SourceLocation = #_sourceLocation) throws {
            try bx.switchState(at: be, to: .closing)
            try answer(.closed, with: .closed, sourceLocation: sourceLocation)
            try answer(.initialising, with: .initWait, sourceLocation: sourceLocation)
        }

        /// Maps queue 0's first ring page as the backend would.
        func mapQueue0Ring() throws -> GrantMapping {
            let ref = try #require(GrantRef(try bx.read(fe + "/queue-0/ring-ref0")))
            return try hv0.mapGrant(domid: guest.domid, ref: ref, writable: true).get()
        }
    }

    /// Two outages. In the first the backend refuses the first reconnect
    /// attempt: the rings it reused are the next attempt's again, and the
    /// guest ends with every page it had. In the second the backend maps
    /// queue 0's ring and then refuses: that ring stays out of use (2 pages),
    /// queue 1's goes back, and the next attempt takes new pages.
    @Test(.timeLimit(.minutes(2)))
    func aRefusedReconnectAttemptKeepsTheRingPagesAndAMappedRingStaysOutOfUse() throws {
        let p = try PlayedDisk("bfring")
        let disk = try p.connect()
        var mapping: GrantMapping?
        defer {
            if let m = mapping { _ = p.hv0.unmapGrant(m) }
            try? p.bx.switchState(at: p.be, to: .closed)
            disk.close()
        }
        let connected = p.pages.available

        try p.restartBackend()
        try p.answer(.initialised, with: .closed)  // refused
        try p.answer(.initialising, with: .initWait)
        try p.answer(.initialised, with: .connected)
        #expect(eventually { disk.recoveries == 1 })
        #expect(p.pages.available == connected,
                "a refused attempt cost the guest \(connected - p.pages.available) pages (its reused rings)")

        try p.restartBackend()
        #expect(p.bx.awaitState(at: p.fe, seconds: 20) { $0 == .initialised } == .initialised)
        mapping = try p.mapQueue0Ring()
        try p.bx.switchState(at: p.be, to: .closed)  // refused, with the ring mapped
        try p.answer(.initialising, with: .initWait)
        try p.answer(.initialised, with: .connected)
        #expect(eventually { disk.recoveries == 2 })
        #expect(p.pages.available == connected - 2,
                "with one 2-page ring still mapped the guest has \(connected - p.pages.available) pages fewer")
    }

    /// A first handshake refused after the backend mapped a ring: the device
    /// is not made, and everything it took goes back except that ring.
    @Test(.timeLimit(.minutes(2)))
    func aRefusedFirstHandshakeFreesNoRingTheBackendMaps() throws {
        let p = try PlayedDisk("bfinit")
        let before = p.pages.available
        let mapped = Mutex<GrantMapping?>(nil)
        defer { if let m = mapped.withLock({ $0 }) { _ = p.hv0.unmapGrant(m) } }
        Thread {
            guard p.bx.awaitState(at: p.fe, seconds: 20, { $0 == .initialised }) != nil else { return }
            let m = try? p.mapQueue0Ring()
            mapped.withLock { $0 = m }
            try? p.bx.switchState(at: p.be, to: .closing)
        }.start()
        #expect(throws: (any Error).self) {
            _ = try BlkFrontDevice(hypervisor: p.guest.hypervisor, xenstore: p.guest.xenstore, frontendPath: p.fe,
                                   pages: p.pages, grants: p.grants, ringPageOrder: 1, queues: 2)
        }
        #expect(mapped.withLock { $0 } != nil, "the backend did not map the ring")
        #expect(p.pages.available == before - 2,
                "the guest has \(before - p.pages.available) pages fewer (2: the ring the backend maps)")
    }

    /// A size that does not fit 64 bits in bytes is refused, not multiplied
    /// (the trap took the whole guest process, every disk and NIC with it),
    /// and the device gives back everything it took.
    @Test(.timeLimit(.minutes(2)))
    func aBackendReportingAnImpossibleSizeIsRefused() throws {
        let p = try PlayedDisk("bfsize", sectors: "\(UInt64.max)")
        let before = p.pages.available
        #expect(throws: HypervisorError.self) { _ = try p.connect() }
        #expect(p.pages.available == before)
        try p.bx.write(p.be + "/sectors", "\(UInt64.max / 512)")
        try p.bx.switchState(at: p.be, to: .initWait)
        try p.bx.switchState(at: p.fe, to: .initialising)
        let disk = try p.connect()
        defer {
            try? p.bx.switchState(at: p.be, to: .closed)
            disk.close()
        }
        #expect(disk.size == UInt64.max / 512 * 512)
    }

    /// What one 4 KiB read at 0 completed with (nil: success).
    static func readStatus(_ disk: BlkFrontDevice) -> Int32? {
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        let done = DispatchSemaphore(value: 0)
        let status = Mutex<Int32?>(nil)
        disk.read(at: 0, into: buf) { e in status.withLock { $0 = e }; done.signal() }
        // Unanswered, the buffer is left to the read (it may yet be filled).
        guard done.wait(timeout: .now() + 20) == .success else {
            Issue.record("the read was never answered")
            return -1
        }
        buf.deallocate()
        return status.withLock { $0 }
    }

    /// A backend that comes back with less than the device was set up for
    /// (here a lower ring order), without the cache flush it offered,
    /// read-only or with larger sectors, fails the disk with EIO: before, the frontend retried a handshake that could
    /// not work every second for ever while every request waited, and a flush
    /// gone would have acknowledged FUA writes that never reached the disk.
    @Test(.timeLimit(.minutes(2)))
    func aBackendBackWithLessFailsTheDiskInsteadOfRetryingForEver() throws {
        let order = try PlayedDisk("bforder")
        let a = try order.connect()
        defer { a.close() }
        try order.bx.write(order.be + "/max-ring-page-order", "0")
        try order.restartBackend()
        #expect(Self.readStatus(a) == EIO)
        #expect(a.recoveries == 0)

        let flush = try PlayedDisk("bfflush", keys: ["feature-flush-cache": "1"])
        let b = try flush.connect()
        defer { b.close() }
        #expect(b.canFlush)
        try flush.bx.rm(flush.be + "/feature-flush-cache")
        try flush.restartBackend()
        try flush.answer(.initialised, with: .connected)
        #expect(Self.readStatus(b) == EIO)
        #expect(b.recoveries == 0)

        // The same for a disk now read-only, or now with 4 KiB sectors.
        // Before, the export went on taking writes (each failed by the
        // backend), or sending 512-byte-aligned requests.
        for (name, key, value) in [("bfro", "info", "4"), ("bfsector", "sector-size", "4096")] {
            let disk = try PlayedDisk(name)
            let d = try disk.connect()
            defer { d.close() }
            try disk.bx.write(disk.be + "/" + key, value)
            try disk.restartBackend()
            try disk.answer(.initialised, with: .connected)
            #expect(Self.readStatus(d) == EIO, "\(key) \(value)")
            #expect(d.recoveries == 0, "\(key) \(value)")
        }
    }

    /// A backend back from an outage without `feature-discard` gets no more
    /// discards (Linux re-reads it on reconnect): a trim is refused here,
    /// ENOTSUP, instead of going to a backend that fails it. Before, the
    /// offer of the first connection held for good.
    @Test(.timeLimit(.minutes(2)))
    func aBackendBackWithoutDiscardGetsNoMoreTrims() throws {
        let p = try PlayedDisk("bftrim", keys: ["feature-discard": "1"])
        let disk = try p.connect()
        defer {
            try? p.bx.switchState(at: p.be, to: .closed)
            disk.close()
        }
        #expect(disk.canTrim)
        try p.bx.rm(p.be + "/feature-discard")
        try p.restartBackend()
        try p.answer(.initialised, with: .connected)
        #expect(eventually { disk.recoveries == 1 })
        #expect(!disk.canTrim)
        let result = Mutex<Int32??>(nil)
        let done = DispatchSemaphore(value: 0)
        disk.trim(at: 0, length: 4096) { e in
            result.withLock { $0 = .some(e) }
            done.signal()
        }
        #expect(done.wait(timeout: .now() + 10) == .success)
        #expect(result.withLock { $0 } == .some(95), "ENOTSUP")
    }
}
