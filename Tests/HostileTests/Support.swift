import BlkBack
import BlkFrontKit
import Foundation
import Glibc
import Logging
import Synchronization
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

    /// A guest with no xenstore client of its own: its domain, its
    /// hypervisor connection and its xenstore ring, driven raw by the test.
    struct RawGuest {
        let domain: Hypervisor.CreatedDomain
        let hypervisor: Hypervisor
        let ring: RawXenStoreRing
        var home: String { "/local/domain/\(domain.domid)" }
    }
    func rawGuest(_ name: String) throws -> RawGuest {
        let d = try s.prepareGuest(name: name)
        let hv = try Hypervisor.guest(descriptor: d.guestDescriptor)
        return RawGuest(domain: d, hypervisor: hv,
                        ring: try RawXenStoreRing(hypervisor: hv, storeMFN: d.storeMFN, storePort: d.storePort))
    }

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

/// The storm cases' hostile vCPU (XSA-332): it runs throughout, spinning
/// without kicking in baseline windows and kicking `channels` in tight loops
/// in storm windows, which alternate, so the machine's other load weighs on
/// both alike. `measure` runs the well-behaved guest's workload for a window.
enum KickStorm {
    struct Result {
        var base = 0.0, storm = 0.0, failures: [String] = []
        var stormSeconds = 0.0
        var kicks = 0
        /// Per-thread CPU times around each storm window.
        var windows: [(before: [Int32: (name: String, seconds: Double)], after: [Int32: (name: String, seconds: Double)])] = []
        /// The bystander's storm throughput over its baseline.
        var ratio: Double { storm / base }

        /// The share of one core `threads` used while the storm lasted.
        func core(of threads: Set<Int32>) -> Double {
            windows.reduce(0) { $0 + cpuSeconds(of: threads, from: $1.before, to: $1.after) } / stormSeconds
        }
    }

    static func run(kicking channels: [EventChannel], seconds: Double, window: Double = 0.2,
                    measure: (Double) -> (perSecond: Double, failures: [String])) -> Result {
        let phase = Atomic<Int>(0)  // 0 spin, 1 kick, 2 quit
        let kicks = Atomic<Int>(0)
        let stormer = TestThread {
            var n = 0, spins = 0
            while true {
                let p = phase.load(ordering: .relaxed)
                if p == 2 { break }
                for _ in 0..<64 {
                    if p == 1 { for c in channels { try? c.notify() }; n += channels.count } else { spins &+= 1 }
                }
            }
            kicks.store(n, ordering: .releasing)
            _ = spins
        }
        var r = Result()
        for _ in 0..<Int(seconds / window) {
            phase.store(0, ordering: .relaxed)
            let b = measure(window)
            phase.store(1, ordering: .relaxed)
            let t0 = Date(), c0 = threadCPUTimes()
            let s = measure(window)
            let c1 = threadCPUTimes()
            r.stormSeconds += Date().timeIntervalSince(t0)
            r.windows.append((c0, c1))
            r.base += b.perSecond
            r.storm += s.perSecond
            r.failures += b.failures + s.failures
        }
        phase.store(2, ordering: .relaxed)
        stormer.join()
        r.kicks = kicks.load(ordering: .acquiring)
        return r
    }
}
