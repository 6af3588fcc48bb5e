import CXen
import Foundation
import Glibc
import NetBack
import NetFrontKit
import Synchronization
import Testing
import XenHV
import XenTestKit

extension Hostile {
    /// XSA-332 on netback: a vif whose frontend kicks its tx and rx event
    /// channels in a tight loop with no work. Needs root (taps).
    @Suite struct NetEventStormTests {
        @Test func aVifKickStormCostsNetbackLittleAndTheOtherVifKeepsItsThroughput() throws {
            let d = try HostileDom0()
            let dom0 = try d.s.dom0Hypervisor()
            let h = try d.guest("netstormer", pages: 1024), g = try d.guest("bystander", pages: 1024)
            let (gv, gf) = try directVif(dom0, g, "sb")
            defer { gv.close() }
            let worker = NetWorker(gf.queues[0])
            // The storming vif's queue thread is the one its connect starts.
            let before = Set(threadCPUTicks().keys)
            let (hv, hf) = try directVif(dom0, h, "ss", split: true)
            defer { hv.close() }
            let vifThreads = Set(threadCPUTicks().keys).subtracting(before)
            #expect(!vifThreads.isEmpty)

            // As for blkback: the stormer's vCPU spins without kicking in the baseline
            // windows and kicks both channels in the storm windows, alternating.
            let phase = Atomic<Int>(0)  // 0 spin, 1 kick, 2 quit
            let kicks = Atomic<Int>(0)
            let tx = hf.queues[0].txChannel, rx = try #require(hf.queues[0].rxChannel)
            let stormer = TestThread {
                var n = 0, spins = 0
                while true {
                    let p = phase.load(ordering: .relaxed)
                    if p == 2 { break }
                    for _ in 0..<64 {
                        if p == 1 { try? tx.notify(); try? rx.notify(); n += 2 } else { spins &+= 1 }
                    }
                }
                kicks.store(n, ordering: .releasing)
                _ = spins
            }
            var base = 0.0, storm = 0.0, failures: [String] = []
            var stormSeconds = 0.0, vifTicks = 0
            let window = 0.2
            for _ in 0..<Int(EventStormTests.stormSeconds / window) {
                phase.store(0, ordering: .relaxed)
                let b = worker.throughput(seconds: window)
                phase.store(1, ordering: .relaxed)
                let t0 = Date(), c0 = threadCPUTicks()
                let s = worker.throughput(seconds: window)
                let c1 = threadCPUTicks()
                stormSeconds += Date().timeIntervalSince(t0)
                vifTicks += vifThreads.reduce(0) { $0 + (c1[$1] ?? 0) - (c0[$1] ?? 0) }
                base += b.perSecond
                storm += s.perSecond
                failures += b.failures + s.failures
            }
            phase.store(2, ordering: .relaxed)
            stormer.join()
            let backoffs = hv.stats.eventStormBackoffs.load(ordering: .relaxed)
            // The stormer's vif still serves, and was never disabled for kicking.
            #expect(!hv.isDisabled, "\(hv.disabledReason ?? "")")
            #expect(try vifCarriesFrames(hf.queues[0], tap: hv.name))
            let vifCore = Double(vifTicks) / clockTicksPerSecond / stormSeconds
            let ratio = storm / base
            print(String(format: "vif kick storm: %d kicks in %.2f s; storming vif's netback thread %.1f%% of a core; muted %d times; bystander vif %.0f frames/s vs baseline %.0f/s (%.2f)",
                         kicks.load(ordering: .acquiring), stormSeconds, vifCore * 100, backoffs,
                         storm * window / stormSeconds, base * window / stormSeconds, ratio))
            #expect(kicks.load(ordering: .acquiring) > 10_000)
            #expect(vifCore <= EventStormTests.maxBackendCore, "netback's storming vif thread used \(vifCore) of a core")
            #expect(backoffs > 0)
            #expect(failures.isEmpty, "\(failures)")
            #expect(ratio >= EventStormTests.minBystanderRatio, "bystander vif at \(ratio) of its baseline")
            #expect(try vifCarriesFrames(gf.queues[0], tap: gv.name))
        }
    }
}
