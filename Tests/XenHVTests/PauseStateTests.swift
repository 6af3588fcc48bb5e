import CXen
import Glibc
import Testing
import XenHV

/// Pausing and unpausing leave a shut-down or crashed domain shut down, as
/// Xen keeps is_shut_down (XEN_DOMINF_shutdown) across pause and unpause:
/// the toolstack still sees it and still applies its on_* action.
@Suite struct PauseStateTests {
    @Test func pauseAndUnpauseKeepAShutdown() throws {
        let f = try HypervisorFixture()
        let (d, g) = try f.guest()
        #expect(g.send("shutdown \(SHUTDOWN_poweroff)") == "ok")
        func info() throws -> Hypervisor.DomainInfo? { try f.dom0.listDomains().first { $0.domid == d.domid } }
        #expect(try info()?.stateLetters == "---s--")
        try f.dom0.unpauseDomain(d.domid)
        #expect(try info()?.stateLetters == "---s--" && info()?.isShutdown == true)
        try f.dom0.pauseDomain(d.domid)
        #expect(try info()?.stateLetters == "---s--" && info()?.shutdownReason == .poweroff)
        try f.dom0.unpauseDomain(d.domid)
        #expect(try info()?.stateLetters == "---s--")
    }

    @Test func pauseAndUnpauseKeepACrash() throws {
        let f = try HypervisorFixture()
        let d = try f.dom0.createDomain(pages: 16, name: "crashed")
        close(d.guestDescriptor)  // its connection is gone: a crash
        func info() throws -> Hypervisor.DomainInfo? { try f.dom0.listDomains().first { $0.domid == d.domid } }
        #expect(try info()?.stateLetters == "---sc-")
        try f.dom0.unpauseDomain(d.domid)
        #expect(try info()?.stateLetters == "---sc-" && info()?.shutdownReason == .crash)
        try f.dom0.pauseDomain(d.domid)
        #expect(try info()?.stateLetters == "---sc-")
    }

    // A running domain still pauses and unpauses: EventChannelTests.pauseAndUnpause.
}
