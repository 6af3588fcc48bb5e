import CXen

/// A Xen errno, as the hypercalls return it negated (xen/errno.h).
public struct XenErrno: Error, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: Int32
    public init(_ rawValue: Int32) { self.rawValue = rawValue }

    public static let EPERM = XenErrno(1)
    public static let ENOENT = XenErrno(2)
    public static let ESRCH = XenErrno(3)
    public static let EIO = XenErrno(5)
    public static let E2BIG = XenErrno(7)
    public static let EBADF = XenErrno(9)
    public static let EAGAIN = XenErrno(11)
    public static let ENOMEM = XenErrno(12)
    public static let EACCES = XenErrno(13)
    public static let EFAULT = XenErrno(14)
    public static let EBUSY = XenErrno(16)
    public static let EEXIST = XenErrno(17)
    public static let EINVAL = XenErrno(22)
    public static let EMFILE = XenErrno(24)
    public static let ENOSPC = XenErrno(28)
    public static let ENOSYS = XenErrno(38)

    public var name: String {
        switch rawValue {
        case 1: "EPERM"; case 2: "ENOENT"; case 3: "ESRCH"; case 5: "EIO"; case 7: "E2BIG"
        case 9: "EBADF"; case 11: "EAGAIN"; case 12: "ENOMEM"; case 13: "EACCES"; case 14: "EFAULT"
        case 16: "EBUSY"; case 17: "EEXIST"; case 22: "EINVAL"; case 24: "EMFILE"; case 28: "ENOSPC"
        case 38: "ENOSYS"
        default: "errno \(rawValue)"
        }
    }
    public var description: String { "-\(name)" }
}

/// A grant-table operation status, `GNTST_*` from grant_table.h.
public struct GrantStatus: Error, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: Int16
    public init(_ rawValue: Int16) { self.rawValue = rawValue }

    public static let okay = GrantStatus(Int16(GNTST_okay))
    public static let generalError = GrantStatus(Int16(GNTST_general_error))
    public static let badDomain = GrantStatus(Int16(GNTST_bad_domain))
    public static let badGntref = GrantStatus(Int16(GNTST_bad_gntref))
    public static let badHandle = GrantStatus(Int16(GNTST_bad_handle))
    public static let badVirtAddr = GrantStatus(Int16(GNTST_bad_virt_addr))
    public static let permissionDenied = GrantStatus(Int16(GNTST_permission_denied))
    public static let badPage = GrantStatus(Int16(GNTST_bad_page))
    public static let badCopyArg = GrantStatus(Int16(GNTST_bad_copy_arg))
    public static let eagain = GrantStatus(Int16(GNTST_eagain))
    public static let noSpace = GrantStatus(Int16(GNTST_no_space))

    public var description: String {
        switch self {
        case .okay: "GNTST_okay"
        case .generalError: "GNTST_general_error"
        case .badDomain: "GNTST_bad_domain"
        case .badGntref: "GNTST_bad_gntref"
        case .badHandle: "GNTST_bad_handle"
        case .badVirtAddr: "GNTST_bad_virt_addr"
        case .permissionDenied: "GNTST_permission_denied"
        case .badPage: "GNTST_bad_page"
        case .badCopyArg: "GNTST_bad_copy_arg"
        case .eagain: "GNTST_eagain"
        case .noSpace: "GNTST_no_space"
        default: "GNTST(\(rawValue))"
        }
    }
}

/// Failure talking to the xenhv daemon itself (not a hypercall error).
public enum HypervisorError: Error, CustomStringConvertible, Sendable {
    case cannotConnect(path: String, errno: Int32)
    case connectionLost
    case protocolViolation(String)
    case system(call: String, errno: Int32)

    public var description: String {
        switch self {
        case let .cannotConnect(path, e): "cannot connect to xenhv at \(path): \(String(cString: strerror(e)))"
        case .connectionLost: "connection to xenhv lost"
        case let .protocolViolation(m): "xenhv protocol violation: \(m)"
        case let .system(call, e): "\(call): \(String(cString: strerror(e)))"
        }
    }
}

#if canImport(Glibc)
import Glibc
#endif

extension String {
    /// Control characters (newlines, ESC, DEL, C1) written as Swift escapes,
    /// `\n` or `\u{1B}`: for a log or error line that quotes what a user or a
    /// guest wrote: it stays one line, and no escape sequence reaches a terminal.
    public var escapingControlCharacters: String {
        guard unicodeScalars.contains(where: { $0.properties.generalCategory == .control }) else { return self }
        var out = ""
        for c in unicodeScalars {
            guard c.properties.generalCategory == .control else { out.unicodeScalars.append(c); continue }
            switch c {
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default: out += "\\u{" + String(c.value, radix: 16, uppercase: true) + "}"
            }
        }
        return out
    }
}
