import ArgumentParser
import Foundation
import Logging
import XenHV
import XenHVDaemon

/// `xenhv`: the hypervisor core's daemon (domain lifecycle, descriptors, clean-up).
struct XenHV: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "xenhv",
        abstract: "The hypervisor core daemon: domains, grant tables and event channels over shared memory.")

    @Option(help: "Unix socket to listen on (default: $XEN_RUN_DIR/xenhv.sock, XEN_RUN_DIR defaults to /run/swiftxen).")
    var socket: String?

    @Option(help: "Grant handles each dom0 mapper may hold, in frames of 256 (Xen's gnttab_max_maptrack_frames).")
    var maxMaptrackFrames: UInt32 = 1024

    @Option(help: "First domid to hand out (default: $XENHV_FIRST_DOMID, else 1, as Xen). Lets several dom0s share a host without tap-name clashes.")
    var firstDomid: UInt16?

    func validate() throws {
        guard (1...4096).contains(maxMaptrackFrames) else { throw ValidationError("--max-maptrack-frames must be 1..4096") }
        if let d = firstDomid, !(1..<HVLimits.firstReservedDomID).contains(d) {
            throw ValidationError("--first-domid must be 1..\(HVLimits.firstReservedDomID - 1)")
        }
    }

    @Option(help: "Log level (trace, debug, info, notice, warning, error, critical).")
    var logLevel: Logger.Level = .info

    func run() throws {
        let runDir = ProcessInfo.processInfo.environment["XEN_RUN_DIR"] ?? "/run/swiftxen"
        let path = socket ?? runDir + "/xenhv.sock"
        try FileManager.default.createDirectory(
            atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        var logger = Logger(label: "xenhv")
        logger.logLevel = logLevel
        var first: UInt16 = 1
        if let d = firstDomid {
            first = d
        } else if let e = ProcessInfo.processInfo.environment["XENHV_FIRST_DOMID"] {
            guard let d = UInt16(e), (1..<HVLimits.firstReservedDomID).contains(d) else {
                throw ValidationError("XENHV_FIRST_DOMID='\(e)' must be 1..\(HVLimits.firstReservedDomID - 1)")
            }
            first = d
        }
        let daemon = try HypervisorDaemon(
            configuration: .init(socketPath: path, maptrackFrames: maxMaptrackFrames, firstDomID: first), logger: logger)
        daemon.run()
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}

XenHV.main()
