import NBD
import XenHVDaemon
import XenStore

/// Fuzz entry points over the project's real code. libFuzzer calls them through
/// `xen-fuzz` (scripts/fuzz); the normal test suite replays every corpus file
/// and every crash ever found through the same functions.
public enum FuzzTarget: String, CaseIterable, Sendable {
    /// A back end consuming a ring whose header and slots are arbitrary bytes,
    /// with the producer index rewritten between passes.
    case ringConsumer = "ring-consumer"
    /// A front end consuming responses a lying back end published.
    case ringProducer = "ring-producer"
    /// xenstored's message handling: xs_wire messages from a guest and dom0.
    case xsWire = "xs-wire"
    /// xenstored's reader of a guest's xenstore ring page.
    case xsRing = "xs-ring"
    /// blkback's request decoding and validation, both ABIs.
    case blkifRequest = "blkif-request"
    /// netback's transmit packet assembly and offload header setup.
    case netifTx = "netif-tx"
    /// xenhv's handling of what a guest process sends on its connection.
    case hvRequest = "hv-request"
    /// xenctl's xl.cfg reader and its disk, vif and CPU list specifications.
    case xlConfig = "xl-config"
    /// The NBD server pvguest exports its disks with, as a local client reaches it.
    case nbdServer = "nbd-server"

    /// Called by a process that runs nothing but the targets (the fuzzer, the
    /// replay tool): the checks that need the whole process to themselves are on.
    public static func aloneInProcess() {
        XenHVFuzzing.checkDescriptors = true
    }

    public func run(_ data: UnsafeRawBufferPointer) {
        switch self {
        case .ringConsumer: fuzzRingConsumer(data)
        case .ringProducer: fuzzRingProducer(data)
        case .xsWire: XenStoreFuzzing.wire(data)
        case .xsRing: XenStoreFuzzing.ring(data)
        case .blkifRequest: fuzzBlkifRequest(data)
        case .netifTx: fuzzNetifTx(data)
        case .hvRequest: XenHVFuzzing.request(data)
        case .xlConfig: fuzzXLConfig(data)
        case .nbdServer: NBDFuzzing.session(data)
        }
    }
}

/// Reads fuzz input as a little stream of values; past the end it yields zeros.
struct FuzzInput {
    let data: UnsafeRawBufferPointer
    var at = 0
    init(_ data: UnsafeRawBufferPointer) { self.data = data }
    var remaining: Int { max(0, data.count - at) }
    mutating func u8() -> UInt8 {
        guard at < data.count else { return 0 }
        defer { at += 1 }
        return data[at]
    }
    mutating func u32() -> UInt32 {
        var v: UInt32 = 0
        for i in 0..<4 { v |= UInt32(u8()) << (8 * UInt32(i)) }
        return v
    }
    /// Copies up to `n` bytes into `dst`.
    mutating func fill(_ dst: UnsafeMutableRawPointer, _ n: Int) {
        let k = min(n, remaining)
        if k > 0 { dst.copyMemory(from: data.baseAddress! + at, byteCount: k) }
        at += k
    }
}
