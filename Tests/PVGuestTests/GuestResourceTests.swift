import Testing
import XenHV
import XenTestKit
@testable import PVGuest

/// The guest's allocators: what a frontend gives back must never be handed
/// out twice, even when a frontend bug gives it back twice.
@Suite struct GuestResourceTests {
    @Test func aGrantRefReleasedTwiceIsHandedOutOnce() throws {
        let dom0 = try Dom0Harness(buildDirectory: Dom0Harness.buildDirectory(packageRoot: DiskPathTests.root))
        let guest = try dom0.createGuest(name: "refs")
        defer { guest.xenstore.close() }
        let refs = try GrantRefs(hypervisor: guest.hypervisor)
        let a = try refs.allocate(), b = try refs.allocate()
        #expect(a >= 8 && a != b)  // 0-7 are reserved, as on Linux
        refs.release(a)
        refs.release(a)  // a double free
        #expect(refs.refusedReleases == 1)
        let c = try refs.allocate(), d = try refs.allocate()
        #expect(c == a && d != a && d != b, "\(a) \(b) -> \(c) \(d)")
        refs.release(12_345)  // never handed out
        #expect(refs.refusedReleases == 2)
    }
}
