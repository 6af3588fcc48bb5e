import ArgumentParser
import BlkBack
import CXen
import Foundation
import Glibc
import Logging
import XenBus
import XenHV

/// `blkback`: the block backend daemon. With --hypervisor and --xenstore it
/// serves every vbd the toolstack writes under /local/domain/0/backend/vbd
/// (the XenBus handshake of blkif.h) until SIGTERM; `--probe IMAGE` opens an
/// image as a VBD would and prints what the backend would advertise.
struct BlkBackCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "blkback",
        abstract: "Block backend: blkif rings served from raw images and block devices with libaio.")

    @Option(help: "xenhv's socket (default: $XEN_RUN_DIR/xenhv.sock).")
    var hypervisor: String?

    @Option(help: "xenstored's socket (default: $XEN_RUN_DIR/xenstored/socket).")
    var xenstore: String?

    @Option(help: "Open this image or block device as a VBD would, print its features, and exit.")
    var probe: String?

    @Flag(help: "With --probe: open read-only (mode=r).")
    var readOnly = false

    @Option(help: "Log level (trace, debug, info, notice, warning, error, critical).")
    var logLevel: Logger.Level = .info

    func run() throws {
        var logger = Logger(label: "blkback")
        logger.logLevel = logLevel
        if let path = probe {
            let dev = try VirtualBlockDevice(name: "probe", backing: BackingOptions(path: path, readOnly: readOnly), logger: logger)
            defer { dev.close() }
            let f = dev.features
            print("sectors \(f.sectors) sector-size \(f.sectorSize) info \(f.info) direct-io \(dev.usesDirectIO)")
            print("feature-flush-cache \(f.flushCache ? 1 : 0) feature-barrier \(f.barrier ? 1 : 0) feature-persistent 1")
            print("feature-discard \(f.discard ? 1 : 0) discard-granularity \(f.discardGranularity) discard-secure \(f.discardSecure ? 1 : 0)")
            print("feature-max-indirect-segments \(f.maxIndirectSegments) max-ring-page-order \(f.maxRingPageOrder) multi-queue-max-queues \(f.maxQueues)")
            return
        }
        let runDir = ProcessInfo.processInfo.environment["XEN_RUN_DIR"] ?? "/run/swiftxen"
        // Termination signals are blocked before any thread starts, so all inherit the mask.
        let sfd = cxen_termination_signalfd()
        let hv = try Hypervisor.connect(socketPath: hypervisor ?? runDir + "/xenhv.sock")
        let xs = try XenBusClient.connect(socketPath: xenstore ?? runDir + "/xenstored/socket")
        try BlkbackService(hypervisor: hv, xenbus: xs, logger: logger)
            .serve(statisticsPath: runDir + "/stats/blkback.stats", readyLine: "blkback ready", untilReadable: sfd)
        xs.close()
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}

BlkBackCommand.main()
