// The xs_wire codec: message types, error names and the 16-byte header of
// /usr/include/xen/io/xs_wire.h, imported through CXen.
import CXen

/// Message types of `enum xsd_sockmsg_type` (xs_wire.h). Raw values are checked
/// against the C enum in the tests.
public enum XSType: UInt32, Sendable, CaseIterable {
    case control = 0
    case directory = 1
    case read = 2
    case getPerms = 3
    case watch = 4
    case unwatch = 5
    case transactionStart = 6
    case transactionEnd = 7
    case introduce = 8
    case release = 9
    case getDomainPath = 10
    case write = 11
    case mkdir = 12
    case rm = 13
    case setPerms = 14
    case watchEvent = 15
    case error = 16
    case isDomainIntroduced = 17
    case resume = 18
    case setTarget = 19
    // 20 was XS_RESTRICT, removed from the protocol.
    case resetWatches = 21
    case directoryPart = 22

    /// Requests only privileged connections may send (XS_FLAG_PRIV in C xenstored's
    /// wire_funcs); others get EACCES.
    var privilegedOnly: Bool {
        switch self {
        case .control, .introduce, .release, .isDomainIntroduced, .resume, .setTarget: return true
        default: return false
        }
    }
}

/// Errors travel as their errno *names* (`struct xsd_errors` in xs_wire.h).
public enum XSError: String, Error, Sendable, CaseIterable {
    case EINVAL, EACCES, EEXIST, EISDIR, ENOENT, ENOMEM, ENOSPC, EIO, ENOTEMPTY
    case ENOSYS, EROFS, EBUSY, EAGAIN, EISCONN, E2BIG, EPERM

    /// Name as sent on the wire, NUL-terminated.
    var wirePayload: [UInt8] { Array(rawValue.utf8) + [0] }
}

/// `struct xsd_sockmsg`: four native-endian u32 (the wire is host order on both transports).
public struct XSHeader: Sendable, Equatable {
    public static let size = MemoryLayout<xsd_sockmsg>.size  // 16
    public var type: UInt32
    public var reqID: UInt32
    public var txID: UInt32
    public var len: UInt32

    public init(type: UInt32, reqID: UInt32, txID: UInt32, len: UInt32) {
        self.type = type; self.reqID = reqID; self.txID = txID; self.len = len
    }
    public init(_ t: XSType, reqID: UInt32 = 0, txID: UInt32 = 0, len: UInt32 = 0) {
        self.init(type: t.rawValue, reqID: reqID, txID: txID, len: len)
    }

    /// Decodes from the first 16 bytes at `p` (no alignment required).
    @inline(__always)
    public init(from p: UnsafeRawPointer) {
        // Sound: the caller guarantees 16 readable bytes; loadUnaligned copies them out.
        let m = p.loadUnaligned(as: xsd_sockmsg.self)
        self.init(type: m.type, reqID: m.req_id, txID: m.tx_id, len: m.len)
    }

    @inline(__always)
    public func append(to out: inout [UInt8]) {
        var m = xsd_sockmsg(type: type, req_id: reqID, tx_id: txID, len: len)
        withUnsafeBytes(of: &m) { out.append(contentsOf: $0) }
    }
}

/// Payload helpers: xenstore payloads are sequences of NUL-terminated strings.
public enum XSPayload {
    /// Splits a payload into its NUL-separated fields. A trailing NUL ends the last
    /// field; bytes after the last NUL form a final unterminated field.
    public static func split(_ p: UnsafeRawBufferPointer) -> [UnsafeRawBufferPointer] {
        var out: [UnsafeRawBufferPointer] = []
        var start = 0
        for i in 0..<p.count where p[i] == 0 {
            out.append(UnsafeRawBufferPointer(rebasing: p[start..<i]))
            start = i + 1
        }
        if start < p.count { out.append(UnsafeRawBufferPointer(rebasing: p[start..<p.count])) }
        return out
    }

    /// Builds "a\0b\0...".
    public static func strings(_ s: [String]) -> [UInt8] {
        var out: [UInt8] = []
        for x in s { out.append(contentsOf: x.utf8); out.append(0) }
        return out
    }
}

extension String {
    /// Decodes bytes as UTF-8 with repair; xenstore names are ASCII after validation.
    @inline(__always)
    init(xsBytes b: UnsafeRawBufferPointer) {
        self = String(decoding: b, as: UTF8.self)
    }
}
