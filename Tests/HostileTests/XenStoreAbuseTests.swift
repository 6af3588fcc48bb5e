import Dispatch
import Foundation
import Glibc
import Synchronization
import Testing
import XenBus
import XenHV
import XenStore
import XenTestKit

/// Watch events collected by a callback, awaited with a deadline.
final class EventLog: @unchecked Sendable {
    let box = Mutex<[XenBusWatchEvent]>([])
    var callback: @Sendable (XenBusWatchEvent) -> Void { { [self] e in box.withLock { $0.append(e) } } }
    var all: [XenBusWatchEvent] { box.withLock { $0 } }
    func clear() { box.withLock { $0.removeAll() } }
    func wait(seconds: Double = 10, for match: (XenBusWatchEvent) -> Bool) -> Bool {
        eventually(seconds: seconds, every: 1) { box.withLock { $0.contains(where: match) } }
    }
}

extension Hostile {
    /// Guests abusing xenstored over their rings: quotas answered with the
    /// protocol's errors, a guest that never reads its replies stalls alone,
    /// nothing leaks across domains; dom0 and another guest carry on.
    @Suite struct XenStoreAbuseTests {
        /// A second guest and dom0 still get answers.
        static func othersWork(_ d: HostileDom0, _ g: Dom0Harness.Guest, _ tag: String) throws {
            for i in 0..<20 {
                try g.xenstore.write("data/\(tag)", "\(i)")
                #expect(try g.xenstore.read("data/\(tag)") == "\(i)")
            }
            #expect(try d.s.xenstore.read(g.home + "/data/\(tag)") == "19")
        }

        @Test func watchAndTransactionFloodsHitTheirQuotas() throws {
            let d = try HostileDom0()
            let h = try d.guest("flooder"), g = try d.guest("bystander")
            let log = EventLog()
            var watches: [XenBusWatch] = [try h.xenstore.watch(h.home + "/w0", token: "t0", callback: log.callback)]
            for i in 1..<128 { watches.append(try h.xenstore.watch(h.home + "/w\(i)", token: "t\(i)")) }
            #expect(throws: XenBusError.xs(.E2BIG)) { try h.xenstore.watch(h.home + "/w128", token: "t128") }
            #expect(throws: XenBusError.xs(.E2BIG)) { try h.xenstore.watch(g.home, token: "spy") }
            try Self.othersWork(d, g, "watches")
            #expect(throws: Never.self) { try g.xenstore.watch(g.home + "/x", token: "x") }
            // Its watches still fire; one freed makes room for one more.
            try d.s.xenstore.write(h.home + "/w0", "poke")
            #expect(log.wait { $0.path == h.home + "/w0" && $0.token == "t0" })
            try h.xenstore.unwatch(watches.removeLast())
            #expect(throws: Never.self) { try h.xenstore.watch(h.home + "/w128", token: "t128") }

            // Transactions: 10 open, the 11th is ENOSPC; others unaffected.
            var txs: [UInt32] = []
            for _ in 0..<10 { txs.append(try h.xenstore.transactionStart()) }
            #expect(throws: XenBusError.xs(.ENOSPC)) { try h.xenstore.transactionStart() }
            try Self.othersWork(d, g, "tx")
            let gt = try g.xenstore.transactionStart()
            try g.xenstore.write("data/in-tx", "1", tx: gt)
            try g.xenstore.transactionEnd(gt, commit: true)
            for t in txs { try h.xenstore.transactionEnd(t, commit: false) }
            // A start/end storm, each touching a node, while the other guest works.
            let worker = TestThread {
                for i in 0..<200 { try? g.xenstore.write("data/storm", "\(i)") }
            }
            for i in 0..<300 {
                let t = try h.xenstore.transactionStart()
                try h.xenstore.write("data/t", "\(i)", tx: t)
                try h.xenstore.transactionEnd(t, commit: i % 2 == 0)
            }
            worker.join()
            #expect(try d.s.xenstore.read(g.home + "/data/storm") == "199")
            #expect(try d.s.xenstore.read(h.home + "/data/t") == "298")
            #expect(try d.s.xenstore.control("quota", ["\(h.domid)"]).contains("transactions 0"))
        }

        @Test func aGuestThatNeverReadsItsRepliesStallsAlone() throws {
            let d = try HostileDom0()
            let g = try d.guest("bystander")
            let raw = try d.rawGuest("mute")
            let mute = raw.domain, ring = raw.ring, home = raw.home
            // (prepareGuest writes `name` before handing the home over, so it is dom0's: use a node of its own.)
            try d.s.xenstore.write(home + "/data", "mute")
            try d.s.xenstore.setPermissions(home + "/data", [XSPerm(XenStore.DomID(mute.domid), [])])
            func request(_ i: Int) -> [UInt8] { RawXenStoreRing.message(.read, [home + "/data"], reqID: UInt32(i + 1)) }

            // Requests until its response ring is full and its request ring stops draining.
            var sent = 0, pending: [UInt8] = []
            let full = try eventually(seconds: 10, every: 1) {
                if pending.isEmpty { pending = request(sent); sent += 1 }
                let n = try ring.send(pending)
                pending.removeFirst(n)
                return try n == 0 && ring.unreadResponseBytes() > 1024 - 64 && !ring.requestsConsumed()
            }
            let unread = try ring.unreadResponseBytes()
            #expect(full, "the daemon kept consuming: sent \(sent), unread \(unread)")
            // Everyone else is served while it sits there.
            try Self.othersWork(d, g, "while-stalled")
            #expect(try d.s.xenstore.read(home + "/name") == "mute")

            // It reads at last: every request gets its reply, in order, intact.
            var replies: [(type: UInt32, reqID: UInt32, payload: [UInt8])] = []
            let all = try eventually(seconds: 10, every: 1) {
                replies += try ring.drain()
                if !pending.isEmpty { pending.removeFirst(try ring.send(pending)) }
                return replies.count == sent
            }
            #expect(all, "got \(replies.count) of \(sent) replies")
            var bad = 0
            for (i, r) in replies.enumerated() {
                let good = r.reqID == UInt32(i + 1) && r.type == XSType.read.rawValue && r.payload.starts(with: Array("mute".utf8))
                if !good { bad += 1; if bad <= 3 { print("reply \(i): type \(r.type) id \(r.reqID) \(String(decoding: r.payload, as: UTF8.self))") } }
                #expect(r.reqID == UInt32(i + 1) && r.type == XSType.read.rawValue && r.payload.starts(with: Array("mute".utf8)),
                        "reply \(i): \(r.type) \(r.reqID)")
            }
            try Self.othersWork(d, g, "after")
            print("mute guest: \(sent) requests, stalled with a full response ring, all replies after draining")
        }

        @Test func watchingAnotherDomainLeaksNothingAndItsPermissionsAreNotOurs() throws {
            let d = try HostileDom0()
            let spy = try d.guest("spy"), g = try d.guest("victim")
            try g.xenstore.write("secret", "s3cr3t")
            try g.xenstore.write("shared", "hello")
            try g.xenstore.setPermissions(g.home + "/shared", [XSPerm(XenStore.DomID(g.domid), []),
                                                               XSPerm(XenStore.DomID(spy.domid), .read)])
            #expect(try spy.xenstore.read(g.home + "/shared") == "hello")
            #expect(throws: XenBusError.xs(.EACCES)) { try spy.xenstore.read(g.home + "/secret") }

            let log = EventLog()
            for (p, t) in [(g.home, "home"), (g.home + "/secret", "secret"), (g.home + "/new", "new"), ("/local/domain", "all")] {
                _ = try spy.xenstore.watch(p, token: t, callback: log.callback)
            }
            _ = try spy.xenstore.watch(spy.home + "/barrier", token: "barrier", callback: log.callback)
            #expect(log.wait { $0.token == "barrier" })  // its registration event: every earlier one is in
            log.clear()

            // The victim changes nodes the spy cannot read.
            try g.xenstore.write("secret", "t0p")
            try g.xenstore.write("new/child", "x")
            try g.xenstore.rm(g.home + "/new")
            try g.xenstore.write("shared", "readable")  // this one it may see
            try d.s.xenstore.write(spy.home + "/barrier", "1")
            #expect(log.wait { $0.token == "barrier" && $0.path == spy.home + "/barrier" })
            let leaked = log.all.filter { $0.path.hasPrefix(g.home) && $0.path != g.home + "/shared" }
            #expect(leaked.isEmpty, "events for unreadable nodes: \(leaked.map { "\($0.path) \($0.token)" })")

            // Permissions on another domain's nodes: EACCES, and nothing changed.
            let before = try d.s.xenstore.getPermissions(g.home + "/secret")
            let mine = [XSPerm(XenStore.DomID(spy.domid), [])]
            for p in [g.home + "/secret", g.home + "/shared", g.home, "/local/domain/0", "/local/domain/0/backend", "/"] {
                #expect(throws: XenBusError.xs(.EACCES), "\(p)") { try spy.xenstore.setPermissions(p, mine) }
            }
            #expect(try d.s.xenstore.getPermissions(g.home + "/secret") == before)
            #expect(throws: XenBusError.xs(.EACCES)) { try spy.xenstore.read(g.home + "/secret") }
            #expect(try g.xenstore.read("secret") == "t0p")
            try Self.othersWork(d, g, "after-spy")
        }
    }
}
