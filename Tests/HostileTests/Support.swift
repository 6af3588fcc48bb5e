import BlkBack
import BlkFrontKit
import Foundation
import Glibc
import Logging
import Testing
import XenBus
import XenHV
import XenRing
import XenStore
import XenTestKit

/// Every hostile case starts its own dom0 (xenhv, xenstored) and shares two
/// cores with its backends' threads and its racing frontends: one at a time.
@Suite(.serialized) enum Hostile {}

/// A private dom0 with blkback serving it in-process. The service stops
/// before the harness goes (the harness's xenstored and xenhv outlive it).
final class HostileDom0: @unchecked Sendable {
    // Sound: the harness and the service are thread-safe; `guests` is only
    // appended from the test's own thread, before it starts any other.
    let s: Dom0Harness
    let blkback: BlkbackService
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path

    init() throws {
        s = try Dom0Harness(buildDirectory: Dom0Harness.buildDirectory(packageRoot: Self.root))
        var log = Logger(label: "blkback")
        log.logLevel = .critical  // hostile cases make the backend complain on purpose
        blkback = BlkbackService(hypervisor: try s.dom0Hypervisor(), xenbus: try s.dom0XenStore(), logger: log)
        try blkback.start()
    }

    func guest(_ name: String, pages: UInt32 = 1024) throws -> Dom0Harness.Guest {
        let g = try s.createGuest(name: name, pages: pages)
        guests.append(g)
        return g
    }
    private var guests: [Dom0Harness.Guest] = []

    /// The device blkback holds for `dev`, if open.
    func device(_ dev: XenBusDevice) -> VirtualBlockDevice? {
        blkback.withDevices { $0[dev.backendPath] }
    }

    deinit {
        blkback.stop()
        for g in guests { g.xenstore.close() }
    }
}

/// 4 KiB that tell request `i` apart from every other.
func blockPattern(_ i: Int) -> [UInt8] {
    (0..<4096).map { UInt8(truncatingIfNeeded: ($0 &* 31) ^ (i &* 151) &+ ($0 >> 7) &+ 1) }
}
