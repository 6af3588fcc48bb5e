import ArgumentParser
import Glibc
import NetBack

/// Link and bridge operations for the vif-bridge hotplug script, through
/// libnl-route-3. Each failure prints one line naming the operation and why.
struct XenNetlink: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "xen-netlink",
        abstract: "Bridge and link operations for Xen vif hotplug scripts (rtnetlink, no `ip`).",
        subcommands: [BridgeAdd.self, BridgeDel.self, Enslave.self, Release.self, SetMTU.self, Up.self, Down.self, Show.self])
}

/// Runs one operation; a failure is one line on stderr and exit status 1.
func perform(_ body: (Netlink) throws(NetlinkError) -> Void) throws {
    do throws(NetlinkError) {
        try body(try Netlink())
    } catch {
        var err = StandardError()
        print("xen-netlink: \(error)", to: &err)
        throw ExitCode.failure
    }
}

struct StandardError: TextOutputStream {
    mutating func write(_ s: String) { _ = s.withCString { Glibc.write(2, $0, strlen($0)) } }
}

struct BridgeAdd: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "bridge-add", abstract: "Create a bridge.")
    @Argument var name: String
    @Flag(help: "Succeed if the bridge already exists.") var existOk = false
    func run() throws {
        try perform { nl throws(NetlinkError) in
            if existOk, let l = try? nl.link(name), l.kind == "bridge" { return }
            do throws(NetlinkError) { try nl.addBridge(name) } catch {
                // Made meanwhile by someone else (another vif's script): fine
                // if it is a bridge.
                guard existOk, let l = try? nl.link(name), l.kind == "bridge" else { throw error }
            }
        }
    }
}

struct BridgeDel: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "bridge-del", abstract: "Delete a bridge.")
    @Argument var name: String
    func run() throws { try perform { nl throws(NetlinkError) in try nl.deleteBridge(name) } }
}

struct Enslave: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Add DEV to BRIDGE.")
    @Argument var device: String
    @Argument var bridge: String
    func run() throws { try perform { nl throws(NetlinkError) in try nl.enslave(device, to: bridge) } }
}

struct Release: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Remove DEV from its bridge.")
    @Argument var device: String
    func run() throws { try perform { nl throws(NetlinkError) in try nl.release(device) } }
}

struct SetMTU: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "set-mtu", abstract: "Set DEV's MTU.")
    @Argument var device: String
    @Argument var mtu: UInt32
    func validate() throws {
        guard (68...65535).contains(mtu) else { throw ValidationError("MTU \(mtu) is outside 68...65535") }
    }
    func run() throws { try perform { nl throws(NetlinkError) in try nl.setMTU(device, mtu) } }
}

struct Up: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Bring DEV up.")
    @Argument var device: String
    func run() throws { try perform { nl throws(NetlinkError) in try nl.setUp(device, true) } }
}

struct Down: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Bring DEV down.")
    @Argument var device: String
    func run() throws { try perform { nl throws(NetlinkError) in try nl.setUp(device, false) } }
}

struct Show: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print DEV's kind, MTU, state and master.")
    @Argument var device: String
    func run() throws {
        try perform { nl throws(NetlinkError) in
            let l = try nl.link(device)
            print("\(device) kind=\(l.kind.isEmpty ? "-" : l.kind) mtu=\(l.mtu) \(l.isUp ? "up" : "down") master=\(l.master)")
        }
    }
}

XenNetlink.main()
