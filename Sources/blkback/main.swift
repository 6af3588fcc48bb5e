import ArgumentParser
import BlkBack
import Foundation
import Logging

/// `blkback`: the block backend daemon. Devices are created and connected by
/// the XenBus handshake (not wired yet: until then it serves no devices) or,
/// for a quick check, `--probe IMAGE` opens an image as a VBD would and prints
/// what the backend would advertise.
struct BlkBackCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "blkback",
        abstract: "Block backend: blkif rings served from raw images and block devices with libaio.")

    @Option(help: "Open this image or block device as a VBD would, print its features, and exit.")
    var probe: String?

    @Flag(help: "With --probe: open read-only (mode=r).")
    var readOnly = false

    @Option(help: "Log level (trace, debug, info, notice, warning, error, critical).")
    var logLevel: Logger.Level = .info

    func run() throws {
        var logger = Logger(label: "blkback")
        logger.logLevel = logLevel
        guard let path = probe else {
            print("blkback: the XenBus handshake is not wired yet; use --probe IMAGE to check an image")
            return
        }
        let dev = try VirtualBlockDevice(name: "probe", backing: BackingOptions(path: path, readOnly: readOnly), logger: logger)
        defer { dev.close() }
        let f = dev.features
        print("sectors \(f.sectors) sector-size \(f.sectorSize) info \(f.info) direct-io \(dev.usesDirectIO)")
        print("feature-flush-cache \(f.flushCache ? 1 : 0) feature-barrier \(f.barrier ? 1 : 0) feature-persistent 1")
        print("feature-discard \(f.discard ? 1 : 0) discard-granularity \(f.discardGranularity) discard-secure \(f.discardSecure ? 1 : 0)")
        print("feature-max-indirect-segments \(f.maxIndirectSegments) max-ring-page-order \(f.maxRingPageOrder) multi-queue-max-queues \(f.maxQueues)")
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}

BlkBackCommand.main()
