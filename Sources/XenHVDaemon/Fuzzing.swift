import CXen
import Glibc
import Logging
import XenHV

/// Entry point for ringtests' `hv-request` target: xenhv's request handling
/// fed what a hostile guest process can send on its connection (any op, any
/// payload, in any order). It must never crash, must answer every request,
/// and destroying the domain afterwards must leave no descriptor behind.
public enum XenHVFuzzing {
    nonisolated(unsafe) static var daemon: HypervisorDaemon?
    /// Whether each input checks that the process holds as many descriptors
    /// after as before: only where nothing else runs (the fuzzer's own process;
    /// the test suite replays inputs beside other suites).
    nonisolated(unsafe) public static var checkDescriptors = false

    static func shared() -> HypervisorDaemon {
        if let d = daemon { return d }
        var quiet = Logger(label: "xenhv-fuzz")
        quiet.logLevel = .critical
        let path = "/tmp/xen-fuzz-hv-\(getpid()).sock"
        guard let d = try? HypervisorDaemon(configuration: .init(socketPath: path), logger: quiet) else {
            fatalError("xenhv-fuzz: cannot start a daemon at \(path)")
        }
        unlink(path)  // nothing connects; the listening descriptor stays
        // The daemon took SIGTERM, SIGINT and SIGHUP for its signalfd, which
        // nothing reads here: they are the fuzzer's again.
        _ = cxen_termination_unblock()
        daemon = d
        return d
    }

    /// Descriptors open in this process.
    static func openDescriptors() -> Int {
        guard let dir = opendir("/proc/self/fd") else { return -1 }
        defer { closedir(dir) }
        var n = 0
        while readdir(dir) != nil { n += 1 }
        return n
    }

    /// Records of [op selector][payload length][payload] from the guest's
    /// connection; the first says whether it greets first, as a real guest does.
    public static func request(_ data: UnsafeRawBufferPointer) {
        let hv = shared()
        let before = checkDescriptors ? openDescriptors() : 0
        let dom0 = HypervisorDaemon.Client(id: 0, fd: -1, domid: 0)
        dom0.greeted = true
        var create = WireWriter()
        create.u32(16); create.string("fuzz")
        let created = hv.answer(Int32(HVOp.createDomain.rawValue), create.bytes, client: dom0)
        hv.closeReplyDescriptors()
        precondition(created.code == 0, "createDomain failed: \(created.code)")
        var r = WireReader(created.payload)
        guard let domid = try? r.u16(), let guest = hv.clients.values.first(where: { $0.domid == domid }) else {
            preconditionFailure("no guest connection for the new domain")
        }
        var at = 0
        if data.count > 0 && data[0] & 1 == 1 { _ = hv.answer(Int32(HVOp.hello.rawValue), [], client: guest) }
        at = data.count > 0 ? 1 : 0
        while at + 2 <= data.count {
            let code = Int32(data[at] % 24)  // every op, and some that are none
            let len = min(Int(data[at + 1]), data.count - at - 2)
            let payload = Array(data[(at + 2)..<(at + 2 + len)])
            at += 2 + len
            guard hv.clients[guest.fd] === guest else { break }  // a request hung it up
            let reply = hv.answer(code, payload, client: guest)
            hv.closeReplyDescriptors()
            precondition(reply.code <= 0, "a reply's code is 0 or an errno")
        }
        var destroy = WireWriter()
        destroy.u16(domid)
        let gone = hv.answer(Int32(HVOp.destroyDomain.rawValue), destroy.bytes, client: dom0)
        hv.closeReplyDescriptors()
        precondition(gone.code == 0 || hv.domains[domid] == nil, "destroyDomain failed: \(gone.code)")
        // Domain ids are never reused in a real run; here the next input starts over.
        hv.nextDomID = hv.config.firstDomID
        if checkDescriptors {
            precondition(openDescriptors() == before, "descriptors leaked: \(before) before, \(openDescriptors()) after")
        }
    }
}
