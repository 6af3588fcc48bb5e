import ArgumentParser
import Foundation
import Logging
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

    func validate() throws {
        guard (1...4096).contains(maxMaptrackFrames) else { throw ValidationError("--max-maptrack-frames must be 1..4096") }
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
        let daemon = try HypervisorDaemon(configuration: .init(socketPath: path, maptrackFrames: maxMaptrackFrames), logger: logger)
        daemon.run()
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}

XenHV.main()
