// pvguest-load: a PV guest process (run by a toolstack with XENHV_GUEST_FD,
// like pvguest) whose only job is a benchmark: it brings up pvguest's blkfront
// on its first (or named) vbd with one queue and runs each --load straight
// onto the ring, printing one result line per load (BlkLoadResult.line).
// scripts/bench-blkback sets it against fio on the same image. Argument
// parsing only; the load generator is PVGuest's BlkLoad.swift.
import ArgumentParser
import Foundation
import Glibc
import Logging
import PVGuest
import XenBus
import XenHV

@main
struct PVGuestLoadCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pvguest-load",
        abstract: "A PV guest that runs closed-loop loads on its blkfront's ring (run with XENHV_GUEST_FD).")

    @Option(help: "A load OP:BS:seq|rand:DEPTH:SECONDS, e.g. read:4k:rand:32:5 (repeatable; run in order).")
    var load: [String] = []

    @Option(help: "The vbd's device id (default: the first one).")
    var devid: String?

    @Option(help: "Ring page order to ask the backend for (0-4).")
    var ringPageOrder = 1

    @Option(help: "Segments per ring request with indirect descriptors (Linux's xen_blkif_max_segments); the backend's offer caps it.")
    var indirectSegments = BlkFrontDevice.defaultIndirectSegments

    @Flag(help: "After the loads, stay connected until the domain is destroyed (so the backend's counters can be read).")
    var stay = false

    func validate() throws {
        guard (0...4).contains(ringPageOrder) else { throw ValidationError("--ring-page-order must be 0..4") }
        let segments = BlkFrontDevice.indirectSegmentsRange
        guard segments.contains(indirectSegments) else {
            throw ValidationError("--indirect-segments must be \(segments.lowerBound)..\(segments.upperBound)")
        }
        guard !load.isEmpty else { throw ValidationError("give at least one --load") }
        for l in load {
            do { _ = try BlkLoad(parsing: l) } catch { throw ValidationError("\(error)") }
        }
    }

    func run() throws {
        var logger = Logger(label: "pvguest-load")
        logger.logLevel = .warning
        let loads = try load.map { try BlkLoad(parsing: $0) }
        let hv = try Hypervisor.guestFromEnvironment()
        let xs = try XenBusClient.guest(hypervisor: hv)
        let home = try xs.getDomainPath(UInt32(hv.domid))
        guard let id = devid ?? ((try? xs.directory(home + "/device/vbd")) ?? []).sorted().first else {
            throw ValidationError("the guest has no vbd")
        }
        let fe = home + "/device/vbd/" + id
        let device = try BlkFrontDevice(hypervisor: hv, xenstore: xs, frontendPath: fe, pages: try GuestPages(hypervisor: hv),
                                        grants: try GrantRefs(hypervisor: hv), ringPageOrder: ringPageOrder, queues: 1,
                                        indirectSegments: indirectSegments,
                                        completionThread: false, logger: logger)
        print("pvguest-load ready domain \(hv.domid) vbd \(id) \(device.size / 512) sectors ring-order \(device.ringOrder) segments \(device.segmentsPerSlot)")
        fflush(nil)
        for l in loads {
            print(try device.runLoad(l).line)
            fflush(nil)
        }
        if stay {
            while true { pause() }
        }
        device.close()
        xs.close()
    }
}
