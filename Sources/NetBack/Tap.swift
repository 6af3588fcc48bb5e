import CNetShim
import Glibc
import XenHV

/// A tap error: which ioctl or call failed, and errno.
public struct TapError: Error, CustomStringConvertible, Equatable, Sendable {
    public let operation: String
    public let errno: Int32
    public var description: String { "\(operation): \(String(cString: strerror(errno)))" }
}

/// The vif's Linux side: a tap (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, plus
/// `IFF_MULTI_QUEUE` when the frontend uses several queues), one descriptor
/// per queue. Every frame crossing it carries a `struct virtio_net_hdr`.
///
/// The device exists while any queue descriptor is open (it is not made
/// persistent), so closing the tap removes the netdev and its bridge port.
public final class Tap: @unchecked Sendable {
    // Sound: descriptors are immutable after init; reads and writes on a tap
    // descriptor are thread-safe in the kernel, and each queue has one user.
    public let name: String
    public let multiQueue: Bool
    /// One non-blocking descriptor per queue.
    public let queues: [CInt]

    /// Creates (or attaches to) tap `name` with `queues` queue descriptors;
    /// `exclusive` only creates (EBUSY when a device of that name exists), so
    /// a queue is never attached to a tap someone else made.
    public init(name: String, queues count: Int = 1, multiQueue: Bool? = nil, exclusive: Bool = false) throws(TapError) {
        precondition(count >= 1)
        let mq = multiQueue ?? (count > 1)
        precondition(mq || count == 1, "several queues need IFF_MULTI_QUEUE")
        var fds: [CInt] = []
        var actual = [CChar](repeating: 0, count: 16)
        for i in 0..<count {
            let fd = cnet_tap_open(name, mq ? 1 : 0, exclusive && i == 0 ? 1 : 0, &actual)
            guard fd >= 0 else {
                fds.forEach { _ = Glibc.close($0) }
                throw TapError(operation: "TUNSETIFF \(name)", errno: -fd)
            }
            fds.append(fd)
        }
        self.name = cString(actual)
        self.multiQueue = mq
        self.queues = fds
        // The 10-byte virtio_net_hdr (no mergeable-buffer count).
        for fd in fds {
            let r = cnet_tap_set_vnet_hdr_size(fd, Int32(VnetHeader.size))
            guard r == 0 else {
                fds.forEach { _ = Glibc.close($0) }
                throw TapError(operation: "TUNSETVNETHDRSZ \(name)", errno: -r)
            }
        }
    }

    deinit { queues.forEach { _ = Glibc.close($0) } }

    /// `TUNSETOFFLOAD`: which offloads the kernel may hand us on read (what the
    /// frontend accepts: checksum offload, TSO4/TSO6). Applies to the device.
    public func setOffload(checksum: Bool, tso4: Bool, tso6: Bool) throws(TapError) {
        var f: UInt32 = 0
        if checksum {
            f |= CNET_TUN_F_CSUM
            if tso4 { f |= CNET_TUN_F_TSO4 }
            if tso6 { f |= CNET_TUN_F_TSO6 }
            if tso4 || tso6 { f |= CNET_TUN_F_TSO_ECN }
        }
        let r = cnet_tap_set_offload(queues[0], f)
        guard r == 0 else { throw TapError(operation: "TUNSETOFFLOAD \(name)", errno: -r) }
    }

    /// `TUNSETCARRIER`: the carrier the bridge sees (off for a stalled guest).
    public func setCarrier(_ on: Bool) throws(TapError) {
        let r = cnet_tap_set_carrier(queues[0], on ? 1 : 0)
        guard r == 0 else { throw TapError(operation: "TUNSETCARRIER \(name)", errno: -r) }
    }

    /// The IFF_* flags the first queue was opened with (TUNGETIFF).
    public var flags: Int32 { cnet_tap_get_flags(queues[0]) }

    /// The vif name Xen uses: `vif<domid>.<devid>`.
    public static func vifName(domid: UInt16, devid: UInt32) -> String { "vif\(domid).\(devid)" }
}
