import Glibc
import XenHV

/// An AF_PACKET socket bound to tap `name`: a frame sent on it goes out
/// through the tap (the host transmits on it), so netback reads it from the
/// tap's queue. The caller closes it.
public func tapSender(_ name: String) throws -> CInt {
    let s = socket(AF_PACKET, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard s >= 0 else { throw HypervisorError.system(call: "AF_PACKET socket", errno: errno) }
    // struct sockaddr_ll: family u16, protocol be16, ifindex i32, hatype u16, pkttype u8, halen u8, addr[8].
    var sll = [UInt8](repeating: 0, count: 20)
    sll.withUnsafeMutableBytes { b in
        b.storeBytes(of: UInt16(AF_PACKET), toByteOffset: 0, as: UInt16.self)
        b.storeBytes(of: Int32(if_nametoindex(name)), toByteOffset: 4, as: Int32.self)
    }
    guard sll.withUnsafeBytes({ bind(s, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), 20) }) == 0 else {
        let e = errno
        close(s)
        throw HypervisorError.system(call: "bind AF_PACKET to \(name)", errno: e)
    }
    return s
}
