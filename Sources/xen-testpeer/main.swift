// A peer process for the integration tests: plays a guest (on an inherited
// hypervisor connection) or a dom0 mapper (on xenhv's socket), driven by one
// command per line on stdin, one reply line on stdout.
import CXen
import Glibc
import XenHV
import XenRing

/// Replies go straight to fd 1, unbuffered, one line each.
func reply(_ s: String) {
    let line = s + "\n"
    _ = line.withCString { write(1, $0, strlen($0)) }
}
let args = CommandLine.arguments
let hv: Hypervisor
do {
    if args.count >= 3, args[1] == "dom0" {
        hv = try Hypervisor.connect(socketPath: args[2])
    } else {
        hv = try Hypervisor.guestFromEnvironment()
    }
} catch {
    reply("error \(error)")
    exit(1)
}

nonisolated(unsafe) var maps: [GrantHandle: GrantMapping] = [:]
nonisolated(unsafe) var channels: [EventPort: EventChannel] = [:]
nonisolated(unsafe) var fronts: [UInt32: FrontRing<BlkifRing>] = [:]

func hex(_ b: [UInt8]) -> String {
    let digits = Array("0123456789abcdef")
    return String(b.flatMap { [digits[Int($0 >> 4)], digits[Int($0 & 15)]] })
}
func unhex(_ s: Substring) -> [UInt8] {
    var out: [UInt8] = []
    var i = s.startIndex
    while i < s.endIndex, let j = s.index(i, offsetBy: 2, limitedBy: s.endIndex), let v = UInt8(s[i..<j], radix: 16) {
        out.append(v)
        i = j
    }
    return out
}
func channel(_ port: EventPort) throws -> EventChannel {
    if let c = channels[port] { return c }
    let c = try hv.channel(port)
    channels[port] = c
    return c
}

func execute(_ w: [Substring]) throws -> String {
    func u(_ i: Int) -> UInt32 { UInt32(w[i]) ?? UInt32.max }
    switch w.first {
    case "info":
        let si = hv.startInfo
        return "domid \(hv.domid) pages \(si?.nrPages ?? 0) store_mfn \(si?.storeMFN ?? 0) store_port \(si?.storeEventChannel ?? 0) magic \(si?.magic ?? "")"
    case "grant":
        hv.grantTable!.grantAccess(u(1), to: DomID(u(2)), frame: u(3), readOnly: w[4] == "ro")
        return "ok"
    case "raw":
        hv.grantTable!.writeRawEntry(u(1), flags: UInt16(u(2)), domid: DomID(u(3)), frame: u(4))
        return "ok"
    case "end":
        return hv.grantTable!.endAccess(u(1)) ? "ok" : "busy"
    case "flags":
        return "\(hv.grantTable!.flags(u(1)))"
    case "write":
        let b = unhex(w[3])
        try b.withUnsafeBytes { try hv.memory!.region.write($0, at: Int(u(1)) * 4096 + Int(u(2))) }
        return "ok"
    case "read":
        return hex(try hv.memory!.region.bytes(at: Int(u(1)) * 4096 + Int(u(2)), count: Int(u(3))))
    case "setup":
        try hv.setupGrantTable(frames: u(1))
        return "ok"
    case "alloc":
        return "\(try hv.allocUnbound(remote: DomID(u(1))))"
    case "wait":
        try channel(u(1)).wait()
        return "woke"
    case "notify":
        try channel(u(1)).notify()
        return "ok"
    case "bind":
        let c = try hv.bindInterdomain(remote: DomID(u(1)), remotePort: u(2))
        channels[c.port] = c
        return "\(c.port)"
    case "close":
        try hv.close(port: u(1))
        channels[u(1)] = nil
        return "ok"
    case "map":
        switch hv.mapGrant(domid: DomID(u(1)), ref: u(2), writable: w[3] == "rw") {
        case .success(let m):
            maps[m.handle] = m
            return "ok \(m.handle)"
        case .failure(let s):
            return "err \(s.rawValue)"
        }
    case "lock":
        // Takes a grant entry's lock and keeps it: a mapper killed between
        // the two locks of an operation.
        return hv.holdEntryLockForTesting(domid: DomID(u(1)), ref: u(2)) ? "ok" : "err"
    case "mwrite":
        let b = unhex(w[3])
        try b.withUnsafeBytes { try maps[u(1)]!.region.write($0, at: Int(u(2))) }
        return "ok"
    case "unmap":
        let s = hv.unmap(handle: u(1))
        maps[u(1)] = nil
        return "\(s.rawValue)"
    case "ring-init":
        // Initialise a one-page blkif ring at our frame N (front end).
        let ring = try hv.memory!.region.ring(BlkifRing.self, pages: 1, offset: Int(u(1)) * 4096)
        fronts[u(1)] = FrontRing(initializing: ring)
        return "ok"
    case "ring-push":
        // Queue N requests with ids 0..N-1 and publish, honestly.
        guard var front = fronts[u(1)] else { return "error no ring" }
        defer { fronts[u(1)] = front }
        for i in 0..<u(2) {
            var r = blkif_request()
            r.id = UInt64(i)
            r.operation = UInt8(BLKIF_OP_READ)
            guard front.enqueue(r) else { return "full" }
        }
        return front.pushRequestsAndCheckNotify() ? "notify" : "quiet"
    case "ring-lie":
        // A lying producer: publish req_prod = N whatever was queued.
        try hv.memory!.region.store(u(2), at: Int(u(1)) * 4096)
        return "ok"
    case "create":
        // A guest must not be able to act as the toolstack.
        do { _ = try hv.createDomain(pages: 16, name: "evil"); return "created" } catch { return "error \(error)" }
    case "setmax":
        // Nor raise its own port limit (XEN_DOMCTL_set_max_evtchn is the toolstack's).
        try hv.setMaxEventChannels(DomID(u(1)), u(2))
        return "ok"
    case "map-foreign":
        // A guest must not be able to map grants through the dom0 path.
        switch hv.mapGrant(domid: DomID(u(1)), ref: u(2), writable: true) {
        case .success: return "mapped"
        case .failure(let s): return "err \(s.rawValue)"
        }
    case "shutdown":
        do { try hv.shutdownSelf(rawReason: u(1)); return "ok" } catch { return "error \(error)" }
    case "exit":
        exit(0)
    default:
        return "error unknown command"
    }
}

reply("ready domid \(hv.domid)")
while let line = readLine() {
    let words = line.split(separator: " ")
    do { reply(try execute(words)) } catch { reply("error \(error)") }
}
