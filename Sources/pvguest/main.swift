// pvguest: a PV guest process. Its "kernel" connects to xenstore over its ring,
// brings up a blkfront for each vbd the toolstack gives it, at boot or hotplugged
// later, and exports every disk over NBD so real tools drive it; each vif becomes
// a netfront whose NIC is a tap in the guest's network namespace. Argument
// parsing only; see PVGuest (GuestDevices).
import ArgumentParser
import Foundation
import Glibc
import Logging
import NBD
import PVGuest
import XenBus
import XenHV

@main
struct PVGuestCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pvguest",
        abstract: "A PV guest: blkfront disks exported over NBD, netfront NICs as taps in a network namespace (run by the toolstack with XENHV_GUEST_FD).")

    @Option(help: "Directory for the NBD sockets and the `devices` list of what runs (default: $XEN_RUN_DIR/guests/<domid>).")
    var nbdDir: String?

    @Option(help: "Descriptor to write the disk lines and the ready line to, then close (the toolstack's pipe).")
    var readyFD: Int32?

    @Option(help: "Ring page order to ask the backends for (0-4).")
    var ringPageOrder = 1

    @Option(help: "Segments per disk request with indirect descriptors (Linux's xen_blkif_max_segments, 11-512); the backend's feature-max-indirect-segments caps it.")
    var blkIndirectSegments = BlkFrontDevice.defaultIndirectSegments

    @Option(help: "Network namespace for the NICs (taps eth<devid>), created when missing (default: xen-<domid>).")
    var netns: String?

    @Option(help: "Queues each NIC may use at most (Linux's xen_netfront.max_queues; default: the online CPUs); the backend's multi-queue-max-queues caps it.")
    var netQueues = HVLimits.onlineCPUs

    @Flag(help: "One event channel per NIC queue even when the backend offers feature-split-event-channels.")
    var noSplitEventChannels = false

    @Option(help: .hidden)
    var reapNetns: String?

    func validate() throws {
        guard (0...4).contains(ringPageOrder) else { throw ValidationError("--ring-page-order must be 0..4") }
        if let netns, !NetNamespace.isValidName(netns) { throw ValidationError("bad --netns name '\(netns)'") }
        guard (1...64).contains(netQueues) else { throw ValidationError("--net-queues must be 1..64") }
        let segments = BlkFrontDevice.indirectSegmentsRange
        guard segments.contains(blkIndirectSegments) else {
            throw ValidationError("--blk-indirect-segments must be \(segments.lowerBound)..\(segments.upperBound)")
        }
    }

    func run() throws {
        if let reapNetns {
            Self.reap(reapNetns)
            return
        }
        var logger = Logger(label: "pvguest")
        logger.logLevel = .info
        // SIGUSR1: the toolstack asked for a shutdown through control/shutdown.
        // SIGUSR2: a device directory changed (hotplug).
        let term: [CInt] = [SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2]
        var set = sigset_t()
        sigemptyset(&set)
        for s in term { sigaddset(&set, s) }
        pthread_sigmask(SIG_BLOCK, &set, nil)

        let hv = try Hypervisor.guestFromEnvironment()
        HypervisorWatch.exitWhenGone(hv, logger: logger)
        let xs = try XenBusClient.guest(hypervisor: hv)
        let home = try xs.getDomainPath(UInt32(hv.domid))
        let runDir = ProcessInfo.processInfo.environment["XEN_RUN_DIR"] ?? "/run/swiftxen"
        let dir = nbdDir ?? "\(runDir)/guests/\(hv.domid)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let pages = try GuestPages(hypervisor: hv)
        let grants = try GrantRefs(hypervisor: hv)

        // The frontend bus: every device now and any the toolstack adds later
        // (hotplug). Its watch callbacks only raise SIGUSR2; this thread rescans.
        let log = logger
        var options = GuestDevices.Options(
            nbdDir: dir, ringPageOrder: ringPageOrder, namespace: netns ?? "xen-\(hv.domid)",
            netfront: .init(maxQueues: netQueues, splitEventChannels: !noSplitEventChannels)) { namespace in
            do { try Self.startReaper(for: namespace) } catch {
                log.warning("netns \(namespace): no reaper (\(error)); it outlives a killed guest")
            }
        }
        options.indirectSegments = blkIndirectSegments
        let devices = GuestDevices(
            hypervisor: hv, xenstore: xs, home: home, pages: pages, grants: grants, options: options,
            logger: logger, wake: { kill(getpid(), SIGUSR2) })
        try devices.start()
        // Boot waits for the devices present now (each bounded by its own timeouts).
        if !devices.settle(seconds: 120) { logger.warning("some devices are still connecting; they come up later") }
        var lines = devices.lines
        lines.append("pvguest ready domain \(hv.domid)")
        for l in lines { print(l) }
        fflush(nil)
        if let fd = readyFD {
            for l in lines { ProcessLauncher.writeLine(fd, l) }
            close(fd)
        }
        _ = term.count
        // control/shutdown (Linux's xenbus shutdown handler): poweroff, halt or
        // reboot ends the guest cleanly; the node is cleared to acknowledge.
        // The watch callback runs on the client's reader thread, which must not
        // wait for a reply itself: it only wakes the main thread.
        let shutdownWatch = try xs.watch(home + "/control/shutdown") { _ in kill(getpid(), SIGUSR1) }
        var sig: Int32 = 0
        var reason = ShutdownReason.poweroff
        while true {
            sigwait(&set, &sig)
            if sig == SIGUSR2 {
                devices.rescan()
                continue
            }
            guard sig == SIGUSR1 else { break }
            if let v = (try? xs.readIfExists(home + "/control/shutdown")) ?? nil, ["poweroff", "halt", "reboot"].contains(v) {
                // Linux's orderly_poweroff / ctrl_alt_del: SHUTDOWN_reboot for reboot, else poweroff.
                reason = v == "reboot" ? .reboot : .poweroff
                try? xs.write(home + "/control/shutdown", "")
                break
            }
        }
        try? xs.unwatch(shutdownWatch)
        devices.stopAll()
        if sig == SIGUSR1 {
            // Frontends close (the backends release their rings), then SCHEDOP_shutdown.
            for fe in ((try? xs.directory(home + "/device/vbd")) ?? []).map({ home + "/device/vbd/" + $0 })
                + ((try? xs.directory(home + "/device/vif")) ?? []).map({ home + "/device/vif/" + $0 }) {
                try? xs.switchState(at: fe, to: .closed)
            }
            // Logged first: once SCHEDOP_shutdown is in, the toolstack may destroy us at any moment.
            logger.info("shut down at the toolstack's request", metadata: ["reason": "\(reason)"])
            try? hv.shutdownSelf(reason: reason)
        }
        xs.close()
    }

    /// A namespace this guest created must not outlive it, even after SIGKILL
    /// (the toolstack's destroy): a child in its own session holds the read
    /// end of a pipe only we can write, and removes the namespace at EOF.
    static func startReaper(for namespace: String) throws {
        var p: [CInt] = [-1, -1]
        guard pipe(&p) == 0 else { throw HypervisorError.system(call: "pipe", errno: errno) }
        for fd in p { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        defer { close(null); close(p[0]) }
        _ = try ProcessLauncher.spawn(ProcessLauncher.executableDirectory + "/pvguest", arguments: ["--reap-netns", namespace],
                                      descriptors: [(p[0], 0), (null, 1), (2, 2)], newSession: true)
        // p[1] stays open (close-on-exec) for the rest of our life.
    }

    /// The reaper: waits for EOF on stdin (the guest is gone), then removes the namespace.
    static func reap(_ namespace: String) {
        var b: UInt8 = 0
        while true {
            let n = read(0, &b, 1)
            if n == 0 || (n < 0 && errno != EINTR) { break }
        }
        NetNamespace.remove(namespace)
    }
}
