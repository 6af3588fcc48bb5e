// Behaviour where C xenstored (tools/xenstored/core.c, transaction.c, watch.c) is the
// reference and an audit found us different: each test names the C function it follows.
import CXen
import Glibc
import Testing
@testable import XenStore
import func XenHV.monotonicSeconds

private func home(_ core: XenStoreCore, _ d: DomID) -> CoreClient {
    let dom0 = CoreClient(core)
    dom0.mkdir("/local/domain/\(d)"); dom0.setPerms("/local/domain/\(d)", ["n\(d)"])
    return dom0
}

/// "<gen>\0\0": send_directory_part's answer for an offset at or past the end.
private func isEmptyPart(_ m: CoreClient.Msg) -> Bool {
    guard m.error == nil, m.payload.count >= 3, m.payload.suffix(2) == [0, 0] else { return false }
    return m.payload.dropLast(2).allSatisfy { $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }
}

@Suite struct DirectoryPartOffsetTests {
    /// A guest-chosen offset above Int.max used to trap the whole daemon.
    @Test func hugeOffsetsAnswerAnEmptyList() {
        let (core, _) = makeCore()
        _ = home(core, 5)
        let g = guest(core, 5)
        g.write("data/a", "")
        for off in ["9223372036854775808", "18446744073709551615", "99999999999999999999999999"] {
            #expect(isEmptyPart(g.send(.directoryPart, g.fields(["data", off]))), "offset \(off)")
        }
        // The same for a path that does not exist is its lookup error, not a crash.
        #expect(g.send(.directoryPart, g.fields(["nothere", "9223372036854775808"])).error == "ENOENT")
    }

    /// C reads the offset with atoi: past the end is an empty list, not an error;
    /// junk reads as 0; the request needs exactly two strings.
    @Test func offsetsAsCReadsThem() {
        let (core, _) = makeCore()
        let c = CoreClient(core)
        c.write("/d/a", ""); c.write("/d/bb", "")
        #expect(isEmptyPart(c.send(.directoryPart, c.fields(["/d", "5"]))))     // == childlen
        #expect(isEmptyPart(c.send(.directoryPart, c.fields(["/d", "5000"]))))
        #expect(isEmptyPart(c.send(.directoryPart, c.fields(["/d", "-1"]))))
        let whole = c.send(.directoryPart, c.fields(["/d", "x"]))
        #expect(whole.fields.dropFirst() == ["a", "bb", ""])
        #expect(c.send(.directoryPart, Array("/d\u{0}0".utf8)).error == "EINVAL")
        #expect(c.send(.directoryPart, c.fields(["/d"])).error == "EINVAL")
    }
}

@Suite struct TransactionBudgetTests {
    /// access_node: a transaction records each distinct node it touches, missing ones
    /// and their ancestors included, and refuses the one past the quota with ENOSPC.
    @Test func readsOfMissingPathsAreBounded() {
        var q = XSQuotas(); q.maxTransactionNodes = 8
        let (core, _) = makeCore(q)
        _ = home(core, 5)
        let g = guest(core, 5)
        let t = g.txStart()
        var errs: Set<String> = []
        for i in 0..<200 { errs.insert(g.readError("m\(i)/a/b/c", tx: t) ?? "ok") }
        #expect(errs.contains("ENOSPC"))
        #expect(g.conn.transactions.values.first!.accessed.count <= 8)
        // Reading the same node again costs nothing new.
        let t2 = g.txStart()
        for _ in 0..<50 { #expect(g.readError("m0", tx: t2) == "ENOENT") }
        #expect(g.txEnd(t2, commit: true) == nil)
        // The failed transaction cannot commit (do_transaction_end: trans->fail -> ENOMEM).
        #expect(g.txEnd(t, commit: true) == "ENOMEM")
    }

    /// A transaction's copies are bounded in bytes too (C charges them to the
    /// domain's memory quota): ten open transactions of large values cannot
    /// make a guest hold tens of megabytes.
    @Test func transactionBytesAreBounded() {
        var q = XSQuotas(); q.maxTransactionBytes = 64 * 1024
        let (core, _) = makeCore(q)
        _ = home(core, 5)
        let g = guest(core, 5)
        let t = g.txStart()
        let big = String(repeating: "v", count: 1900)
        var failedAt = -1
        for i in 0..<100 where failedAt < 0 { if g.write("n\(i)", big, tx: t) == "ENOSPC" { failedAt = i } }
        #expect(failedAt > 20 && failedAt < 40, "\(failedAt)")  // about 64 KiB of 2 KB nodes
        #expect(g.conn.transactions.values.first!.bytes <= 64 * 1024 + 2048 + 128)
        #expect(g.txEnd(t, commit: true) == "ENOMEM")
        #expect(g.readError("n0") == "ENOENT")
        // Rewriting one node does not add up.
        let t2 = g.txStart()
        for _ in 0..<200 { #expect(g.write("same", big, tx: t2) == nil) }
        #expect(g.txEnd(t2, commit: true) == nil)
        // dom0 is not bound.
        let d = CoreClient(core)
        let dt = d.txStart()
        for i in 0..<100 { #expect(d.write("/big/n\(i)", big, tx: dt) == nil) }
        #expect(d.txEnd(dt, commit: true) == nil)
    }

    /// Reading is holding: a transaction keeps its copy of every node it read,
    /// and once the live node is rewritten outside, that copy is the
    /// transaction's alone. Reads are charged like writes, so transactions
    /// left open over large nodes rewritten meanwhile cannot pin megabytes.
    @Test func transactionReadsAreChargedToo() {
        var q = XSQuotas(); q.maxTransactionBytes = 64 * 1024
        let (core, _) = makeCore(q)
        _ = home(core, 5)
        let g = guest(core, 5)
        let big = String(repeating: "v", count: 1900)
        for i in 0..<100 { #expect(g.write("n\(i)", big) == nil) }
        let t = g.txStart()
        var failedAt = -1
        for i in 0..<100 where failedAt < 0 { if g.readError("n\(i)", tx: t) == "ENOSPC" { failedAt = i } }
        #expect(failedAt > 20 && failedAt < 40, "\(failedAt)")  // about 64 KiB of 2 KB nodes
        #expect(g.conn.transactions.values.first!.bytes <= 64 * 1024)
        #expect(g.txEnd(t, commit: true) == "ENOMEM")
        // Reading, then writing, the same node counts it once.
        let t2 = g.txStart()
        for i in 0..<20 {
            #expect(g.readError("n\(i)", tx: t2) == nil)
            #expect(g.write("n\(i)", big, tx: t2) == nil)
        }
        #expect(g.conn.transactions.values.first!.bytes < 20 * (2048 + 128))
        #expect(g.txEnd(t2, commit: true) == nil)
    }

    @Test func refusedWriteFailsTheCommitAndAppliesNothing() {
        var q = XSQuotas(); q.maxTransactionNodes = 8
        let (core, _) = makeCore(q)
        _ = home(core, 5)
        let g = guest(core, 5)
        let t = g.txStart()
        var failedAt = -1
        for i in 0..<20 where failedAt < 0 { if g.write("n\(i)", "v", tx: t) == "ENOSPC" { failedAt = i } }
        #expect(failedAt == 7)  // the home + n0...n6 = 8 distinct nodes
        #expect(g.txEnd(t, commit: true) == "ENOMEM")
        #expect(g.readError("n0") == "ENOENT")
        #expect(g.readError("n\(failedAt)") == "ENOENT")
        #expect(g.conn.transactions.isEmpty)
        // Aborting a failed transaction is fine.
        let t2 = g.txStart()
        for i in 0..<20 { g.write("n\(i)", "v", tx: t2) }
        #expect(g.txEnd(t2, commit: false) == nil)
        // dom0 is not bound by the budget.
        let d = CoreClient(core)
        let dt = d.txStart()
        for i in 0..<40 { #expect(d.write("/big/n\(i)", "v", tx: dt) == nil) }
        #expect(d.txEnd(dt, commit: true) == nil)
    }

    /// transaction.c keeps data only for nodes the transaction accessed: changes
    /// outside it cost it nothing.
    @Test func idleTransactionKeepsNothingOfOthersChanges() {
        let (core, _) = makeCore()
        _ = home(core, 5)
        let g = guest(core, 5)
        _ = g.txStart()  // never ended
        let name = String(repeating: "k", count: 200)
        for i in 0..<2000 { g.write("\(name)\(i)", ""); g.rm("\(name)\(i)") }
        #expect(g.conn.transactions.values.first.map { $0.accessed.count + $0.changes.count }! < 16)
    }

    /// A transaction sees a node as it was when it first accessed it; a change after
    /// that makes the commit fail with EAGAIN (finalize_transaction).
    @Test func firstAccessIsTheSnapshot() {
        let (core, _) = makeCore()
        let a = CoreClient(core), b = CoreClient(core)
        a.write("/s/x", "0"); a.write("/s/y", "0")
        let t = a.txStart()
        b.write("/s/x", "1")                           // before the first access: visible
        #expect(a.read("/s/x", tx: t) == .success("1"))
        b.write("/s/x", "2")                           // after it: not visible
        #expect(a.read("/s/x", tx: t) == .success("1"))
        #expect(a.txEnd(t, commit: true) == "EAGAIN")
        let t2 = a.txStart()
        b.write("/s/y", "1")
        #expect(a.read("/s/y", tx: t2) == .success("1"))
        #expect(a.write("/s/z", "w", tx: t2) == nil)
        #expect(a.txEnd(t2, commit: true) == nil)
        #expect(a.read("/s/z") == .success("w"))
        // A node missing at first access and created outside afterwards conflicts too.
        let t3 = a.txStart()
        #expect(a.readError("/s/new", tx: t3) == "ENOENT")
        b.write("/s/new", "x")
        #expect(a.txEnd(t3, commit: true) == "EAGAIN")
    }
}

@Suite struct WatchEventQueueTests {
    /// send_event drops an event identical to one still pending, so a write flood
    /// leaves one event per watch, and dom0 is never disconnected for its backlog.
    @Test func floodLeavesOneEventAndTheBackendConnected() {
        var q = XSQuotas(); q.maxOutputBytes = 4096
        let (core, _) = makeCore(q)
        _ = home(core, 5)
        let g = guest(core, 5)
        g.write("device/vbd/1/state", "1")
        let backend = CoreClient(core)
        backend.watch("/local/domain/5/device/vbd/1/state", "be"); _ = backend.pollEvents()
        for i in 0..<1000 { g.write("device/vbd/1/state", "\(i % 7)") }
        #expect(!backend.conn.closed)
        #expect(backend.pollEvents().map(\.path) == ["/local/domain/5/device/vbd/1/state"])
        // Distinct events pile up for dom0 (C sets it no memory quota) but never close it.
        backend.watch("/local/domain/5", "home"); _ = backend.pollEvents()
        for i in 0..<300 { g.write("k\(i)", "") }
        #expect(!backend.conn.closed)
        #expect(backend.pollEvents().count == 300)
    }

    /// An unprivileged watcher over its output quota loses events, not its connection
    /// (domain_memory_add_chk in send_event).
    @Test func guestOverQuotaLosesEventsNotItsConnection() {
        var q = XSQuotas(); q.maxOutputBytes = 4096
        let (core, _) = makeCore(q)
        let dom0 = CoreClient(core)
        dom0.mkdir("/pub"); dom0.setPerms("/pub", ["n0", "r6"])
        let g = guest(core, 6)
        g.watch("/pub", "t"); _ = g.pollEvents()
        for i in 0..<500 { dom0.write("/pub/k\(i)", "") }
        #expect(!g.conn.closed)
        #expect(g.conn.pendingBytes <= 4096)
        let got = g.pollEvents()
        #expect(got.count > 10 && got.count < 500)
        #expect(g.read("/pub/k0") == .success(""))
        dom0.write("/pub/after", "")
        #expect(g.pollEvents().map(\.path) == ["/pub/after"])
    }

    /// check_event_timeout: only unprivileged connections' events expire, and the
    /// stale events are dropped; the connection stays.
    @Test func staleEventsOfGuestsAreDroppedDom0sKept() {
        var q = XSQuotas(); q.watchEventTimeout = 20
        let (core, _) = makeCore(q)
        let dom0 = CoreClient(core)
        dom0.mkdir("/pub"); dom0.setPerms("/pub", ["n0", "r6"])
        let g = guest(core, 6)
        let d = CoreClient(core)
        g.watch("/pub", "t"); d.watch("/pub", "t")
        _ = g.pollEvents(); _ = d.pollEvents()
        dom0.write("/pub/a", "1")
        let t = monotonicSeconds()
        core.expireStalled(now: t + 19)
        #expect(g.conn.pendingMessages == 1 && d.conn.pendingMessages == 1)
        core.expireStalled(now: t + 21)
        #expect(!g.conn.closed && !d.conn.closed)
        #expect(g.pollEvents().isEmpty)
        #expect(d.pollEvents().map(\.path) == ["/pub/a"])
        dom0.write("/pub/b", "1")
        #expect(g.pollEvents().map(\.path) == ["/pub/b"])
        #expect(g.read("/pub/a") == .success("1"))
    }

    /// send_event: an event longer than XENSTORE_PAYLOAD_MAX is not sent.
    @Test func oversizedEventsAreNotSent() {
        let (core, _) = makeCore()
        let w = CoreClient(core)
        let token = String(repeating: "t", count: 3000)
        w.watch("/e", token); _ = w.pollEvents()
        w.write("/e/" + String(repeating: "p", count: 1200), "")
        w.write("/e/short", "")
        #expect(w.pollEvents().map(\.path) == ["/e/short"])
    }
}

@Suite struct RingFairnessTests {
    /// The main loop of C xenstored reads one message per connection per round; our
    /// ring service returns after a bounded number however much the guest queued.
    @Test func oneServiceCallIsBounded() {
        let ring = TestRing()
        var q = XSQuotas(); q.maxOutstanding = 1000
        let core = XenStoreCore()
        core.domainQuotas[5] = q
        let conn = core.newConnection(domid: 5, privileged: false)
        let r = RingEndpoint(conn: conn, port: ring.daemonPort)
        let req = RawSocketClient.message(.read, Array("/tool".utf8) + [0], reqID: 1)  // EACCES for dom5
        var batch: [UInt8] = []
        for _ in 0..<40 { batch += req }
        ring.rawWrite(batch)
        let replySize = 16 + 7  // "EACCES\0"
        func replies() -> Int { (Int(r.rspProd) + conn.pendingBytes) / replySize }
        guard case .ok = r.service(core) else { Issue.record("ring corrupt"); return }
        let first = replies()
        #expect(first >= 1 && first <= 8)
        var calls = 1
        while replies() < 40 && calls < 100 { _ = r.service(core); calls += 1 }
        #expect(replies() == 40)
        #expect(calls >= 5)
    }
}

@Suite struct DispatchLikeCTests {
    @Test func isDomainIntroducedIsPrivileged() {
        let (core, _) = makeCore()
        let g = guest(core, 9)
        #expect(g.send(.isDomainIntroduced, g.fields(["7"])).error == "EACCES")
        #expect(g.send(.isDomainIntroduced, g.fields(["9"])).error == "EACCES")
        #expect(CoreClient(core).send(.isDomainIntroduced, g.fields(["9"])).fields == ["T"])
    }

    /// process_message: unknown type -> ENOSYS; privileged check; then the
    /// transaction lookup (ENOENT) for every type but WATCH/UNWATCH.
    @Test func errorsInProcessMessageOrder() {
        let (core, _) = makeCore()
        let c = CoreClient(core)
        for t: UInt32 in [20, 99, XSType.watchEvent.rawValue, XSType.error.rawValue] {
            core.process(c.conn, XSHeader(type: t, reqID: 7, txID: 0, len: 0), UnsafeRawBufferPointer(start: nil, count: 0))
            #expect(c.drain().map(\.error) == ["ENOSYS"])
        }
        #expect(c.send(.transactionEnd, c.fields(["T"])).error == "ENOENT")
        #expect(c.send(.transactionEnd, c.fields(["T"]), tx: 4242).error == "ENOENT")
        #expect(c.send(.transactionStart, [0], tx: 4242).error == "ENOENT")
        #expect(c.send(.resetWatches, [], tx: 4242).error == "ENOENT")
        #expect(c.send(.getDomainPath, c.fields(["3"]), tx: 4242).error == "ENOENT")
        #expect(c.send(.watch, c.fields(["/w", "t"]), tx: 4242).error == nil)  // XS_FLAG_NOTID
        let g = guest(core, 9)
        #expect(g.send(.control, g.fields(["print", "x"]), tx: 4242).error == "EACCES")
        #expect(g.rm("/") == "EACCES")
        #expect(c.rm("/") == "EINVAL")
    }

    /// onearg: exactly one NUL, at the end; WATCH/UNWATCH exactly two strings.
    @Test func argumentCountsAsC() {
        let (core, _) = makeCore()
        let c = CoreClient(core)
        c.write("/a", "v")
        #expect(c.send(.read, Array("/a".utf8)).error == "EINVAL")
        #expect(c.send(.read, Array("/a\u{0}x".utf8)).error == "EINVAL")
        #expect(c.send(.read, Array("/a\u{0}\u{0}".utf8)).error == "EINVAL")
        #expect(c.send(.read, Array("/a\u{0}".utf8)).string == "v")
        #expect(c.send(.watch, c.fields(["/a"])).error == "EINVAL")
        #expect(c.send(.watch, c.fields(["/a", "t", "x"])).error == "EINVAL")
        #expect(c.send(.watch, Array("/a\u{0}t".utf8)).error == "EINVAL")
        #expect(c.send(.unwatch, c.fields(["/a", "t", "x"])).error == "EINVAL")
        #expect(c.send(.transactionEnd, Array("T".utf8)).error == "EINVAL")
        // A guest's over-long permission list is refused before the lookup.
        let g = guest(core, 5)
        #expect(g.send(.setPerms, g.fields(["/nothere", "n5", "r1", "r2", "r3", "r4", "r6"])).error == "ENOSPC")
    }
}

@Suite struct DomainShutdownTests {
    /// check_domain: the first report of a domain's shutdown fires @releaseDomain
    /// once; the domain stays introduced.
    @Test func shutdownFiresReleaseDomainOnce() {
        let (core, _) = makeCore()
        let dom0 = CoreClient(core)
        _ = guest(core, 4); _ = guest(core, 5)
        dom0.watch("@releaseDomain", "r"); _ = dom0.pollEvents()
        core.domainsShutDown([4, 5])
        #expect(dom0.pollEvents().map(\.path) == ["@releaseDomain"])
        core.domainsShutDown([4, 5, 77])
        #expect(dom0.pollEvents().isEmpty)
        #expect(core.isIntroduced(4) && core.isIntroduced(5))
        try! core.releaseDomain(4)
        #expect(dom0.pollEvents().map(\.path) == ["@releaseDomain"])
    }

    /// do_resume: a suspended domain that resumes runs again, so its next
    /// shutdown fires @releaseDomain again (a checkpoint, or a cancelled
    /// migration, followed by a power-off).
    @Test func resumeClearsTheShutdown() {
        let (core, _) = makeCore()
        let dom0 = CoreClient(core)
        _ = guest(core, 5)
        dom0.watch("@releaseDomain", "r"); _ = dom0.pollEvents()
        core.domainsShutDown([5])
        #expect(dom0.pollEvents().map(\.path) == ["@releaseDomain"])
        #expect(dom0.send(.resume, dom0.fields(["5"])).error == nil)
        #expect(dom0.send(.resume, dom0.fields(["0"])).error == "EINVAL")
        core.domainsShutDown([5])
        #expect(dom0.pollEvents().map(\.path) == ["@releaseDomain"])
    }
}

@Suite struct ReleaseLikeCTests {
    /// destroy_domain -> domain_tree_remove: every node the domain owns goes, with
    /// its subtree, wherever it is; nodes dom0 owns stay for the toolstack.
    @Test func releaseRemovesWhatTheDomainOwns() {
        let (core, _) = makeCore()
        let dom0 = CoreClient(core)
        dom0.mkdir("/local/domain/5"); dom0.setPerms("/local/domain/5", ["n0", "r5"])
        dom0.write("/local/domain/5/name", "g")                       // dom0-owned
        dom0.mkdir("/local/domain/5/data"); dom0.setPerms("/local/domain/5/data", ["n5"])
        dom0.mkdir("/shared"); dom0.setPerms("/shared", ["n0", "w5"])
        dom0.setPerms("@releaseDomain", ["n0", "r5"])
        let g = guest(core, 5)
        #expect(g.write("data/x", "1") == nil)
        #expect(g.write("/shared/mine/deep", "m") == nil)
        let w = CoreClient(core)
        w.watch("/shared/mine", "m"); _ = w.pollEvents()
        try! core.releaseDomain(5)
        #expect(dom0.read("/local/domain/5/name") == .success("g"))
        #expect(dom0.readError("/local/domain/5/data") == "ENOENT")
        #expect(dom0.readError("/shared/mine") == "ENOENT")
        #expect(dom0.ls("/shared") == [])
        #expect(core.store.ownedCount(5, nil) == 0)
        #expect(w.pollEvents().map(\.path) == ["/shared/mine"])
        // What others granted it goes too (XSA-322): a new domain 5 gets none of it.
        #expect(dom0.getPerms("/shared") == ["n0"])
        #expect(dom0.getPerms("/local/domain/5") == ["n0"])
        #expect(dom0.getPerms("@releaseDomain") == ["n0"])
    }
}

@Suite struct WatchPermissionTests {
    /// watch_permitted: the node or its parent readable is enough.
    @Test func readableParentIsEnough() {
        let (core, _) = makeCore()
        let dom0 = home(core, 5)
        let g = guest(core, 5)
        g.watch("device", "d")
        dom0.write("/local/domain/5/device/hidden", "x")
        dom0.setPerms("/local/domain/5/device/hidden", ["n0"])
        _ = g.pollEvents()
        dom0.write("/local/domain/5/device/hidden", "y")
        #expect(g.pollEvents().map(\.path) == ["device/hidden"])
        // Neither the node nor its parent readable: silent.
        dom0.mkdir("/local/domain/5/device/closed"); dom0.setPerms("/local/domain/5/device/closed", ["n0"])
        dom0.write("/local/domain/5/device/closed/x", "1")
        _ = g.pollEvents()
        dom0.write("/local/domain/5/device/closed/x", "2")
        #expect(g.pollEvents().isEmpty)
    }

    /// do_set_perms passes the old permissions: a watcher losing access hears of it.
    @Test func losingReadAccessIsReported() {
        let (core, _) = makeCore()
        let dom0 = CoreClient(core)
        dom0.write("/pub/v", "p"); dom0.setPerms("/pub/v", ["r0"])
        let g = guest(core, 6)
        g.watch("/pub/v", "t"); _ = g.pollEvents()
        dom0.setPerms("/pub/v", ["n0"])
        #expect(g.pollEvents().map(\.path) == ["/pub/v"])
        dom0.write("/pub/v", "q")
        #expect(g.pollEvents().isEmpty)
    }

    /// delnode_sub fires per removed node: watches on paths that never existed stay
    /// silent, and each removed descendant is judged by its own permissions.
    @Test func removalFiresPerRemovedNode() {
        let (core, _) = makeCore()
        let dom0 = CoreClient(core)
        dom0.write("/t/a/b", "")
        let w = CoreClient(core)
        w.watch("/t/a/never/there", "x"); w.watch("/t/a/b", "b"); _ = w.pollEvents()
        dom0.rm("/t/a")
        #expect(w.pollEvents().map(\.path) == ["/t/a/b"])
        // A guest watching a readable root does not hear of an unreadable subtree.
        dom0.mkdir("/r/open"); dom0.setPerms("/r", ["n0", "r7"]); dom0.setPerms("/r/open", ["n0", "r7"])
        dom0.mkdir("/r/open/secret"); dom0.setPerms("/r/open/secret", ["n0"])
        dom0.mkdir("/r/open/secret/deeper"); dom0.setPerms("/r/open/secret/deeper", ["n0"])
        let g = guest(core, 7)
        g.watch("/r/open/secret/deeper", "s"); g.watch("/r/open", "o"); _ = g.pollEvents()
        dom0.rm("/r/open")
        #expect(g.pollEvents().map(\.path) == ["/r/open"])
    }
}

@Suite struct SpecialNodeTests {
    /// setup_structure makes @introduceDomain and @releaseDomain nodes (n0); do_watch
    /// takes a watch on them from anyone, and watch_permitted sends later events only
    /// to watchers that may read them; GET_PERMS/SET_PERMS reach them (XSA-115).
    @Test func guestsMayWatchSpecialNodesButHearOnlyWhatTheyMayRead() {
        let (core, _) = makeCore()
        let dom0 = CoreClient(core)
        let g = guest(core, 5)
        #expect(g.watch("@releaseDomain", "r") == nil)
        #expect(g.pollEvents().map(\.path) == ["@releaseDomain"])  // registration
        _ = guest(core, 6); try! core.releaseDomain(6)
        #expect(g.pollEvents().isEmpty)
        #expect(dom0.getPerms("@releaseDomain") == ["n0"])
        #expect(dom0.setPerms("@releaseDomain", ["n0", "r5"]) == nil)
        #expect(g.pollEvents().map(\.path) == ["@releaseDomain"])  // do_set_perms fires too
        _ = guest(core, 7); try! core.releaseDomain(7)
        #expect(g.pollEvents().map(\.path) == ["@releaseDomain"])
        #expect(g.getPerms("@releaseDomain") == ["n0", "r5"])
        #expect(g.setPerms("@releaseDomain", ["n5"]) == "EACCES")
        #expect(dom0.readError("@releaseDomain") == "EINVAL")
        #expect(dom0.getPerms("@introduceDomain") == ["n0"])
    }
}

@Suite struct ErrnoFromParentsTests {
    /// errno_from_parents: a missing node is ENOENT when the closest parent grants any
    /// of the access asked for (parent_perm & perm), else EACCES.
    @Test func anyOverlapWithTheParentsAccessIsENOENT() {
        let (core, _) = makeCore()
        let dom0 = CoreClient(core)
        dom0.mkdir("/shared"); dom0.setPerms("/shared", ["n0", "w5"])
        dom0.setPerms("@releaseDomain", ["n0", "r5"])
        let g = guest(core, 5)
        #expect(g.setPerms("/shared/missing", ["n5"]) == "ENOENT")   // asks write|owner, has write
        #expect(g.readError("/shared/missing") == "EACCES")           // asks read, has none
        #expect(g.setPerms("/tool/missing", ["n5"]) == "EACCES")
    }
}

@Suite struct WatchTokenTests {
    /// C keeps a token as the bytes it got and echoes them in every event.
    @Test func tokensAreEchoedByteForByte() {
        let (core, _) = makeCore()
        let c = CoreClient(core)
        let token: [UInt8] = [0xFF, 0xC3, 0x28, 0x41]  // not UTF-8
        let p = Array("/a".utf8) + [0] + token + [0]
        p.withUnsafeBytes { core.process(c.conn, XSHeader(.watch, reqID: 1, txID: 0, len: UInt32(p.count)), $0) }
        var m = c.drain()
        #expect(m.count == 2 && m[1].type == XSType.watchEvent.rawValue && m[1].payload == p)
        CoreClient(core).write("/a", "1")
        m = c.drain()
        #expect(m.map(\.payload) == [p])
        // A token that differs only where UTF-8 repair would merge them is another watch.
        let q = Array("/a".utf8) + [0] + [0xFE, 0xC3, 0x28, 0x41] + [0]
        q.withUnsafeBytes { core.process(c.conn, XSHeader(.watch, reqID: 2, txID: 0, len: UInt32(q.count)), $0) }
        #expect(c.drain().first?.error == nil)
        p.withUnsafeBytes { core.process(c.conn, XSHeader(.unwatch, reqID: 3, txID: 0, len: UInt32(p.count)), $0) }
        #expect(c.drain().first?.error == nil)
        #expect(core.watchCount == 1)
    }
}
