import CXen
import Logging

/// Entry points for ringtests' fuzz targets: the daemon's real code paths,
/// fed bytes a hostile guest could produce. They must never crash; `wire` also
/// checks that every request on a live connection gets its reply.
public enum XenStoreFuzzing {
    static let quiet: Logger = {
        var l = Logger(label: "xenstored-fuzz")
        l.logLevel = .critical
        return l
    }()

    /// A store with a guest (domid 1, owning its home) and dom0, as after XS_INTRODUCE.
    static func setUp() -> (XenStoreCore, XSConnection, XSConnection) {
        let core = XenStoreCore(quotas: .default, logger: quiet)
        let dom0 = core.newConnection(domid: 0, privileged: true)
        let guest = core.newConnection(domid: 1, privileged: false)
        let setup: [[String]] = [["/local/domain/1/name", "g"], ["/local/domain/2/secret", "s"]]
        for (i, w) in setup.enumerated() {
            let p = XSPayload.strings([w[0]]) + Array(w[1].utf8)
            p.withUnsafeBytes { core.process(dom0, XSHeader(.write, reqID: UInt32(i), len: UInt32(p.count)), $0) }
        }
        for (path, owner) in [("/local/domain/1", "n1"), ("/local/domain/2", "n2")] {
            let p = XSPayload.strings([path, owner])
            p.withUnsafeBytes { core.process(dom0, XSHeader(.setPerms, reqID: 9, len: UInt32(p.count)), $0) }
        }
        dom0.consumed(dom0.pendingBytes)
        return (core, dom0, guest)
    }

    /// A stream of xs_wire messages (a selector byte, a 16-byte header, the
    /// payload) from the guest or dom0, framed as the transports frame them.
    public static func wire(_ data: UnsafeRawBufferPointer) {
        let (core, dom0, guest) = setUp()
        var at = 0
        while at + 1 + XSHeader.size <= data.count {
            let conn = data[at] & 1 == 0 ? guest : dom0
            at += 1
            var h = XSHeader(from: data.baseAddress! + at)
            at += XSHeader.size
            // The transports refuse a payload over XENSTORE_PAYLOAD_MAX before parsing.
            if h.len > UInt32(XENSTORE_PAYLOAD_MAX) { h.len %= UInt32(XENSTORE_PAYLOAD_MAX) + 1 }
            let len = min(Int(h.len), data.count - at)
            h.len = UInt32(len)
            guard !conn.closed else { continue }
            let before = conn.pendingMessages
            core.process(conn, h, UnsafeRawBufferPointer(rebasing: data[at..<(at + len)]))
            at += len
            precondition(conn.closed || conn.pendingMessages > before, "request without a reply")
            conn.consumed(conn.pendingBytes)
        }
    }

    /// A guest's xenstore ring page with arbitrary contents and indices, serviced
    /// by the real ring endpoint; the guest rewrites the page between passes.
    public static func ring(_ data: UnsafeRawBufferPointer) {
        let (core, _, guest) = setUp()
        let page = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { page.deallocate() }
        page.initializeMemory(as: UInt8.self, repeating: 0, count: 4096)
        let endpoint = RingEndpoint(conn: guest, port: XenstoreRingPort(page: page, eventFD: -1, notify: {}))
        var at = 0
        for _ in 0..<8 {
            // The guest writes a chunk of the page (ring bytes or indices), then kicks.
            guard at + 4 <= data.count else { break }
            let off = Int(UInt16(data[at]) | UInt16(data[at + 1]) << 8) % 4096
            let n = min(Int(data[at + 2]) * 4 + 4, data.count - at - 3, 4096 - off)
            at += 3
            (page + off).copyMemory(from: data.baseAddress! + at, byteCount: n)
            at += n
            // A corrupt ring ends the connection; anything else is served (ASan
            // and the guard of the 4 KiB allocation catch any access off the page).
            if case .corrupt = endpoint.service(core) { break }
            guard !guest.closed else { break }
        }
    }
}
