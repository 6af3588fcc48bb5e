// Behaviour where C xenstored (tools/xenstored/core.c, transaction.c, watch.c) is the
// reference and an audit found us different: each test names the C function it follows.
import CXen
import Glibc
import Testing
@testable import XenStore

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
        #expect(core.store.open.values.first!.touchedCount <= 8)
        // Reading the same node again costs nothing new.
        let t2 = g.txStart()
        for _ in 0..<50 { #expect(g.readError("m0", tx: t2) == "ENOENT") }
        #expect(g.txEnd(t2, commit: true) == nil)
        // The failed transaction cannot commit (do_transaction_end: trans->fail -> ENOMEM).
        #expect(g.txEnd(t, commit: true) == "ENOMEM")
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
        #expect(core.store.open.isEmpty)
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
        #expect(core.store.open.values.first!.retainedCount < 16)
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
