// Guests over the xenstore ring: a real memfd page mapped twice (daemon side, guest
// side) and real eventfds in each direction, with the daemon's event loop running on
// its own thread and the guest played by the XenBus ring client (or by raw writes).
import CXen
import Foundation
import Glibc
import Synchronization
import Testing
@testable import XenBus
@testable import XenStore
import XenTestKit

/// One guest's ring: shared page + two eventfds.
final class TestRing: @unchecked Sendable {
    let memfd: Int32
    let daemonPage: UnsafeMutableRawPointer
    let guestPage: UnsafeMutableRawPointer
    let toDaemon: Int32  // guest -> daemon notifications
    let toGuest: Int32   // daemon -> guest notifications
    let released = Atomic<Bool>(false)

    init() {
        memfd = cxen_memfd_create("xs-ring", 0)
        precondition(memfd >= 0)
        ftruncate(memfd, 4096)
        daemonPage = mmap(nil, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0)!
        guestPage = mmap(nil, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0)!
        toDaemon = cxen_eventfd(0, O_CLOEXEC | O_NONBLOCK)
        toGuest = cxen_eventfd(0, O_CLOEXEC | O_NONBLOCK)
    }

    deinit {
        if !released.load(ordering: .sequentiallyConsistent) { munmap(daemonPage, 4096) }
        munmap(guestPage, 4096)
        close(memfd); close(toDaemon); close(toGuest)
    }

    static func kick(_ fd: Int32) {
        var one: UInt64 = 1
        _ = withUnsafeBytes(of: &one) { write(fd, $0.baseAddress, 8) }
    }

    var daemonPort: XenstoreRingPort {
        let g = toGuest
        return XenstoreRingPort(page: daemonPage, eventFD: toDaemon, notify: { TestRing.kick(g) },
                                release: { [self] in
                                    if !self.released.exchange(true, ordering: .sequentiallyConsistent) {
                                        munmap(self.daemonPage, 4096)
                                    }
                                })
    }

    var guestPort: XenBusRingPort {
        let d = toDaemon
        return XenBusRingPort(page: guestPage, eventFD: toGuest, notify: { TestRing.kick(d) })
    }

    func word(_ kp: KeyPath<xenstore_domain_interface, UInt32>) -> UnsafeMutablePointer<UInt32> {
        (guestPage + MemoryLayout<xenstore_domain_interface>.offset(of: kp)!).assumingMemoryBound(to: UInt32.self)
    }
    func load(_ kp: KeyPath<xenstore_domain_interface, UInt32>) -> UInt32 { cxen_load_acquire_u32(word(kp)) }
    func store(_ kp: KeyPath<xenstore_domain_interface, UInt32>, _ v: UInt32) { cxen_store_release_u32(word(kp), v) }

    /// Raw guest write of bytes into the request ring (must fit).
    func rawWrite(_ bytes: [UInt8]) {
        var prod = load(\.req_prod)
        let reqOff = MemoryLayout<xenstore_domain_interface>.offset(of: \.req)!
        for b in bytes {
            guestPage.storeBytes(of: b, toByteOffset: reqOff + Int(prod & 1023), as: UInt8.self)
            prod &+= 1
        }
        cxen_wmb()
        store(\.req_prod, prod)
        TestRing.kick(toDaemon)
    }
}

/// xenstored's event loop on a thread, with a socket and a ring provider over TestRings.
final class InProcessDaemon: @unchecked Sendable {
    let daemon: XenStoreDaemon
    let handle: XenStoreDaemonHandle
    let socketPath: String
    let dir: String
    final class Table: Sendable { let m = Mutex<[DomID: TestRing]>([:]) }
    let rings = Table()
    let done = DispatchSemaphore(value: 0)

    init(quotas: XSQuotas = .default, domainQuotas: [DomID: XSQuotas] = [:]) throws {
        var template = Array("/tmp/xs-ring-XXXXXX".utf8CString)
        dir = String(cString: mkdtemp(&template)!)
        socketPath = dir + "/socket"
        let core = XenStoreCore(quotas: quotas)
        core.domainQuotas = domainQuotas
        daemon = try XenStoreDaemon(core: core)
        try daemon.listen(path: socketPath)
        handle = daemon.handle
        let rings = self.rings
        // The "hypervisor": (domid, mfn, port) -> the guest's ring; mfn must be 1000+domid.
        core.ringProvider = { domid, mfn, _ in
            guard mfn == 1000 + UInt64(domid), let r = rings.m.withLock({ $0[domid] }) else {
                throw XSError.EINVAL
            }
            return r.daemonPort
        }
        let d = daemon
        let sem = done
        nonisolated(unsafe) let unsafeD = d
        Thread { unsafeD.run(); sem.signal() }.start()
    }

    func addRing(_ domid: DomID) -> TestRing {
        let r = TestRing()
        rings.m.withLock { $0[domid] = r }
        return r
    }

    func stop() {
        handle.stop()
        done.wait()
        unlink(socketPath)
        rmdir(dir)
    }

    /// Runs `body` on the daemon thread and waits for it.
    func onDaemon<T: Sendable>(_ body: @escaping @Sendable (XenStoreCore) -> T) -> T {
        let sem = DispatchSemaphore(value: 0)
        let box = Mutex<T?>(nil)
        handle.perform { core in box.withLock { $0 = body(core) }; sem.signal() }
        sem.wait()
        return box.withLock { $0! }
    }

    func dom0() throws -> XenBusClient { try XenBusClient.connect(socketPath: socketPath) }

    /// Introduces `domid` with a fresh ring, gives it its home directory, returns its client.
    func startGuest(_ domid: DomID, _ dom0: XenBusClient) throws -> (XenBusClient, TestRing) {
        let r = try introduceRing(domid, dom0)
        return (XenBusClient.guest(r.guestPort), r)
    }

    /// A guest's ring, its home given to it and the domain introduced; the
    /// test plays the guest on the ring itself.
    func introduceRing(_ domid: DomID, _ dom0: XenBusClient) throws -> TestRing {
        let r = addRing(domid)
        try dom0.mkdir("/local/domain/\(domid)")
        try dom0.setPermissions("/local/domain/\(domid)", [XSPerm(domid, .none)])
        try dom0.introduce(domid: domid, mfn: 1000 + UInt64(domid), port: 1)
        return r
    }
}


@Suite(.serialized) struct RingTransportTests {
    /// INTRODUCE of an introduced domain (C's do_introduce → domain_conn_reset):
    /// the connection starts over — its watches and transactions gone, the
    /// ring's indices zeroed, a guest waiting in XENSTORE_RECONNECT told
    /// CONNECTED — on the same port's binding, which stays; a new client on
    /// the ring is served.
    @Test func introducingADomainAgainResetsItsConnection() throws {
        let d = try InProcessDaemon()
        defer { d.stop() }
        let dom0 = try d.dom0()
        defer { dom0.close() }
        let (g5, ring) = try d.startGuest(5, dom0)
        _ = try g5.watch("data", token: "mine") { _ in }
        _ = try g5.transactionStart()
        try g5.write("data/x", "1")
        #expect(d.onDaemon { $0.domains[5]!.conn!.watches.count } == 1)
        #expect(d.onDaemon { $0.domains[5]!.conn!.transactions.count } == 1)
        g5.close()
        ring.store(\.connection, UInt32(XENSTORE_RECONNECT))

        try dom0.introduce(domid: 5, mfn: 1005, port: 1)
        #expect(ring.load(\.req_prod) == 0 && ring.load(\.req_cons) == 0 && ring.load(\.rsp_prod) == 0 && ring.load(\.rsp_cons) == 0)
        #expect(ring.load(\.connection) == UInt32(XENSTORE_CONNECTED))
        #expect(d.onDaemon { $0.domains[5]!.conn!.watches.count } == 0)
        #expect(d.onDaemon { $0.domains[5]!.conn!.transactions.count } == 0)
        // The same binding serves a guest that starts over.
        let again = XenBusClient.guest(ring.guestPort)
        defer { again.close() }
        #expect(try again.read("data/x") == "1")
        try again.write("data/y", "2")
        #expect(try dom0.read("/local/domain/5/data/y") == "2")
    }

    @Test func guestOwnSubtreeOthersRefusedWatchesFire() async throws {
        let d = try InProcessDaemon()
        defer { d.stop() }
        let dom0 = try d.dom0()
        defer { dom0.close() }
        let (g5, _) = try d.startGuest(5, dom0)
        let (g6, _) = try d.startGuest(6, dom0)
        defer { g5.close(); g6.close() }
        #expect(try dom0.isDomainIntroduced(5))
        try g5.write("data/name", "five")                       // relative
        try g5.write("/local/domain/5/data/abs", "x")           // absolute, own tree
        #expect(try g5.read("data/name") == "five")
        #expect(try dom0.read("/local/domain/5/data/name") == "five")
        #expect(try g5.directory("data") == ["name", "abs"])
        try g6.write("secret", "six")
        #expect(throws: XenBusError.xs(.EACCES)) { try g5.read("/local/domain/6/secret") }
        #expect(throws: XenBusError.xs(.EACCES)) { try g5.write("/local/domain/6/secret", "pwn") }
        #expect(throws: XenBusError.xs(.EACCES)) { try g5.rm("/local/domain/6/secret") }
        #expect(throws: XenBusError.xs(.EACCES)) { try g5.introduce(domid: 9, mfn: 1009, port: 1) }
        #expect(try g6.read("secret") == "six")
        #expect(try g5.getDomainPath(5) == "/local/domain/5")

        // Watches: the registration event, then changes by dom0 below it.
        let w = try g5.watch("device")
        var it = w.makeAsyncIterator()
        #expect(await it.next() == XenBusWatchEvent(path: "device", token: w.token))
        try dom0.write("/local/domain/5/device/vif/0/state", "1")
        #expect(await it.next() == XenBusWatchEvent(path: "device/vif/0/state", token: w.token))
        // Callback delivery.
        let seen = Mutex<[String]>([])
        let cb = try g5.watch("/local/domain/5/cb") { e in seen.withLock { $0.append(e.path) } }
        try g5.write("cb/x", "1")
        #expect(eventually { seen.withLock { $0 } == ["/local/domain/5/cb", "/local/domain/5/cb/x"] })
        try g5.unwatch(cb)
        // A large value crosses the 1 KiB ring several times in both directions.
        let big = String(repeating: "0123456789abcdef", count: 120)
        try g5.write("big", big)
        #expect(try g5.read("big") == big)
    }

    @Test func corruptedIndexKillsOnlyThatConnection() throws {
        let d = try InProcessDaemon()
        defer { d.stop() }
        let dom0 = try d.dom0()
        defer { dom0.close() }
        let (good, _) = try d.startGuest(7, dom0)
        defer { good.close() }
        let badRing = d.addRing(8)
        try dom0.mkdir("/local/domain/8")
        try dom0.introduce(domid: 8, mfn: 1008, port: 1)
        // Bogus producer index: more than a ring's worth ahead of the consumer.
        badRing.store(\.req_prod, badRing.load(\.req_cons) &+ 5000)
        TestRing.kick(badRing.toDaemon)
        #expect(eventually { badRing.load(\.error) == UInt32(XENSTORE_ERROR_RINGIDX) })
        #expect(eventually { badRing.released.load(ordering: .sequentiallyConsistent) })
        // Everyone else is fine.
        try good.write("still", "here")
        #expect(try dom0.read("/local/domain/7/still") == "here")
        #expect(try dom0.isDomainIntroduced(8))  // the domain stays until released
        try dom0.release(domid: 8)
        #expect(try !dom0.isDomainIntroduced(8))

        // A consumer index for the response ring that runs ahead of what we produced.
        let (g10, r10) = try d.startGuest(10, dom0)
        try g10.write("a", "1")
        g10.close()
        r10.store(\.rsp_cons, r10.load(\.rsp_prod) &+ 3000)
        // The next reply to dom10 finds the bogus index and ends its connection.
        r10.rawWrite(RawSocketClient.message(.read, Array("a".utf8) + [0], reqID: 77))
        #expect(eventually { r10.load(\.error) == UInt32(XENSTORE_ERROR_RINGIDX) })
        #expect(eventually { r10.released.load(ordering: .sequentiallyConsistent) })
        try good.write("still2", "here")
        #expect(try dom0.read("/local/domain/7/still2") == "here")
    }

    @Test func oversizedPayloadKillsOnlyThatConnection() throws {
        let d = try InProcessDaemon()
        defer { d.stop() }
        let dom0 = try d.dom0()
        defer { dom0.close() }
        let (good, _) = try d.startGuest(7, dom0)
        defer { good.close() }
        let r = d.addRing(9)
        try dom0.introduce(domid: 9, mfn: 1009, port: 1)
        var hdr: [UInt8] = []
        XSHeader(.write, reqID: 1, txID: 0, len: 4097).append(to: &hdr)
        r.rawWrite(hdr + [UInt8](repeating: 0x41, count: 100))
        #expect(eventually { r.load(\.error) == UInt32(XENSTORE_ERROR_PROTO) })
        // Nothing was answered on the dead ring.
        #expect(r.load(\.rsp_prod) == 0)
        try good.write("ok", "1")
        #expect(try dom0.read("/local/domain/7/ok") == "1")
        let count = d.onDaemon { $0.connectionCount }
        #expect(count == 2)  // dom0 socket + guest 7
    }

    @Test func outstandingRequestsAreThrottledNotDropped() throws {
        var q = XSQuotas(); q.maxOutstanding = 4
        let d = try InProcessDaemon(quotas: q)
        defer { d.stop() }
        let dom0 = try d.dom0()
        defer { dom0.close() }
        let r = try d.introduceRing(4, dom0)
        // 30 small reads queued at once (fits the 1 KiB ring); nobody consumes replies.
        var batch: [UInt8] = []
        for i in 0..<30 { batch += RawSocketClient.message(.read, Array("/local/domain/4".utf8) + [0], reqID: UInt32(i + 1)) }
        #expect(batch.count <= 1024)
        r.rawWrite(batch)
        // The daemon answers until the response ring is full, then stops: undelivered
        // replies never exceed one ring plus the outstanding quota.
        usleep(1)
        #expect(eventually { r.load(\.rsp_prod) > 0 })
        let pending = d.onDaemon { core in core.connections.values.first { $0.domid == 4 }!.pendingMessages }
        #expect(pending <= 4)
        // Drain as a guest would and check every reply arrives, in order.
        let client = XenBusClient.guest(r.guestPort)  // its reader consumes responses
        defer { client.close() }
        _ = client
        #expect(eventually { r.load(\.req_cons) == r.load(\.req_prod) })
        #expect(eventually { d.onDaemon { core in core.connections.values.first { $0.domid == 4 }?.pendingMessages ?? -1 } == 0 })
    }

    /// A dom0 client's watch events are never dropped; those a guest's writes
    /// cause while the client does not read hold that guest's requests back
    /// (C's outstanding-request quota), so the daemon does not grow for it.
    @Test func eventsForASlowDom0ClientHoldTheGuestBack() throws {
        var q = XSQuotas(); q.maxCausedEvents = 8
        let d = try InProcessDaemon(quotas: q)
        defer { d.stop() }
        let dom0 = try d.dom0()
        defer { dom0.close() }
        let r = try d.introduceRing(4, dom0)
        // A dom0 client that watches the guest's home and then reads nothing
        // (no transport: its output only grows).
        let serial = d.onDaemon { core -> Int in
            let c = CoreClient(core)
            c.watch("/local/domain/4", "w")  // its reply and the registration event read
            return c.conn.serial
        }
        func written() -> Int { d.onDaemon { core in core.store.nodes.keys.filter { $0.hasPrefix("/local/domain/4/x") }.count } }
        var batch: [UInt8] = []
        for i in 0..<20 { batch += RawSocketClient.message(.write, Array("/local/domain/4/x\(i)".utf8) + [0, 0x31], reqID: UInt32(i + 1)) }
        #expect(batch.count <= 1024)
        r.rawWrite(batch)
        // Eight writes are served, then the guest's requests wait on its ring.
        #expect(eventually { d.onDaemon { $0.connections[serial]!.pendingMessages } == 8 })
        #expect(written() == 8)
        // Each time the client reads what it was sent, up to eight more are served.
        func readAll() { d.onDaemon { core in let c = core.connections[serial]!; c.consumed(c.pendingBytes) } }
        readAll()
        #expect(eventually { written() == 16 })
        #expect(d.onDaemon { $0.connections[serial]!.pendingMessages } == 8)
        readAll()
        #expect(eventually { written() == 20 })
        #expect(d.onDaemon { core in core.domains[4]!.conn!.causedEvents } == 4)
        // A dom0 client that goes away releases what it held.
        d.onDaemon { core in core.closeConnection(core.connections[serial]!, reason: "test") }
        #expect(d.onDaemon { core in core.domains[4]!.conn!.causedEvents } == 0)
    }

    @Test func releaseFromHypervisorCleansUpAndFiresReleaseDomain() throws {
        let d = try InProcessDaemon()
        defer { d.stop() }
        let dom0 = try d.dom0()
        defer { dom0.close() }
        let events = Mutex<[String]>([])
        _ = try dom0.watch("@releaseDomain") { e in events.withLock { $0.append(e.path) } }
        let (g, ring) = try d.startGuest(3, dom0)
        defer { g.close() }
        try g.write("x", "1")
        _ = try g.watch("x")
        #expect(eventually { events.withLock { $0.count } == 1 })  // registration event
        d.handle.releaseDomain(3)  // what the hypervisor core calls on domain death
        #expect(eventually { events.withLock { $0.count } == 2 })
        #expect(try !dom0.isDomainIntroduced(3))
        #expect(try !dom0.exists("/local/domain/3"))
        #expect(eventually { ring.released.load(ordering: .sequentiallyConsistent) })
        #expect(d.onDaemon { $0.watchCount } == 1)  // only dom0's @releaseDomain remains
    }

    @Test func ringQuotaErrors() throws {
        var q = XSQuotas(); q.maxWatches = 2; q.maxTransactions = 1
        let d = try InProcessDaemon(domainQuotas: [5: q])
        defer { d.stop() }
        let dom0 = try d.dom0()
        defer { dom0.close() }
        let (g, _) = try d.startGuest(5, dom0)
        defer { g.close() }
        _ = try g.watch("a"); _ = try g.watch("b")
        #expect(throws: XenBusError.xs(.E2BIG)) { _ = try g.watch("c") }
        let t = try g.transactionStart()
        #expect(throws: XenBusError.xs(.ENOSPC)) { _ = try g.transactionStart() }
        try g.transactionEnd(t, commit: false)
        #expect(throws: XenBusError.xs(.ENOSPC)) { try g.write("v", String(repeating: "x", count: 3000)) }
        #expect(throws: XenBusError.xs(.EINVAL)) { try g.write(String(repeating: "p", count: 2049), "") }
    }
}

@Suite(.serialized) struct RingRobustnessTests {
    /// Guests writing garbage (random bytes, random indices) lose at most their own
    /// connection; the daemon and other clients carry on.
    @Test func garbageFromGuestsIsContained() throws {
        let d = try InProcessDaemon()
        defer { d.stop() }
        let dom0 = try d.dom0()
        defer { dom0.close() }
        var rng = SplitMix(state: 42)
        for domid in DomID(20)..<DomID(40) {
            let r = d.addRing(domid)
            try dom0.introduce(domid: domid, mfn: 1000 + UInt64(domid), port: 1)
            if domid % 3 == 0 {
                // Random indices.
                r.store(\.req_prod, UInt32.random(in: 0...UInt32.max, using: &rng))
                r.store(\.rsp_cons, UInt32.random(in: 0...UInt32.max, using: &rng))
                TestRing.kick(r.toDaemon)
            } else {
                // A plausible header with random type and length, then random bytes.
                var m: [UInt8] = []
                XSHeader(type: UInt32.random(in: 0...30, using: &rng), reqID: 1, txID: UInt32.random(in: 0...2, using: &rng),
                         len: UInt32.random(in: 0...600, using: &rng)).append(to: &m)
                m += (0..<Int.random(in: 0...700, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
                r.rawWrite(Array(m.prefix(1024)))
            }
            try dom0.write("/alive/\(domid)", "yes")
        }
        #expect(try dom0.directory("/alive").count == 20)
        #expect(d.onDaemon { $0.domains.count } == 20)
        for domid in DomID(20)..<DomID(40) { try dom0.release(domid: domid) }
        #expect(d.onDaemon { $0.domains.count } == 0)
    }
}

@Suite(.serialized) struct XenBusClientTests {
    /// Short-lived clients (a toolstack's): a closed client's reader never
    /// reads from the descriptor number the next connection reuses (it would
    /// steal that client's replies: a 30 s timeout), and every closed client is
    /// freed with its descriptor.
    @Test func shortLivedClientsNeitherStealRepliesNorLeakDescriptors() throws {
        let d = try InProcessDaemon()
        defer { d.stop() }
        final class Weak: @unchecked Sendable { weak var client: XenBusClient? }
        var gone: [Weak] = []
        for i in 0..<300 {
            let c = try d.dom0()
            c.timeout = 5
            try c.write("/short/\(i % 10)", "\(i)")
            #expect(try c.read("/short/\(i % 10)") == "\(i)")
            c.close()
            let w = Weak()
            w.client = c
            gone.append(w)
        }
        // Each closed client (and with it its socket) goes once its reader has stopped.
        #expect(eventually { gone.allSatisfy { $0.client == nil } }, "\(gone.filter { $0.client != nil }.count) closed clients still alive")
    }

    @Test func transactionsRetryOnEagain() throws {
        let d = try InProcessDaemon()
        defer { d.stop() }
        let a = try d.dom0(), b = try d.dom0()
        defer { a.close(); b.close() }
        try a.write("/counter", "0")
        let attempts = Mutex(0)
        try a.transaction { t in
            let n = attempts.withLock { $0 += 1; return $0 }
            let v = Int(try t.read("/counter"))!
            if n == 1 { try b.write("/counter", "100") }  // conflicting outside write
            try t.write("/counter", "\(v + 1)")
        }
        #expect(attempts.withLock { $0 } == 2)
        #expect(try a.read("/counter") == "101")
        // A body error aborts, leaving no trace.
        struct Boom: Error {}
        #expect(throws: Boom.self) {
            try a.transaction { t in try t.write("/aborted", "1"); throw Boom() }
        }
        #expect(try !a.exists("/aborted"))
    }

    @Test func operationsAndPermissions() throws {
        let d = try InProcessDaemon()
        defer { d.stop() }
        let c = try d.dom0()
        defer { c.close() }
        try c.mkdir("/x/y")
        try c.write("/x/v", bytes: [0, 1, 2])
        #expect(try c.readBytes("/x/v") == [0, 1, 2])
        #expect(try c.directory("/x") == ["y", "v"])
        try c.setPermissions("/x/v", [XSPerm(3, .read), XSPerm(4, .both)])
        #expect(try c.getPermissions("/x/v") == [XSPerm(3, .read), XSPerm(4, .both)])
        #expect(try c.readIfExists("/x/nope") == nil)
        try c.rm("/x")
        #expect(try !c.exists("/x/y"))
        for i in 0..<300 { try c.write("/big/entry-with-a-long-name-\(i)", "") }
        #expect(try c.directory("/big").count == 300)  // through DIRECTORY_PART
        #expect(try c.control("print", ["hello"]) == "OK")
    }

    @Test func deviceLayoutAndStateMachine() async throws {
        let d = try InProcessDaemon()
        defer { d.stop() }
        let toolstack = try d.dom0()
        defer { toolstack.close() }
        let (guest, _) = try d.startGuest(5, toolstack)
        defer { guest.close() }
        let dev = XenBusDevice(type: "vif", frontendDomid: 5, devid: 0)
        #expect(dev.backendPath == "/local/domain/0/backend/vif/5/0")
        #expect(dev.frontendPath == "/local/domain/5/device/vif/0")
        #expect(XenBusDevice(backendPath: dev.backendPath + "/state") == dev)
        try toolstack.createDevice(dev, backend: ["mac": "00:16:3e:00:00:01", "bridge": "xenbr0"])
        #expect(try toolstack.read(dev.backendPath + "/frontend") == dev.frontendPath)
        #expect(try toolstack.read(dev.frontendPath + "/backend-id") == "0")
        #expect(try toolstack.getPermissions(dev.frontendPath) == [XSPerm(5, .none), XSPerm(0, .read)])
        #expect(try toolstack.getPermissions(dev.backendPath) == [XSPerm(0, .none), XSPerm(5, .read)])
        // The guest reads its backend's directory and writes its own.
        #expect(try guest.read(dev.backendPath + "/mac") == "00:16:3e:00:00:01")
        #expect(throws: XenBusError.xs(.EACCES)) { try guest.write(dev.backendPath + "/state", "4") }
        #expect(try guest.state(at: dev.frontendPath) == .initialising)
        // Backend goes InitWait; frontend waits for it, then connects.
        let backendDir = dev.backendPath
        let waiter = Task { try await guest.waitForState(at: backendDir) { $0 == .initWait } }
        try toolstack.switchState(at: dev.backendPath, to: .initWait)
        #expect(try await waiter.value == .initWait)
        try guest.write(dev.frontendPath + "/tx-ring-ref", "8")
        try guest.switchState(at: dev.frontendPath, to: .connected)
        #expect(try await toolstack.waitForState(at: dev.frontendPath) { $0 == .connected } == .connected)
        // A state that never comes: `.timeout` at the deadline (the watch fired
        // once, at registration, and never again), not a wait for ever.
        let stuck = Task { try await toolstack.waitForState(at: dev.frontendPath, timeout: 0.3) { $0 == .closed } }
        let bound = Task { try await Task.sleep(nanoseconds: 10_000_000_000); stuck.cancel() }
        await #expect(throws: XenBusError.timeout) { try await stuck.value }
        bound.cancel()
        #expect(XenbusState(string: "4\n") == .connected)
        #expect(XenbusState(rawValue: Int(XenbusStateReconfigured.rawValue)) == .reconfigured)
        try toolstack.destroyDevice(dev)
        #expect(try !toolstack.exists(dev.backendPath))
    }

    /// A hotplug (`exclusive`) is refused only by dom0's record of the device,
    /// the backend directory: the frontend one is the guest's to make, and a
    /// guest making it first must not refuse its toolstack the device
    /// (libxl__device_exists); the guest's leftover is replaced.
    @Test func aGuestCannotRefuseItsToolstackADevice() throws {
        let d = try InProcessDaemon()
        defer { d.stop() }
        let toolstack = try d.dom0()
        defer { toolstack.close() }
        let (guest, _) = try d.startGuest(5, toolstack)
        defer { guest.close() }
        let dev = XenBusDevice(type: "vbd", frontendDomid: 5, devid: 51728)
        try guest.mkdir(dev.frontendPath + "/junk")
        try toolstack.createDevice(dev, backend: ["params": "/img"], frontend: ["virtual-device": "51728"], exclusive: true)
        #expect(try toolstack.readIfExists(dev.frontendPath + "/junk") == nil, "the guest's leftover was replaced")
        #expect(try toolstack.read(dev.frontendPath + "/backend") == dev.backendPath)
        #expect(throws: XenBusError.xs(.EEXIST)) {
            try toolstack.createDevice(dev, backend: ["params": "/other"], exclusive: true)
        }
        #expect(try toolstack.read(dev.backendPath + "/params") == "/img")
    }
}

/// The guest's side of the ring when xenstored is gone: a send into a full
/// request ring that nobody consumes gives up (`.timeout`) instead of hanging
/// the guest, and a ring the daemon marked broken (`error`) is closed.
@Suite struct GuestRingSendTests {
    static func transport(stalledSendLimit: Double) -> (XenBusRingTransport, UnsafeMutableRawPointer, Int32) {
        let page = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        page.initializeMemory(as: UInt8.self, repeating: 0, count: 4096)
        let efd = cxen_eventfd(0, O_CLOEXEC | O_NONBLOCK)
        let t = XenBusRingTransport(port: XenBusRingPort(page: page, eventFD: efd, notify: {}), stalledSendLimit: stalledSendLimit)
        return (t, page, efd)
    }

    /// What `send` threw, or nil.
    static func send(_ t: XenBusRingTransport, _ bytes: [UInt8]) -> XenBusError? {
        bytes.withUnsafeBytes { b -> XenBusError? in
            do throws(XenBusError) { try t.send(b); return nil } catch { return error }
        }
    }

    @Test func aSendNobodyConsumesTimesOut() throws {
        let (t, page, efd) = Self.transport(stalledSendLimit: 0.2)
        defer { t.close(); close(efd); page.deallocate() }
        let bytes = [UInt8](repeating: 0x41, count: 1500)  // more than the 1024-byte request ring
        #expect(Self.send(t, bytes) == .timeout)
        // The ring got what fitted, and no more.
        let reqProd = page.load(fromByteOffset: MemoryLayout<xenstore_domain_interface>.offset(of: \.req_prod)!, as: UInt32.self)
        #expect(reqProd == UInt32(XENSTORE_RING_SIZE))
    }

    @Test func aRingTheDaemonGaveUpOnIsClosedForSends() throws {
        let (t, page, efd) = Self.transport(stalledSendLimit: 30)
        defer { t.close(); close(efd); page.deallocate() }
        page.storeBytes(of: UInt32(1), toByteOffset: MemoryLayout<xenstore_domain_interface>.offset(of: \.error)!, as: UInt32.self)
        #expect(Self.send(t, [UInt8](repeating: 1, count: 16)) == .closed)
    }
}
