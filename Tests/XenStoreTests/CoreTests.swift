// In-process tests of the store core: codec, semantics, permissions, watches,
// transactions, quotas, domain clean-up.
import CXen
import Testing
@testable import XenStore
import func XenHV.monotonicSeconds

/// A ring host that accepts every ring without serving it (core-level tests).
final class NullRingHost: XSRingHost {
    var attached: [DomID] = []
    var detached: [DomID] = []
    func attachRing(_ conn: XSConnection, _ port: XenstoreRingPort) { attached.append(conn.domid) }
    func detachRing(_ conn: XSConnection) { detached.append(conn.domid) }
    func takeRing(_ conn: XSConnection) -> XenstoreRingPort? { nil }
}

import Synchronization
let hostsKeptAlive = Mutex<[NullRingHost]>([])
extension NullRingHost: @unchecked Sendable {}

func makeCore(_ q: XSQuotas = .default) -> (XenStoreCore, NullRingHost) {
    let core = XenStoreCore(quotas: q)
    let host = NullRingHost()
    core.ringHost = host
    hostsKeptAlive.withLock { $0.append(host) }  // the core holds its ring host weakly
    let page = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
    nonisolated(unsafe) let p = page
    core.ringProvider = { _, _, _ in XenstoreRingPort(page: p, eventFD: -1, notify: {}) }
    return (core, host)
}

/// Introduces `domid` and returns a client on the connection of its ring, so its
/// identity comes from the domain record.
func guest(_ core: XenStoreCore, _ domid: DomID) -> CoreClient {
    try! core.introduce(domid: domid, mfn: UInt64(domid) * 100, port: 1)
    return CoreClient(core, conn: core.domains[domid]!.conn!)
}

@Suite struct CodecTests {
    @Test func messageTypesMatchXsWire() {
        #expect(XSType.control.rawValue == XS_CONTROL.rawValue)
        #expect(XSType.directory.rawValue == XS_DIRECTORY.rawValue)
        #expect(XSType.read.rawValue == XS_READ.rawValue)
        #expect(XSType.getPerms.rawValue == XS_GET_PERMS.rawValue)
        #expect(XSType.watch.rawValue == XS_WATCH.rawValue)
        #expect(XSType.unwatch.rawValue == XS_UNWATCH.rawValue)
        #expect(XSType.transactionStart.rawValue == XS_TRANSACTION_START.rawValue)
        #expect(XSType.transactionEnd.rawValue == XS_TRANSACTION_END.rawValue)
        #expect(XSType.introduce.rawValue == XS_INTRODUCE.rawValue)
        #expect(XSType.release.rawValue == XS_RELEASE.rawValue)
        #expect(XSType.getDomainPath.rawValue == XS_GET_DOMAIN_PATH.rawValue)
        #expect(XSType.write.rawValue == XS_WRITE.rawValue)
        #expect(XSType.mkdir.rawValue == XS_MKDIR.rawValue)
        #expect(XSType.rm.rawValue == XS_RM.rawValue)
        #expect(XSType.setPerms.rawValue == XS_SET_PERMS.rawValue)
        #expect(XSType.watchEvent.rawValue == XS_WATCH_EVENT.rawValue)
        #expect(XSType.error.rawValue == XS_ERROR.rawValue)
        #expect(XSType.isDomainIntroduced.rawValue == XS_IS_DOMAIN_INTRODUCED.rawValue)
        #expect(XSType.resume.rawValue == XS_RESUME.rawValue)
        #expect(XSType.setTarget.rawValue == XS_SET_TARGET.rawValue)
        #expect(XSType.resetWatches.rawValue == XS_RESET_WATCHES.rawValue)
        #expect(XSType.directoryPart.rawValue == XS_DIRECTORY_PART.rawValue)
        #expect(XSType.allCases.count + 1 == Int(XS_TYPE_COUNT.rawValue))  // + removed XS_RESTRICT
        #expect(XSHeader.size == 16)
        #expect(MemoryLayout<xenstore_domain_interface>.offset(of: \.req_cons) == 2048)
        #expect(XSRingLayout.rspProd == 2060)
    }

    @Test func headerRoundTrip() {
        var out: [UInt8] = []
        XSHeader(type: 2, reqID: 0xdead_beef, txID: 7, len: 5).append(to: &out)
        #expect(out.count == 16)
        #expect(out[4] == 0xef)  // native little-endian req_id
        let h = out.withUnsafeBytes { XSHeader(from: $0.baseAddress!) }
        #expect(h == XSHeader(type: 2, reqID: 0xdead_beef, txID: 7, len: 5))
    }

    @Test func pathRules() throws {
        #expect(try XSPath.canonicalize("/a/b", domid: 0).path == "/a/b")
        #expect(try XSPath.canonicalize("x/y", domid: 7).path == "/local/domain/7/x/y")
        #expect(try XSPath.canonicalize("x/y", domid: 7).relative)
        for bad in ["/a//b", "/a/", "", "/a b", "/a\u{e9}", "rel/", "@foo"] {
            #expect(throws: XSError.EINVAL, "\(bad)") { try XSPath.canonicalize(bad, domid: 0) }
        }
        #expect(try XSPath.canonicalize("@releaseDomain", domid: 0, allowSpecial: true).path == "@releaseDomain")
        let long = "/" + String(repeating: "a", count: 3072)
        #expect(throws: XSError.EINVAL) { try XSPath.canonicalize(long, domid: 0) }
        let rel = String(repeating: "b", count: 2049)
        #expect(throws: XSError.EINVAL) { try XSPath.canonicalize(rel, domid: 3, localLimit: 2048) }
        #expect(try XSPath.canonicalize(String(rel.dropFirst()), domid: 3, localLimit: 2048).path.hasSuffix("bbb"))
        #expect(XSPath.isSelfOrDescendant("/a/bc", of: "/a/b") == false)
        #expect(XSPath.isSelfOrDescendant("/a/b/c", of: "/a/b"))
    }

    @Test func permissionStrings() {
        #expect(XSPerm("r5") == XSPerm(5, .read))
        #expect(XSPerm("b0") == XSPerm(0, .both))
        #expect(XSPerm("x1") == nil)
        #expect(XSPerm("r") == nil)
        #expect(XSPerm("r70000") == nil)
        let p = XSPermissions(owner: 3, others: .read, acl: [XSPerm(4, .write), XSPerm(5, .none)])
        #expect(p.access(for: 3, privileged: false) == .all)
        #expect(p.access(for: 4, privileged: false) == .write)
        #expect(p.access(for: 5, privileged: false) == .none)
        #expect(p.access(for: 9, privileged: false) == .read)
        #expect(p.access(for: 9, privileged: true) == .all)
    }
}

@Suite struct StoreSemanticsTests {
    @Test func readWriteCreatesParents() {
        let (core, _) = makeCore()
        let c = CoreClient(core)
        #expect(c.write("/a/b/c", "v") == nil)
        #expect(c.read("/a/b/c") == .success("v"))
        #expect(c.read("/a/b") == .success(""))
        #expect(c.ls("/a") == ["b"])
        #expect(c.ls("/") == ["tool", "a"])
        #expect(c.readError("/a/x") == "ENOENT")
        #expect(c.getPerms("/a/b/c") == ["n0"])
    }

    @Test func valuesAreBinaryAndEmptyAllowed() {
        let (core, _) = makeCore()
        let c = CoreClient(core)
        let m = c.send(.write, Array("/bin".utf8) + [0, 1, 0, 255, 0])
        #expect(m.string == "OK\0")
        #expect(c.send(.read, c.fields(["/bin"])).payload == [1, 0, 255, 0])
        #expect(c.write("/empty", "") == nil)
        #expect(c.read("/empty") == .success(""))
    }

    @Test func mkdirRmDirectory() {
        let (core, _) = makeCore()
        let c = CoreClient(core)
        #expect(c.mkdir("/d/e") == nil)
        #expect(c.mkdir("/d/e") == nil)  // existing: fine
        #expect(c.write("/d/e/f", "1") == nil)
        #expect(c.rm("/d/nothing") == nil)  // missing with parent: fine
        #expect(c.rm("/nope/nothing") == "ENOENT")
        #expect(c.rm("/") == "EINVAL")
        #expect(c.rm("/d") == nil)
        #expect(c.readError("/d/e/f") == "ENOENT")
        #expect(c.ls("/") == ["tool"])
        #expect(c.ls("/tool") == ["xenstored"])
        #expect(core.store.nodeCount == 5)  // with @introduceDomain and @releaseDomain
    }

    @Test func badRequests() {
        let (core, _) = makeCore()
        let c = CoreClient(core)
        #expect(c.send(.write, Array("/nonul".utf8)).error == "EINVAL")
        #expect(c.readError("/a//b") == "EINVAL")
        #expect(c.send(.watchEvent, []).error == "ENOSYS")  // process_message: no handler
        let h = XSHeader(type: 20, reqID: 99, txID: 0, len: 0)  // removed XS_RESTRICT
        core.process(c.conn, h, UnsafeRawBufferPointer(start: nil, count: 0))
        let m = c.drain()
        #expect(m.count == 1 && m[0].error == "ENOSYS" && m[0].reqID == 99)
        #expect(c.send(.read, c.fields(["/tool"]), tx: 1234).error == "ENOENT")
    }

    @Test func domainRequests() {
        let (core, host) = makeCore()
        let c = CoreClient(core)
        #expect(c.send(.getDomainPath, c.fields(["7"])).fields == ["/local/domain/7"])
        #expect(c.send(.isDomainIntroduced, c.fields(["7"])).fields == ["F"])
        #expect(c.send(.isDomainIntroduced, c.fields(["0"])).fields == ["T"])
        #expect(c.send(.introduce, c.fields(["7", "1234", "3"])).error == nil)
        #expect(host.attached == [7])
        // Again (C's way to recreate the xenbus event channel): the connection
        // starts over on a new ring endpoint, whatever the mfn (not looked at again).
        #expect(c.send(.introduce, c.fields(["7", "1234", "3"])).error == nil)
        #expect(c.send(.introduce, c.fields(["7", "999", "4"])).error == nil)
        #expect(host.attached == [7, 7, 7] && host.detached == [7, 7])
        #expect(core.domains[7]?.port == 4 && core.domains[7]?.mfn == 1234)
        #expect(c.send(.introduce, c.fields(["x", "1", "3"])).error == "EINVAL")
        #expect(c.send(.introduce, c.fields(["9", "1", "0"])).error == "EINVAL")  // C: port <= 0
        #expect(c.send(.isDomainIntroduced, c.fields(["7"])).fields == ["T"])
        #expect(c.send(.resume, c.fields(["7"])).error == nil)
        #expect(c.send(.resume, c.fields(["8"])).error == "ENOENT")
        #expect(c.send(.introduce, c.fields(["8", "1", "1"])).error == nil)
        #expect(c.send(.setTarget, c.fields(["8", "7"])).error == nil)
        #expect(c.send(.release, c.fields(["7"])).error == nil)
        #expect(host.detached == [7, 7, 7])
        #expect(c.send(.release, c.fields(["7"])).error == "ENOENT")
        #expect(c.send(.control, c.fields(["print", "hello"])).error == nil)
        #expect(c.send(.control, c.fields(["bogus"])).error == "EINVAL")
        let g = guest(core, 9)
        #expect(g.send(.introduce, c.fields(["10", "1", "1"])).error == "EACCES")
        #expect(g.send(.release, c.fields(["8"])).error == "EACCES")
        #expect(g.send(.control, c.fields(["print", "x"])).error == "EACCES")
        #expect(g.send(.getDomainPath, c.fields(["9"])).fields == ["/local/domain/9"])
    }

    @Test func directoryPartChunks() {
        let (core, _) = makeCore()
        let c = CoreClient(core)
        var names: [String] = []
        for i in 0..<300 {
            let n = "child-with-a-longish-name-\(i)"
            names.append(n)
            c.write("/big/\(n)", "")
        }
        #expect(c.send(.directory, c.fields(["/big"])).error == "E2BIG")
        var got: [String] = []
        var off = 0
        var gen: String? = nil
        var rounds = 0
        while rounds < 100 {
            rounds += 1
            let m = c.send(.directoryPart, c.fields(["/big", "\(off)"]))
            #expect(m.error == nil)
            #expect(m.payload.count <= 4096)
            let firstNul = m.payload.firstIndex(of: 0)!
            let g = String(decoding: m.payload[..<firstNul], as: UTF8.self)
            if gen == nil { gen = g } else { #expect(gen == g) }
            let rest = Array(m.payload[(firstNul + 1)...])
            off += rest.count
            let done = rest.count >= 2 && rest[rest.count - 2] == 0 || rest.count <= 1
            got += rest.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
            if done { break }
        }
        #expect(rounds > 1)
        #expect(got == names)
    }
}

@Suite struct PermissionTests {
    @Test func guestConfinedToItsTree() {
        let (core, _) = makeCore()
        let dom0 = CoreClient(core)
        for d in [5, 6] {
            dom0.mkdir("/local/domain/\(d)")
            dom0.setPerms("/local/domain/\(d)", ["n\(d)"])
        }
        dom0.write("/local/domain/6/secret", "s")
        let g5 = guest(core, 5)
        #expect(g5.write("data/x", "1") == nil)  // relative to its home
        #expect(dom0.read("/local/domain/5/data/x") == .success("1"))
        #expect(g5.getPerms("data/x") == ["n5"])  // owns what it creates
        #expect(g5.readError("/local/domain/6/secret") == "EACCES")
        #expect(g5.readError("/local/domain/6/missing") == "EACCES")  // no probing
        #expect(g5.readError("/local/domain/5/missing") == "ENOENT")
        #expect(g5.write("/local/domain/6/x", "1") == "EACCES")
        #expect(g5.mkdir("/local/domain/6/y") == "EACCES")
        #expect(g5.rm("/local/domain/6/secret") == "EACCES")
        #expect(g5.write("/tool/x", "1") == "EACCES")
        #expect(g5.ls("/local/domain/6") == nil)
        #expect(g5.setPerms("/local/domain/6/secret", ["b5"]) == "EACCES")
        // Giving its node away is refused; granting read to domain 6 is fine.
        #expect(g5.setPerms("data/x", ["n6"]) == "EPERM")
        #expect(g5.setPerms("data/x", ["n5", "r6"]) == nil)
        let g6 = guest(core, 6)
        #expect(g6.read("/local/domain/5/data/x") == .success("1"))
        #expect(g6.write("/local/domain/5/data/x", "2") == "EACCES")
        // A child created by dom0 under a guest's node inherits the guest's ownership.
        dom0.write("/local/domain/5/data/x/byzero", "z")
        #expect(dom0.getPerms("/local/domain/5/data/x/byzero") == ["n5", "r6"])
        // Other-domains default access through entry 0.
        dom0.write("/pub/v", "p")
        dom0.setPerms("/pub/v", ["n0"])
        #expect(g6.readError("/pub/v") == "EACCES")
        dom0.setPerms("/pub/v", ["r0"])
        #expect(g6.read("/pub/v") == .success("p"))
        #expect(g6.write("/pub/v", "q") == "EACCES")
        dom0.setPerms("/pub/v", ["r0", "w6"])
        #expect(g6.write("/pub/v", "q") == nil)
        #expect(g6.readError("/pub/v") == "EACCES")  // its own entry (w) wins over entry 0
    }

    @Test func badPermissionStrings() {
        let (core, _) = makeCore()
        let c = CoreClient(core)
        c.write("/p", "")
        #expect(c.setPerms("/p", ["q0"]) == "EINVAL")
        #expect(c.setPerms("/p", ["r"]) == "EINVAL")
        #expect(c.send(.setPerms, c.fields(["/p"])).error == "EINVAL")
        #expect(c.setPerms("/missing", ["r0"]) == "ENOENT")
        #expect(c.setPerms("/p", ["r3", "w4", "n5"]) == nil)
        #expect(c.getPerms("/p") == ["r3", "w4", "n5"])
    }

    @Test func targetDomainActsAsOwner() {
        let (core, _) = makeCore()
        let dom0 = CoreClient(core)
        dom0.mkdir("/local/domain/5")
        dom0.setPerms("/local/domain/5", ["n5"])
        let dm = guest(core, 7)
        _ = guest(core, 5)
        #expect(dm.write("/local/domain/5/dm", "x") == "EACCES")
        #expect(dom0.send(.setTarget, dom0.fields(["7", "5"])).error == nil)
        #expect(dm.write("/local/domain/5/dm", "x") == nil)
    }
}

@Suite struct WatchTests {
    @Test func firesOnRegistrationNodeAndDescendants() {
        let (core, _) = makeCore()
        let a = CoreClient(core), b = CoreClient(core)
        #expect(a.watch("/w", "tok") == nil)
        #expect(a.pollEvents().map { $0.path } == ["/w"])  // once at registration
        #expect(a.watch("/w", "tok") == "EEXIST")
        b.write("/w", "1")
        b.write("/w/x/y", "2")
        b.write("/other", "3")
        b.write("/wx", "4")  // not below /w
        let ev = a.pollEvents()
        #expect(ev.map { $0.path } == ["/w", "/w/x/y"])
        #expect(ev.allSatisfy { $0.token == "tok" })
        b.rm("/w")
        #expect(a.pollEvents().map { $0.path } == ["/w"])
        #expect(a.send(.unwatch, a.fields(["/w", "tok"])).error == nil)
        #expect(a.send(.unwatch, a.fields(["/w", "tok"])).error == "ENOENT")
        b.write("/w", "again")
        #expect(a.pollEvents().isEmpty)
    }

    @Test func removalFiresWatchesBelow() {
        let (core, _) = makeCore()
        let a = CoreClient(core), b = CoreClient(core)
        b.write("/t/a/b/c", "1")
        a.watch("/t/a/b/c", "deep")
        _ = a.pollEvents()
        b.rm("/t/a")
        #expect(a.pollEvents().map { $0.path } == ["/t/a/b/c"])
    }

    @Test func relativeWatchReportsRelativePathsAndRespectsPerms() {
        let (core, _) = makeCore()
        let dom0 = CoreClient(core)
        dom0.mkdir("/local/domain/5")
        dom0.setPerms("/local/domain/5", ["n5"])
        let g = guest(core, 5)
        #expect(g.watch("device", "d") == nil)
        #expect(g.pollEvents().map { $0.path } == ["device"])
        dom0.write("/local/domain/5/device/vif/0/state", "1")
        #expect(g.pollEvents().map { $0.path } == ["device/vif/0/state"])
        // A node the guest can read neither itself nor through its parent is not
        // reported (C's watch_permitted: either is enough).
        dom0.mkdir("/local/domain/5/device/hidden")
        dom0.setPerms("/local/domain/5/device/hidden", ["n0"])
        dom0.write("/local/domain/5/device/hidden/x", "x")
        _ = g.pollEvents()
        dom0.write("/local/domain/5/device/hidden/x", "y")
        #expect(g.pollEvents().isEmpty)
        // Watching someone else's tree is allowed but silent.
        #expect(g.watch("/local/domain/0", "x") == nil)
        dom0.write("/local/domain/0/foo", "1")
        #expect(g.pollEvents().map { $0.path } == ["/local/domain/0"])  // only the registration event
    }

    @Test func specialWatchEventsAreForReaders() {
        let (core, _) = makeCore()
        let dom0 = CoreClient(core)
        let g = guest(core, 3)
        #expect(dom0.watch("@introduceDomain", "i") == nil)
        #expect(dom0.watch("@releaseDomain", "r") == nil)
        #expect(g.watch("@releaseDomain", "r") == nil)  // allowed, but silent: n0 (watch_permitted)
        _ = dom0.pollEvents(); _ = g.pollEvents()
        _ = guest(core, 4)
        #expect(dom0.pollEvents().map { $0.path } == ["@introduceDomain"])
        try! core.releaseDomain(4)
        #expect(dom0.pollEvents().map { $0.path } == ["@releaseDomain"])
        #expect(g.pollEvents().isEmpty)
    }

    @Test func resetWatchesAndQuota() {
        var q = XSQuotas(); q.maxWatches = 3
        let (core, _) = makeCore(q)
        let g = guest(core, 5)
        for i in 0..<3 { #expect(g.watch("w\(i)", "t") == nil) }
        #expect(g.watch("w3", "t") == "E2BIG")
        #expect(g.send(.resetWatches, []).error == nil)
        #expect(core.watchCount == 0)
        #expect(g.watch("w3", "t") == nil)
        // dom0 is not bound by the quota.
        let d = CoreClient(core)
        for i in 0..<10 { #expect(d.watch("/w\(i)", "t") == nil) }
    }

    /// C xenstored's check_event_timeout: a guest's undelivered events are dropped
    /// after the timeout, replies are kept, and the connection stays.
    @Test func undeliveredEventsExpire() {
        var q = XSQuotas(); q.watchEventTimeout = 20
        let (core, _) = makeCore(q)
        let dom0 = CoreClient(core)
        dom0.mkdir("/local/domain/5"); dom0.setPerms("/local/domain/5", ["n5"])
        let slow = guest(core, 5)
        let p = slow.fields(["e", "t"])    // its reply and registration event stay undelivered
        p.withUnsafeBytes { core.process(slow.conn, XSHeader(.watch, reqID: 1, txID: 0, len: UInt32(p.count)), $0) }
        dom0.write("/local/domain/5/e/x", "1")
        #expect(slow.conn.pendingMessages == 3)
        let t = monotonicSeconds()
        core.expireStalled(now: t + 19)
        #expect(slow.conn.pendingMessages == 3)
        core.expireStalled(now: t + 21)
        #expect(!slow.conn.closed)
        let left = slow.drain()
        #expect(left.map(\.type) == [XSType.watch.rawValue])
        dom0.write("/local/domain/5/e/y", "1")
        #expect(slow.pollEvents().map(\.path) == ["e/y"])
    }

    /// A reader that never drains holds at most one pending event per (path, token)
    /// (send_event's duplicate check) and, for a guest, at most its output quota of
    /// events; it is not disconnected.
    @Test func slowReaderIsBoundedNotDisconnected() {
        var q = XSQuotas(); q.maxOutputBytes = 4096
        let (core, _) = makeCore(q)
        let dom0 = CoreClient(core)
        dom0.mkdir("/s"); dom0.setPerms("/s", ["n0", "r5"])
        let slow = guest(core, 5)
        slow.watch("/s", "t"); _ = slow.pollEvents()
        for i in 0..<10000 { dom0.write("/s/\(i % 10)", "x") }
        #expect(!slow.conn.closed)
        #expect(slow.conn.pendingMessages == 10)
        for i in 0..<10000 { dom0.write("/s/n\(i)", "x") }
        #expect(!slow.conn.closed)
        #expect(slow.conn.pendingBytes <= 4096)
        #expect(core.watchCount == 1)
        #expect(dom0.write("/s/after", "ok") == nil)
    }
}

@Suite struct TransactionTests {
    /// As in C xenstored, a transaction sees each node as at its first access there;
    /// a change after that access makes the commit fail.
    @Test func snapshotAndCommit() {
        let (core, _) = makeCore()
        let a = CoreClient(core), b = CoreClient(core)
        a.write("/t/x", "old")
        let tx = a.txStart()
        #expect(tx != 0)
        #expect(a.read("/t/x", tx: tx) == .success("old"))
        b.write("/t/x", "outside")
        #expect(a.read("/t/x", tx: tx) == .success("old"))  // the transaction's copy
        #expect(a.read("/t/x") == .success("outside"))
        #expect(a.txEnd(tx, commit: true) == "EAGAIN")  // read a node changed outside
        #expect(a.read("/t/x") == .success("outside"))  // outside write survives
    }

    @Test func conflictGivesEagainAndOutsideWriteSurvives() {
        let (core, _) = makeCore()
        let a = CoreClient(core), b = CoreClient(core)
        a.write("/c/v", "0")
        let tx = a.txStart()
        #expect(a.read("/c/v", tx: tx) == .success("0"))
        #expect(a.write("/c/v", "from-tx", tx: tx) == nil)
        #expect(b.read("/c/v") == .success("0"))  // invisible outside before commit
        b.write("/c/v", "from-outside")
        #expect(a.txEnd(tx, commit: true) == "EAGAIN")
        #expect(b.read("/c/v") == .success("from-outside"))
        #expect(a.send(.read, a.fields(["/c/v"]), tx: tx).error == "ENOENT")  // gone
    }

    @Test func commitAppliesAndFiresWatchesOnce() {
        let (core, _) = makeCore()
        let a = CoreClient(core), w = CoreClient(core)
        w.watch("/k", "t"); _ = w.pollEvents()
        let tx = a.txStart()
        a.write("/k/a", "1", tx: tx)
        a.write("/k/b/c", "2", tx: tx)
        a.rm("/k/a", tx: tx)
        #expect(a.ls("/k", tx: tx) == ["b"])
        #expect(w.pollEvents().isEmpty)  // nothing until commit
        #expect(b(a.read("/k/b/c")) == "ENOENT")
        #expect(a.txEnd(tx, commit: true) == nil)
        #expect(a.read("/k/b/c") == .success("2"))
        #expect(a.readError("/k/a") == "ENOENT")
        #expect(Set(w.pollEvents().map { $0.path }) == Set(["/k/a", "/k/b/c"]))
    }

    @Test func abortLeavesNoTrace() {
        let (core, _) = makeCore()
        let a = CoreClient(core), w = CoreClient(core)
        a.write("/keep", "k")
        w.watch("/", "all"); _ = w.pollEvents()
        let before = core.store.nodes
        let tx = a.txStart()
        a.write("/gone/deep/node", "1", tx: tx)
        a.rm("/keep", tx: tx)
        a.setPerms("/tool", ["r0"])  // outside the transaction: a real change
        _ = w.pollEvents()
        #expect(a.txEnd(tx, commit: false) == nil)
        #expect(a.readError("/gone") == "ENOENT")
        #expect(a.read("/keep") == .success("k"))
        #expect(w.pollEvents().isEmpty)
        var after = core.store.nodes
        after["/tool"]?.perms = before["/tool"]!.perms
        after["/tool"]?.generation = before["/tool"]!.generation
        #expect(after == before)
        #expect(core.connections.values.allSatisfy { $0.transactions.isEmpty })
    }

    @Test func transactionErrors() {
        let (core, _) = makeCore()
        let a = CoreClient(core)
        let tx = a.txStart()
        #expect(a.send(.transactionStart, [0], tx: tx).error == "EBUSY")
        #expect(a.send(.transactionEnd, a.fields(["X"]), tx: tx).error == "EINVAL")
        #expect(a.send(.transactionEnd, a.fields(["T"])).error == "ENOENT")  // no transaction
        #expect(a.txEnd(tx, commit: true) == nil)
        #expect(a.txEnd(tx, commit: true) == "ENOENT")
        // Another connection cannot use my transaction id.
        let tx2 = a.txStart()
        let b = CoreClient(core)
        #expect(b.send(.read, b.fields(["/tool"]), tx: tx2).error == "ENOENT")
    }

    @Test func transactionQuotas() {
        var q = XSQuotas(); q.maxTransactions = 2; q.maxTransactionNodes = 8
        let (core, _) = makeCore(q)
        let dom0 = CoreClient(core)
        dom0.mkdir("/local/domain/5"); dom0.setPerms("/local/domain/5", ["n5"])
        let g = guest(core, 5)
        let t1 = g.txStart(), t2 = g.txStart()
        #expect(g.send(.transactionStart, [0]).error == "ENOSPC")
        var err: String? = nil
        for i in 0..<20 where err == nil { err = g.write("n\(i)", "v", tx: t1) }
        #expect(err == "ENOSPC")
        #expect(g.txEnd(t1, commit: false) == nil)
        #expect(g.txEnd(t2, commit: true) == nil)
        #expect(g.send(.transactionStart, [0]).error == nil)
    }
}

@Suite struct QuotaTests {
    func setup(_ q: XSQuotas) -> (XenStoreCore, CoreClient, CoreClient) {
        let (core, _) = makeCore(q)
        let dom0 = CoreClient(core)
        dom0.mkdir("/local/domain/5"); dom0.setPerms("/local/domain/5", ["n5"])
        return (core, dom0, guest(core, 5))
    }

    @Test func nodeCount() {
        var q = XSQuotas(); q.maxNodes = 5
        let (core, dom0, g) = setup(q)
        // The home directory (given to dom5 by dom0) is one of its 5 nodes.
        for i in 0..<4 { #expect(g.write("n\(i)", "v") == nil) }
        #expect(g.write("n5", "v") == "ENOSPC")
        #expect(g.write("a/b", "v") == "ENOSPC")
        #expect(g.rm("n0") == nil)
        #expect(g.write("n5", "v") == nil)
        #expect(dom0.write("/local/domain/5/byzero", "v") == nil)  // dom0 exempt
        #expect(core.store.ownedCount(5, nil) == 6)  // inherits guest ownership
        #expect(dom0.send(.control, dom0.fields(["quota", "5"])).string.contains("nodes 6"))
    }

    /// C's do_transaction_end checks the node quota again at commit
    /// (acc_fix_domains): transactions each within the quota on their own
    /// cannot together take a guest past it.
    @Test func nodeCountHoldsAcrossTransactions() {
        var q = XSQuotas(); q.maxNodes = 6
        let (core, dom0, g) = setup(q)
        // The home directory is one of the 6; each transaction adds 3.
        let t1 = g.txStart(), t2 = g.txStart()
        #expect(g.write("a/b/c", "v", tx: t1) == nil)
        #expect(g.write("x/y/z", "v", tx: t2) == nil)
        #expect(g.txEnd(t1, commit: true) == nil)
        #expect(g.txEnd(t2, commit: true) == "ENOSPC")
        #expect(g.readError("x") == "ENOENT")
        #expect(core.store.ownedCount(5, nil) == 4)
        // A commit that removes as much as it adds is fine, and dom0 is not bound.
        let t3 = g.txStart()
        #expect(g.rm("a", tx: t3) == nil)
        #expect(g.write("p/q/r", "v", tx: t3) == nil)
        #expect(g.txEnd(t3, commit: true) == nil)
        let t4 = dom0.txStart()
        for i in 0..<5 { #expect(dom0.write("/local/domain/5/d\(i)", "v", tx: t4) == nil) }
        #expect(dom0.txEnd(t4, commit: true) == nil)
    }

    @Test func defaultNodeQuotaIs1000() {
        let (core, _, g) = setup(.default)
        var err: String? = nil
        var i = 0
        // Spread over directories: a directory's child names count against node size.
        while err == nil && i < 2000 { err = g.write("d\(i / 50)/n\(i % 50)", ""); i += 1 }
        #expect(err == "ENOSPC")
        #expect(core.store.ownedCount(5, nil) >= 999 && core.store.ownedCount(5, nil) <= 1000)
    }

    /// C's calc_node_acc_size: a 16-byte header and 8 bytes per permission count too.
    @Test func nodeSize() {
        let (_, dom0, g) = setup(.default)
        #expect(g.write("big", String(repeating: "x", count: 2024)) == nil)  // 16 + 8 + 2024 = 2048
        #expect(g.write("big", String(repeating: "x", count: 2025)) == "ENOSPC")
        #expect(g.setPerms("big", ["n5", "r0"]) == "ENOSPC")  // a second permission: 2056
        #expect(g.write("big", String(repeating: "x", count: 2016)) == nil)
        #expect(g.setPerms("big", ["n5", "r0"]) == nil)
        #expect(g.write("new", String(repeating: "x", count: 3000)) == "ENOSPC")
        #expect(dom0.write("/local/domain/5/big", String(repeating: "x", count: 4000)) == nil)
        // A node a write creates on the way holds its child's name: 16 + 8 + 2025.
        #expect(g.write("dir/" + String(repeating: "n", count: 2024), "") == "ENOSPC")
        #expect(g.readError("dir") == "ENOENT", "nothing of a refused write is made")
        #expect(g.write("dir/" + String(repeating: "n", count: 2023), "") == nil)
    }

    @Test func pathLength() {
        let (_, dom0, g) = setup(.default)
        let ok = Array(repeating: String(repeating: "p", count: 63), count: 32).joined(separator: "/") + "q"
        #expect(ok.utf8.count == 2048)
        #expect(g.write(ok, "") == nil)
        #expect(g.write(ok + "q", "") == "EINVAL")
        #expect(dom0.write("/local/domain/5/" + ok + "q", "") == nil)
    }

    @Test func permsPerNode() {
        let (_, _, g) = setup(.default)
        g.write("p", "")
        #expect(g.setPerms("p", ["n5", "r1", "r2", "r3", "r4"]) == nil)
        #expect(g.setPerms("p", ["n5", "r1", "r2", "r3", "r4", "r6"]) == "ENOSPC")
    }

    @Test func perDomainOverride() {
        let (core, _) = makeCore()
        var q = XSQuotas(); q.maxNodes = 2
        core.domainQuotas[6] = q
        let dom0 = CoreClient(core)
        for d in [5, 6] { dom0.mkdir("/local/domain/\(d)"); dom0.setPerms("/local/domain/\(d)", ["n\(d)"]) }
        let g5 = guest(core, 5), g6 = guest(core, 6)
        #expect(g6.write("a", "") == nil)
        #expect(g6.write("b", "") == "ENOSPC")
        #expect(g5.write("a", "") == nil && g5.write("b", "") == nil && g5.write("c", "") == nil)
    }
}

@Suite struct ReleaseTests {
    @Test func releaseCleansUpNodesWatchesAndFires() {
        let (core, host) = makeCore()
        let dom0 = CoreClient(core)
        dom0.mkdir("/local/domain/5"); dom0.setPerms("/local/domain/5", ["n5"])
        let g = guest(core, 5)
        g.write("data", "1")
        g.write("/local/domain/5/x/y", "2")
        dom0.mkdir("/shared"); dom0.setPerms("/shared", ["n0", "w5"])
        #expect(g.write("/shared/mine", "m") == nil)
        #expect(dom0.getPerms("/shared/mine") == ["n5", "w5"])
        g.watch("data", "t")
        let tx = g.txStart()
        g.write("txnode", "x", tx: tx)
        dom0.watch("@releaseDomain", "r"); dom0.watch("/local/domain/5", "home")
        _ = dom0.pollEvents()
        #expect(core.watchCount == 3)
        try! core.releaseDomain(5)
        #expect(host.detached == [5])
        #expect(g.conn.closed)
        #expect(core.watchCount == 2)
        #expect(core.connections.values.allSatisfy { $0.transactions.isEmpty })
        #expect(dom0.readError("/local/domain/5") == "ENOENT")
        #expect(dom0.readError("/shared/mine") == "ENOENT")  // owned by 5: removed, as C does
        #expect(core.store.ownedCount(5, nil) == 0)
        #expect(Set(dom0.pollEvents().map { $0.path }) == Set(["/local/domain/5", "@releaseDomain"]))
        #expect(throws: XSError.ENOENT) { try core.releaseDomain(5) }
    }
}

private func b(_ r: Result<String, XSError>) -> String? {
    if case .failure(let e) = r { return e.rawValue }
    return nil
}
