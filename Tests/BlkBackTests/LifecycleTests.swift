@testable import BlkBack
import BlkFrontKit
import CXen
import Glibc
import Testing
import XenHV
import XenRing

extension BlkBackIntegration {
    /// Persistent grants, queues, several disks and guests, resize, and detach.
    @Suite struct LifecycleTests {
        @Test func persistentGrantsAreMappedOnceAndReused() throws {
            let s = try DataPathTests.setup(bytes: 1 << 20)
            let b = try s.front.makeBuffer(pages: 4)
            for i in 0..<50 {
                try s.front.fill(b, with: pattern(4 * 4096, seed: UInt8(i)))
                let w = try s.front.roundTrip(s.front.rwRequest(BlkifOp.write, sector: UInt64(i % 8) * 32, buffer: b, bytes: 4 * 4096))
                #expect(w.status == 0)
            }
            // Four pages, four persistent grants: nothing was mapped per request.
            #expect(s.device.persistentGrants == 4)
            // Kept mapped between requests: the guest cannot revoke them while connected.
            #expect(!s.front.endAccess(b.refs[0]))
            s.device.disconnect()
            #expect(s.device.persistentGrants == 0)
            for r in b.refs { #expect(s.front.endAccess(r)) }
        }

        @Test func withoutPersistentGrantsEveryPageIsUnmappedAfterItsRequest() throws {
            let s = try DataPathTests.setup(bytes: 1 << 20, persistent: false)
            let b = try s.front.makeBuffer(pages: 3)
            let d = pattern(3 * 4096, seed: 21)
            try s.front.fill(b, with: d)
            #expect(try s.front.roundTrip(s.front.rwRequest(BlkifOp.write, sector: 0, buffer: b, bytes: d.count)).status == 0)
            #expect(s.device.persistentGrants == 0)
            // The response means the backend let go of the pages.
            for r in b.refs { #expect(s.front.endAccess(r)) }
            #expect(fileBytes(s.image, offset: 0, count: d.count) == d)
        }

        @Test func theBoundHoldsKeptGrantsStayAndDataStaysRight() throws {
            let s = try DataPathTests.setup(bytes: 1 << 20, limit: 4, purgeMilliseconds: 3_600_000)
            var bufs: [BlkFront<BlkifRing>.Buffer] = []
            for i in 0..<8 {
                let b = try s.front.makeBuffer(pages: 1)
                try s.front.fill(b, with: pattern(4096, seed: UInt8(40 + i)))
                bufs.append(b)
            }
            for round in 0..<3 {
                for (i, b) in bufs.enumerated() {
                    let r = try s.front.roundTrip(s.front.rwRequest(BlkifOp.write, sector: UInt64(i) * 8, buffer: b, bytes: 4096))
                    #expect(r.status == 0)
                    #expect(s.device.persistentGrants <= 4, "round \(round)")
                }
            }
            #expect(s.device.persistentGrants == 4)
            // The first four stay persistent (still mapped: the guest cannot revoke
            // them); the other four went through bounce pages (grant copy), never kept mapped.
            for b in bufs.prefix(4) { #expect(!s.front.endAccess(b.refs[0])) }
            for b in bufs.suffix(4) { #expect(s.front.endAccess(b.refs[0])) }
            for i in 0..<8 { #expect(fileBytes(s.image, offset: i * 4096, count: 4096) == pattern(4096, seed: UInt8(40 + i))) }
        }

        /// Beyond the bound, data moves through bounce pages by grant copy, both
        /// ways, also for partial pages and indirect requests, and the guest
        /// can revoke those grants as soon as the response is there.
        @Test func beyondTheBoundBouncePagesCarryTheRightBytes() throws {
            // No purge during the test (a slow run would otherwise drop a kept grant).
            let s = try DataPathTests.setup(bytes: 4 << 20, limit: 2, purgeMilliseconds: 3_600_000)
            let keep = try (0..<2).map { _ in try s.front.makeBuffer(pages: 1) }
            for b in keep { #expect(try s.front.roundTrip(s.front.rwRequest(BlkifOp.read, sector: 0, buffer: b, bytes: 4096)).status == 0) }
            #expect(s.device.persistentGrants == 2)
            // Direct (3 pages), partial (1.5 KiB) and indirect (20 pages) writes, each beyond the bound.
            for (sector, pages, bytes, seed) in [(64, 3, 3 * 4096, 7), (200, 1, 1536, 8), (400, 20, 20 * 4096, 9)] {
                let d = pattern(bytes, seed: UInt8(seed))
                let w = try s.front.makeBuffer(pages: pages)
                try s.front.fill(w, with: d)
                #expect(try s.front.roundTrip(s.front.rwRequest(BlkifOp.write, sector: UInt64(sector), buffer: w, bytes: bytes)).status == 0)
                for r in w.refs { #expect(s.front.endAccess(r)) }
                #expect(fileBytes(s.image, offset: sector * 512, count: bytes) == d)
                // Read back into fresh pages, also through bounce pages.
                let r = try s.front.makeBuffer(pages: pages)
                #expect(try s.front.roundTrip(s.front.rwRequest(BlkifOp.read, sector: UInt64(sector), buffer: r, bytes: bytes)).status == 0)
                #expect(try s.front.contents(r, count: bytes) == d)
                for g in r.refs { #expect(s.front.endAccess(g)) }
            }
            #expect(s.device.persistentGrants == 2)
            // A READ into a page granted read-only still fails, and the ring goes on.
            let ro = try s.front.makeBuffer(pages: 1, readOnly: true)
            #expect(try s.front.roundTrip(s.front.rwRequest(BlkifOp.read, sector: 0, buffer: ro, bytes: 4096)).status == Int16(BLKIF_RSP_ERROR))
            #expect(try s.front.read(sector: 64, bytes: 4096).data == pattern(3 * 4096, seed: 7).prefix(4096).map { $0 })
            // Every data segment past the two kept pages was bounced (24 written, 24 read, 1 refused
            // read, 1 last read).
            #expect(s.device.stats.bouncedSegments == 50)
        }

        /// A new working set gets its turn: grants unused for a whole purge
        /// period (100 ms) are unmapped and the new pages become persistent.
        @Test func unusedPersistentGrantsArePurgedForANewWorkingSet() throws {
            let s = try DataPathTests.setup(bytes: 1 << 20, limit: 4)
            let old = try (0..<4).map { _ in try s.front.makeBuffer(pages: 1) }
            let new = try (0..<4).map { _ in try s.front.makeBuffer(pages: 1) }
            for b in old { #expect(try s.front.roundTrip(s.front.rwRequest(BlkifOp.read, sector: 0, buffer: b, bytes: 4096)).status == 0) }
            #expect(s.device.persistentGrants == 4)
            // Only the new set is used from now on; wait (with a deadline) until it is the persistent one.
            var rounds = 0
            var kept = false
            while !kept && rounds < 5_000 {
                for b in new { #expect(try s.front.roundTrip(s.front.rwRequest(BlkifOp.read, sector: 8, buffer: b, bytes: 4096)).status == 0) }
                kept = s.device.persistentGrants == 4 && old.allSatisfy { s.front.endAccess($0.refs[0]) }
                if !kept { usleep(1000) }
                rounds += 1
            }
            #expect(kept)
            for b in new { #expect(!s.front.endAccess(b.refs[0])) }
        }

        @Test func twoQueuesServeIndependently() throws {
            let s = try DataPathTests.setup(bytes: 4 << 20, queues: 2, order: 1)
            let a = pattern(8192, seed: 31), b = pattern(8192, seed: 32)
            let ba = try s.front.makeBuffer(pages: 2), bb = try s.front.makeBuffer(pages: 2)
            try s.front.fill(ba, with: a)
            try s.front.fill(bb, with: b)
            // Both in flight at once, one per queue.
            try s.front.push(s.front.rwRequest(BlkifOp.write, sector: 0, buffer: ba, bytes: 8192), queue: 0)
            try s.front.push(s.front.rwRequest(BlkifOp.write, sector: 16, buffer: bb, bytes: 8192), queue: 1)
            #expect(try s.front.waitResponse(queue: 0).status == 0)
            #expect(try s.front.waitResponse(queue: 1).status == 0)
            #expect(fileBytes(s.image, offset: 0, count: 8192) == a)
            #expect(fileBytes(s.image, offset: 16 * 512, count: 8192) == b)
            #expect(try s.front.read(sector: 16, bytes: 8192, queue: 0) == (0, b))
            #expect(try s.front.read(sector: 0, bytes: 8192, queue: 1) == (0, a))
            #expect(s.device.stats.writeRequests == 2 && s.device.stats.readRequests == 2)
        }

        @Test func onlineResizeMakesTheNewSizeVisible() throws {
            let s = try DataPathTests.setup(bytes: 1 << 20)
            #expect(s.device.sectors == 2048)
            #expect(try s.front.read(sector: 2048, bytes: 4096).status == BlkifStatus.error.rawValue)
            #expect(truncate(s.image, 2 << 20) == 0)
            #expect(try s.device.resize() == 4096)
            #expect(s.device.features.sectors == 4096)
            let d = pattern(4096, seed: 50)
            #expect(try s.front.write(sector: 4088, d) == 0)
            #expect(try s.front.read(sector: 4088, bytes: 4096) == (0, d))
        }

        /// Disconnect releases every mapping (the guest can revoke every grant),
        /// every port (the frontend's port is no longer bound), every aio
        /// context, and close releases every descriptor the device had.
        @Test func detachReleasesEveryMappingPortAndDescriptor() throws {
            let f = try BlkFixture()
            let image = try f.image(bytes: 4 << 20)
            let g = try f.guest()
            let front = try BlkFront<BlkifRing>(guest: g, queues: 2, ringPageOrder: 2)
            let dev = try VirtualBlockDevice(name: "vbd-detach", backing: BackingOptions(path: image), maxQueues: 2, logger: quietLogger)
            try dev.connect(hypervisor: f.dom0, frontend: front.config())
            #expect(dev.isConnected)
            // One aio context per queue, each a live [aio] mapping of ours.
            let ours = dev.aioContextsForTesting
            let live = aioContexts()
            let identities = ours.map { (address: $0, inode: live[$0]) }
            #expect(ours.count == 2 && identities.allSatisfy { $0.inode != nil }, "\(ours) in \(live)")
            var refs: [GrantRef] = []
            for q in 0..<2 {
                let b = try front.makeBuffer(pages: 20)  // indirect
                try front.fill(b, with: pattern(20 * 4096, seed: UInt8(q)))
                #expect(try front.roundTrip(front.rwRequest(BlkifOp.write, sector: UInt64(q) * 160, buffer: b, bytes: 20 * 4096), queue: q).status == 0)
                refs += b.refs
            }
            for q in 0..<2 {
                guard case .interdomain = try g.status(of: front.queues[q].port) else {
                    Issue.record("queue \(q) port not bound")
                    continue
                }
            }
            #expect(!front.endAccess(front.queues[0].ringRefs[0]))
            let fds = dev.descriptorsForTesting
            #expect(fds.count == 2 + 2 * 3)  // O_DIRECT + buffered image; per queue: channel, aio eventfd, control
            // Our own reference to each open file, so a number reused by another
            // suite's new descriptor (even an eventfd with the same id) is told apart.
            let held = fds.map { fcntl($0, F_DUPFD_CLOEXEC, 0) }
            defer { for h in held where h >= 0 { close(h) } }
            #expect(held.allSatisfy { $0 >= 0 })
            // A port's eventfd is xenhv's too: once closed here, the guest half of
            // this process may receive the same file again from xenhv, even under
            // the same number. Its release shows in the port's status below instead.
            let channelFDs = Set(dev.channelDescriptorsForTesting)
            #expect(channelFDs.count == 2 && channelFDs.isSubset(of: fds))

            dev.disconnect()
            #expect(!dev.isConnected)
            // Our contexts are destroyed (their address may hold another test's new one).
            let after = aioContexts()
            for c in identities { #expect(after[c.address] != c.inode, "aio context \(c.address) still set up") }
            for q in 0..<2 {
                for r in front.queues[q].ringRefs { #expect(front.endAccess(r)) }
                #expect(try g.status(of: front.queues[q].port) == .unbound(remote: 0))
            }
            for r in refs { #expect(front.endAccess(r)) }
            dev.close()
            // Each descriptor is closed, or its number now belongs to something else.
            for (fd, h) in zip(fds, held) where !channelFDs.contains(fd) {
                #expect(cxen_same_file(fd, h) != 1, "descriptor \(fd) still open")
            }
            #expect(dev.stats.writeRequests == 2)
        }

        @Test func reconnectAfterDisconnect() throws {
            let f = try BlkFixture()
            let image = try f.image(bytes: 1 << 20)
            let g = try f.guest()
            let dev = try VirtualBlockDevice(name: "vbd-re", backing: BackingOptions(path: image), logger: quietLogger)
            let front1 = try BlkFront<BlkifRing>(guest: g)
            try dev.connect(hypervisor: f.dom0, frontend: front1.config())
            let a = pattern(4096, seed: 60)
            #expect(try front1.write(sector: 0, a) == 0)
            dev.disconnect()
            // The frontend comes back with a new ring (Closed -> Initialising), in the other ABI.
            let front2 = try BlkFront<BlkifX86_32Ring>(guest: g, firstFrame: 1024, firstRef: 2000)
            try dev.connect(hypervisor: f.dom0, frontend: front2.config())
            #expect(try front2.read(sector: 0, bytes: 4096) == (0, a))
            #expect(dev.stats.writeRequests == 1 && dev.stats.readRequests == 1)
        }

        /// One backend process, two guests with two disks each, all at once.
        @Test func severalDisksPerGuestAndSeveralGuests() throws {
            let f = try BlkFixture()
            var devices: [VirtualBlockDevice] = []
            var fronts: [BlkFront<BlkifRing>] = []
            var images: [String] = []
            for gi in 0..<2 {
                let g = try f.guest(name: "guest\(gi)")
                for di in 0..<2 {
                    let img = try f.image("d\(gi)-\(di).img", bytes: 1 << 20)
                    let dev = try VirtualBlockDevice(name: "vbd-\(gi)-\(di)", backing: BackingOptions(path: img), logger: quietLogger)
                    let front = try BlkFront<BlkifRing>(guest: g, firstFrame: UInt32(16 + di * 512), firstRef: GrantRef(8 + di * 1000))
                    try dev.connect(hypervisor: f.dom0, frontend: front.config())
                    devices.append(dev)
                    fronts.append(front)
                    images.append(img)
                }
            }
            var bufs: [BlkFront<BlkifRing>.Buffer] = []
            for (i, front) in fronts.enumerated() {
                let b = try front.makeBuffer(pages: 2)
                try front.fill(b, with: pattern(8192, seed: UInt8(70 + i)))
                try front.push(front.rwRequest(BlkifOp.write, sector: 8, buffer: b, bytes: 8192))
                bufs.append(b)
            }
            for front in fronts { #expect(try front.waitResponse().status == 0) }
            for (i, img) in images.enumerated() {
                #expect(fileBytes(img, offset: 8 * 512, count: 8192) == pattern(8192, seed: UInt8(70 + i)))
            }
            for d in devices { d.close() }
        }

        @Test func nullModeAnswersWithoutADisk() throws {
            let f = try BlkFixture()
            let g = try f.guest()
            let dev = try VirtualBlockDevice(name: "vbd-null", backing: BackingOptions(nullSectors: 1 << 21), logger: quietLogger)
            #expect(dev.isNull && dev.sectors == 1 << 21)
            let front = try BlkFront<BlkifRing>(guest: g)
            try dev.connect(hypervisor: f.dom0, frontend: front.config())
            #expect(try front.write(sector: 0, pattern(4096, seed: 1)) == 0)
            #expect(try front.read(sector: 8, bytes: 8192).status == 0)
            #expect(try front.read(sector: 1 << 21, bytes: 4096).status == BlkifStatus.error.rawValue)
            #expect(try front.flush() == 0)
            let st = dev.stats
            #expect(st.readRequests == 2 && st.writeRequests == 1 && st.sectorsRead == 16 && st.sectorsWritten == 8 && st.errors == 1)
            dev.close()
        }
    }
}
