import CXen
import Glibc
import XenHV
import XenStore

/// A guest's xenstore ring driven by hand (xenstore-ring.txt): the test writes
/// xsd_sockmsg frames into `req` and reads `rsp` only when it chooses to, so a
/// frontend that floods requests and never reads its replies can be played.
/// The guest's usual ``XenBusClient`` must not be used on the same ring.
public final class RawXenStoreRing: @unchecked Sendable {
    let page: GuestRegion
    let channel: EventChannel
    typealias XDI = xenstore_domain_interface
    static let reqCons = MemoryLayout<XDI>.offset(of: \.req_cons)!
    static let reqProd = MemoryLayout<XDI>.offset(of: \.req_prod)!
    static let rspCons = MemoryLayout<XDI>.offset(of: \.rsp_cons)!
    static let rspProd = MemoryLayout<XDI>.offset(of: \.rsp_prod)!
    static let rspBase = MemoryLayout<XDI>.offset(of: \.rsp)!
    static let size: UInt32 = 1024
    private var pending: [UInt8] = []

    /// The ring of a guest whose hypervisor connection is `hv` (start_info's store page and port).
    public init(hypervisor hv: Hypervisor, storeMFN: UInt64, storePort: EventPort) throws {
        page = try hv.memory!.region.slice(offset: Int(storeMFN) * 4096, length: 4096)
        channel = try hv.channel(storePort)
    }

    public static func message(_ type: XSType, _ strings: [String], reqID: UInt32, tx: UInt32 = 0) -> [UInt8] {
        var payload: [UInt8] = []
        for s in strings { payload += Array(s.utf8) + [0] }
        var out: [UInt8] = []
        for v in [type.rawValue, reqID, tx, UInt32(payload.count)] { withUnsafeBytes(of: v.littleEndian) { out += $0 } }
        return out + payload
    }

    /// Copies as much of `bytes` as the request ring has room for; returns how many went.
    public func send(_ bytes: [UInt8]) throws -> Int {
        let cons: UInt32 = try page.load(at: Self.reqCons)
        let prod: UInt32 = try page.load(at: Self.reqProd)
        let room = Int(Self.size - (prod &- cons))
        let n = min(room, bytes.count)
        for i in 0..<n { try page.store(bytes[i], at: Int((prod &+ UInt32(i)) % Self.size)) }
        cxen_wmb()
        try page.store(prod &+ UInt32(n), at: Self.reqProd)
        if n > 0 { try channel.notify() }
        return n
    }

    /// Bytes the daemon has published in `rsp` and we have not consumed.
    public func unreadResponseBytes() throws -> Int {
        let cons: UInt32 = try page.load(at: Self.rspCons)
        let prod: UInt32 = try page.load(at: Self.rspProd)
        return Int(prod &- cons)
    }

    /// Whether the daemon has consumed all of our requests.
    public func requestsConsumed() throws -> Bool {
        let cons: UInt32 = try page.load(at: Self.reqCons)
        let prod: UInt32 = try page.load(at: Self.reqProd)
        return cons == prod
    }

    /// Consumes every response byte available and returns the whole messages
    /// among them (type, req_id, payload); partial messages wait for the next call.
    public func drain() throws -> [(type: UInt32, reqID: UInt32, payload: [UInt8])] {
        let cons: UInt32 = try page.load(at: Self.rspCons)
        let prod: UInt32 = try page.load(at: Self.rspProd)
        cxen_rmb()
        var i = cons
        while i != prod {
            pending.append(try page.load(UInt8.self, at: Self.rspBase + Int(i % Self.size)))
            i &+= 1
        }
        cxen_mb()
        try page.store(prod, at: Self.rspCons)
        try channel.notify()
        var out: [(UInt32, UInt32, [UInt8])] = []
        while pending.count >= 16 {
            func u32(_ o: Int) -> UInt32 { pending[o..<o + 4].reversed().reduce(0) { $0 << 8 | UInt32($1) } }
            let len = Int(u32(12))
            guard pending.count >= 16 + len else { break }
            out.append((u32(0), u32(4), Array(pending[16..<16 + len])))
            pending.removeFirst(16 + len)
        }
        return out
    }
}
