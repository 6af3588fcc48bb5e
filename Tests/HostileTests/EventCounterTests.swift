import BlkBack
import CXen
import BlkFrontKit
import Foundation
import Glibc
import Synchronization
import Testing
import XenBus
@testable import XenHV
import XenRing
import XenStore
import XenTestKit

extension Hostile {
    /// A guest holds its own ports' wake-up descriptors and, once it has
    /// notified a peer, its own send eventfd into the peer's. When both ends
    /// shared one eventfd per port, a guest could fill the counter a daemon
    /// writes to the eventfd's ceiling (where a blocking write of 1 waits for
    /// a read that never comes), clear O_NONBLOCK on it, or drain a daemon's
    /// port between its poll and its read. A daemon must never wait for a
    /// guest: Xen's evtchn_send never blocks the sender. Now the counter a
    /// daemon signals is an eventfd only the daemon holds, in the guest's
    /// wake-up set (an epoll set, which takes no writes).
    @Suite struct EventCounterTests {
        static let ceiling: UInt64 = 0xFFFF_FFFF_FFFF_FFFE

        /// What a hostile guest tries on its own port: fill the counter behind
        /// it to the ceiling. True when the descriptor refused the write (a
        /// wake-up set has no counter to fill).
        static func refusesSaturation(_ fd: CInt) -> Bool {
            release(fd)
            var v = ceiling
            return write(fd, &v, 8) < 0
        }

        /// Reads the counter back to zero (also to release a daemon that did block, so a
        /// failing test still ends).
        static func release(_ fd: CInt) {
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            var v: UInt64 = 0
            if poll(&pfd, 1, 0) > 0 { _ = read(fd, &v, 8) }
        }

        /// Runs `body` on its own thread and waits at most `seconds` for it.
        static func finishes(within seconds: Double, _ body: @escaping @Sendable () -> Void) -> (Bool, TestThread) {
            let done = Atomic<Bool>(false)
            let t = TestThread {
                body()
                done.store(true, ordering: .releasing)
            }
            return (eventually(seconds: seconds, every: 1) { done.load(ordering: .acquiring) }, t)
        }

        /// Also when the guest first makes its descriptor blocking (fcntl on
        /// the file description; it was shared with blkback before wake-up sets).
        @Test(arguments: [false, true])
        func aGuestAtItsEventCeilingCannotHoldBlkbacksQueueThread(clearingNonBlocking: Bool) throws {
            let d = try HostileDom0()
            let h = try d.guest("saturator"), g = try d.guest("bystander")
            let other = try XenBusDisk(d.s, guest: g, bytes: 1 << 20)
            let disk = try XenBusDisk(d.s, guest: h)
            let fd = disk.front.queues[0].channel.descriptor
            if clearingNonBlocking { #expect(fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) == 0) }
            #expect(Self.refusesSaturation(fd), "the guest filled the counter blkback signals")
            // A request blkback answers, then notifies a guest whose counter is at the ceiling.
            let b = try disk.front.makeBuffer(pages: 1)
            try disk.front.push(try disk.front.rwRequest(BlkifOp.read, sector: 0, buffer: b, bytes: 4096))
            #expect(try eventually(seconds: 10, every: 1) { try disk.front.hasResponses() }, "no response")
            // The other guest is served; the saturating guest's disk detaches, which needs its
            // queue thread to come back from the notify.
            #expect(try DiskWorker(other).step(1) == nil)
            let s = d.s, blkback = d.blkback
            let (detached, t) = Self.finishes(within: 20) { try? disk.detach(s, backend: blkback) }
            #expect(detached, "blkback's queue thread is held in its notify of the saturated guest")
            if !detached { Self.release(fd) }
            t.join()
        }

        /// The other way round: a guest holds the descriptor it kicks xenstored
        /// through (its peer's port, the one xenstored polls). It makes that
        /// file description blocking and drains every kick it sends right away,
        /// so xenstored, woken by a kick, finds the counter empty when it reads.
        /// A blocking read there would wait for the guest's next kick, which a
        /// guest that stops never sends: xenstored's read must not block.
        @Test func aGuestDrainingXenstoredsKicksCannotHoldItsRead() throws {
            let d = try HostileDom0()
            let g = try d.guest("bystander")
            let drainer = try d.rawGuest("drainer")
            let (_, fds) = try drainer.hypervisor.call(.peerDescriptor) { $0.u32(drainer.domain.storePort) }
            let fd = try #require(fds.first, "no peer descriptor for the store port")
            defer { Glibc.close(fd) }
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
            for round in 0..<40 {
                // Kick and take the kick back, as fast as the guest can.
                for _ in 0..<2000 {
                    var one: UInt64 = 1
                    _ = write(fd, &one, 8)
                    _ = cxen_evtfd_drain(fd)
                }
                let (served, t) = Self.finishes(within: 10) { _ = try? g.xenstore.read("name") }
                #expect(served, "round \(round): xenstored is held in a read of the drained port")
                if !served {
                    var one: UInt64 = 1
                    _ = write(fd, &one, 8)  // lets it go, so the test ends
                }
                t.join()
                if !served { break }
            }
        }

        @Test func aGuestAtItsXenStoreEventCeilingCannotHoldXenstored() throws {
            let d = try HostileDom0()
            let g = try d.guest("bystander")
            let mute = try d.rawGuest("mute")
            let ring = mute.ring, home = mute.home
            let channel = try mute.hypervisor.channel(mute.domain.storePort)
            defer { withExtendedLifetime(channel) {} }
            let fd = channel.descriptor
            #expect(Self.refusesSaturation(fd), "the guest filled the counter xenstored signals")
            // A request whose reply xenstored writes and then notifies; the guest never reads its counter.
            #expect(try ring.send(RawXenStoreRing.message(.read, [home + "/name"], reqID: 1)) > 0)
            #expect(try eventually(seconds: 10, every: 1) { try ring.unreadResponseBytes() > 0 }, "no reply")
            // Everyone else is still answered.
            let (served, t) = Self.finishes(within: 20) {
                for i in 0..<20 {
                    try? g.xenstore.write("data/x", "\(i)")
                    _ = try? g.xenstore.read("data/x")
                }
                _ = try? d.s.xenstore.read(home + "/name")
            }
            #expect(served, "xenstored is held in its notify of the saturated guest")
            if !served { Self.release(fd) }
            t.join()
            #expect(try d.s.xenstore.read(g.home + "/data/x") == "19")
            let replies = try ring.drain()
            #expect(replies.count == 1 && replies.first?.reqID == 1)
        }
    }
}
