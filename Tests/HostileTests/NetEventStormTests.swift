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
            // The storming vif's queue thread is one its connect starts.
            let before = Set(threadCPUTimes().keys)
            let (hv, hf) = try directVif(dom0, h, "ss", split: true)
            defer { hv.close() }
            let appeared = Set(threadCPUTimes().keys).subtracting(before)

            // As for blkback: both channels kicked in the storm windows.
            let tx = hf.queues[0].txChannel, rx = try #require(hf.queues[0].rxChannel)
            let run = KickStorm.run(kicking: [tx, rx], seconds: EventStormTests.stormSeconds) { worker.throughput(seconds: $0) }
            let backoffs = hv.stats.eventStormBackoffs.load(ordering: .relaxed)
            // The stormer's vif still serves, and was never disabled for kicking.
            #expect(!hv.isDisabled, "\(hv.disabledReason ?? "")")
            #expect(try vifCarriesFrames(hf.queues[0], tap: hv.name))
            // It has named itself by now (it carried frames): "<tap>q0", 15 bytes kept.
            let queueName = String("\(hv.name)q0".utf8.prefix(15))!
            let vifThreads = Set(threadCPUTimes().filter { appeared.contains($0.key) && $0.value.name == queueName }.keys)
            #expect(vifThreads.count == 1)
            let vifCore = run.core(of: vifThreads)
            print(String(format: "vif kick storm: %d kicks in %.2f s; storming vif's netback thread %.1f%% of a core; muted %d times; bystander vif %.2f of its baseline",
                         run.kicks, run.stormSeconds, vifCore * 100, backoffs, run.ratio))
            #expect(run.kicks > 10_000)
            #expect(vifCore <= EventStormTests.maxBackendCore, "netback's storming vif thread used \(vifCore) of a core")
            #expect(backoffs > 0)
            #expect(run.failures.isEmpty, "\(run.failures)")
            #expect(run.ratio >= EventStormTests.minBystanderRatio, "bystander vif at \(run.ratio) of its baseline")
            #expect(try vifCarriesFrames(gf.queues[0], tap: gv.name))
        }
    }
}
