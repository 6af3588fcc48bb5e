import CNetShim
import Glibc
import Synchronization
import XenHV

/// A failed link or bridge operation, with libnl's reason.
public struct NetlinkError: Error, CustomStringConvertible, Equatable, Sendable {
    /// What was attempted ("enslave vif1.0 to xenbr0").
    public let operation: String
    /// libnl's negative error code (NLE_*).
    public let code: Int32
    public let reason: String
    public var description: String { "\(operation): \(reason)" }
    /// NLE_OBJ_NOTFOUND / NLE_NODEV: the device does not exist.
    public var isNoSuchDevice: Bool { code == -12 || code == -31 }
}

/// Facts about one link, as rtnetlink reports them.
public struct LinkInfo: Sendable, Equatable {
    public let ifindex: Int32
    /// Index of the bridge this link is enslaved to, 0 when none.
    public let master: Int32
    public let mtu: UInt32
    /// IFF_* flags.
    public let flags: UInt32
    public let carrier: Bool
    /// rtnetlink kind ("bridge", "tun", "veth"), empty for none.
    public let kind: String
    public var isUp: Bool { flags & 1 /* IFF_UP */ != 0 }
}

/// Bridge and link operations through libnl-route-3 (rtnetlink), never by
/// running `ip`: what Xen's vif-bridge does with `ip link`/`brctl`, for the
/// hotplug script's `xen-netlink` tool and for netback itself (MTU, up).
///
/// One NETLINK_ROUTE socket per instance, used under a lock.
public final class Netlink: @unchecked Sendable {
    // Sound: the libnl socket is only used while holding `lock`.
    private let sock: OpaquePointer
    private let lock = Mutex<Void>(())

    public init() throws(NetlinkError) {
        guard let s = cnet_nl_open() else {
            throw NetlinkError(operation: "open rtnetlink socket", code: -1, reason: String(cString: strerror(errno)))
        }
        sock = s
    }

    deinit { cnet_nl_close(sock) }

    private func run(_ what: @autoclosure () -> String, _ body: (OpaquePointer) -> Int32) throws(NetlinkError) {
        let rc = lock.withLock { _ in body(sock) }
        guard rc >= 0 else { throw NetlinkError(operation: what(), code: rc, reason: String(cString: cnet_nl_error(rc))) }
    }

    private static func checkName(_ name: String, _ what: String) throws(NetlinkError) {
        guard InterfaceName.isValid(name) else {
            throw NetlinkError(operation: what, code: -7, reason: "invalid interface name '\(name)'")
        }
    }

    /// Creates a Linux bridge (`ip link add NAME type bridge`).
    public func addBridge(_ name: String) throws(NetlinkError) {
        try Self.checkName(name, "bridge-add \(name)")
        try run("bridge-add \(name)") { cnet_nl_bridge_add($0, name) }
    }

    /// Deletes a link of any kind (`ip link del NAME`).
    public func deleteLink(_ name: String) throws(NetlinkError) {
        try Self.checkName(name, "delete \(name)")
        try run("delete \(name)") { cnet_nl_link_del($0, name) }
    }

    /// Deletes a bridge; refuses a link that is not a bridge.
    public func deleteBridge(_ name: String) throws(NetlinkError) {
        let info = try link(name)
        guard info.kind == "bridge" else {
            throw NetlinkError(operation: "bridge-del \(name)", code: -10, reason: "\(name) is not a bridge")
        }
        try run("bridge-del \(name)") { cnet_nl_link_del($0, name) }
    }

    /// Enslaves `device` to `bridge` (`ip link set DEV master BRIDGE`).
    public func enslave(_ device: String, to bridge: String) throws(NetlinkError) {
        try Self.checkName(device, "enslave \(device)")
        try Self.checkName(bridge, "enslave \(device) to \(bridge)")
        try run("enslave \(device) to \(bridge)") { cnet_nl_enslave($0, device, bridge) }
    }

    /// Releases `device` from its bridge (`ip link set DEV nomaster`).
    public func release(_ device: String) throws(NetlinkError) {
        try Self.checkName(device, "release \(device)")
        try run("release \(device)") { cnet_nl_release($0, device) }
    }

    public func setMTU(_ device: String, _ mtu: UInt32) throws(NetlinkError) {
        try Self.checkName(device, "set-mtu \(device)")
        try run("set-mtu \(device) \(mtu)") { cnet_nl_set_mtu($0, device, mtu) }
    }

    public func setUp(_ device: String, _ up: Bool = true) throws(NetlinkError) {
        try Self.checkName(device, "\(up ? "up" : "down") \(device)")
        try run("\(up ? "up" : "down") \(device)") { cnet_nl_set_up($0, device, up ? 1 : 0) }
    }

    public func setAddress(_ device: String, _ mac: MACAddress) throws(NetlinkError) {
        try Self.checkName(device, "set-address \(device)")
        try run("set-address \(device) \(mac)") { s in
            withUnsafeBytes(of: mac.bytes) { cnet_nl_set_address(s, device, $0.bindMemory(to: UInt8.self).baseAddress) }
        }
    }

    /// Creates a veth pair (tests and benchmarks).
    public func addVeth(_ name: String, peer: String) throws(NetlinkError) {
        try Self.checkName(name, "veth-add \(name)")
        try Self.checkName(peer, "veth-add \(name) peer \(peer)")
        try run("veth-add \(name) peer \(peer)") { cnet_nl_veth_add($0, name, peer) }
    }

    /// The link's index, master, MTU, flags, carrier and kind.
    public func link(_ name: String) throws(NetlinkError) -> LinkInfo {
        try Self.checkName(name, "show \(name)")
        var idx: Int32 = 0, master: Int32 = 0, mtu: UInt32 = 0, flags: UInt32 = 0, carrier: UInt8 = 0
        var kind = [CChar](repeating: 0, count: 32)
        try run("show \(name)") { cnet_nl_link_info($0, name, &idx, &master, &mtu, &flags, &carrier, &kind, 32) }
        return LinkInfo(ifindex: idx, master: master, mtu: mtu, flags: flags, carrier: carrier != 0,
                        kind: cString(kind))
    }

    /// Whether a link of that name exists.
    public func exists(_ name: String) -> Bool { cnet_ifindex(name) != 0 }
}
