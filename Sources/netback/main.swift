// netback: serves one vif from the command line until SIGTERM/SIGINT. The
// XenBus handshake (backend/vif/<domid>/<devid>) will drive the same
// NetBack.Vif API once xenstored lands; this entry point takes the values the
// frontend would have written to xenstore.
import ArgumentParser
import CXen
import Glibc
import Logging
import NetBack
import Foundation
import XenBus
import XenHV

struct QueueSpec: ExpressibleByArgument {
    let rings: VifQueueRings
    /// "TX-REF,RX-REF,EVTCHN" or "TX-REF,RX-REF,EVTCHN-TX,EVTCHN-RX".
    init?(argument: String) {
        let v = argument.split(separator: ",").compactMap { UInt32($0) }
        guard v.count == 3 || v.count == 4, v.count == argument.split(separator: ",").count else { return nil }
        rings = VifQueueRings(txRingRef: v[0], rxRingRef: v[1],
                              events: v.count == 3 ? .shared(v[2]) : .split(tx: v[2], rx: v[3]))
    }
}

struct NetbackCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "netback", abstract: "Serve a vif's netif rings on a tap vif<domid>.<devid>.")

    @Option(name: [.customLong("hypervisor"), .customLong("xenhv-socket")],
            help: "xenhv's socket (default: $XEN_RUN_DIR/xenhv.sock; --xenhv-socket is the same option's old name).")
    var hypervisor: String?
    @Option(help: "xenstored's socket: serve every vif under /local/domain/0/backend/vif (the XenBus handshake).")
    var xenstore: String?
    @Option(help: "With --xenstore: the hotplug script run for a vif without a `script` key.")
    var hotplugScript: String?
    @Option(help: "With --xenstore: queues offered to each frontend (multi-queue-max-queues; Linux's xen_netback.max_queues, default the online CPUs).")
    var maxQueues = HVLimits.onlineCPUs
    @Option(help: "The frontend's domain id (single-vif mode).") var domid: UInt16?
    @Option(help: "Device id (the vif's handle).") var devid: UInt32 = 0
    @Option(name: .customLong("queue"), help: "TX-REF,RX-REF,EVTCHN[,EVTCHN-RX] per queue (repeat for multi-queue).")
    var queues: [QueueSpec] = []
    @Option(help: "The guest's MAC address.") var mac: String?
    @Option(help: "MTU of the vif.") var mtu: UInt32 = 1500
    @Option(help: "xenstore `rate` value: BYTES,USEC.") var rate: String?
    @Option(help: "Enslave the tap to this bridge and bring it up (else the hotplug script does).") var bridge: String?
    @Option(help: "Frontend features: comma list of sg,gso-tcpv4,gso-tcpv6,ipv6-csum-offload,no-csum-offload,no-rx-notify.")
    var features: String = "sg,gso-tcpv4,gso-tcpv6"
    @Option(help: "Log level.") var logLevel: Logger.Level = .info

    func validate() throws {
        if xenstore != nil { return }
        guard domid != nil else { throw ValidationError("--domid is needed without --xenstore") }
        guard !queues.isEmpty else { throw ValidationError("at least one --queue is needed") }
        if let mac, MACAddress(mac) == nil { throw ValidationError("bad MAC address '\(mac)'") }
        if let rate, RateLimit(xenstoreValue: rate) == nil { throw ValidationError("bad rate '\(rate)' (want BYTES,USEC)") }
        let known: Set<Substring> = ["sg", "gso-tcpv4", "gso-tcpv6", "ipv6-csum-offload", "no-csum-offload", "no-rx-notify", ""]
        for f in features.split(separator: ",") where !known.contains(f) { throw ValidationError("unknown feature '\(f)'") }
    }

    func run() throws {
        LoggingSystem.bootstrap { var h = StreamLogHandler.standardError(label: $0); h.logLevel = logLevel; return h }
        let log = Logger(label: "netback")
        // Block the termination signals before any worker thread exists, so they inherit the mask.
        let sfd = cxen_termination_signalfd()
        let runDir = ProcessInfo.processInfo.environment["XEN_RUN_DIR"] ?? "/run/swiftxen"
        let hv = try Hypervisor.connect(socketPath: hypervisor ?? runDir + "/xenhv.sock")
        if let xenstore {
            try serve(hv: hv, xenstorePath: xenstore, signals: sfd, log: log)
            return
        }
        let domid = self.domid!
        let f = Set(features.split(separator: ","))
        var cfg = VifConfig(frontendDomid: domid, devid: devid, mac: mac.flatMap { MACAddress($0) }, mtu: mtu,
                            rate: rate.flatMap { RateLimit(xenstoreValue: $0) }, maxQueues: queues.count)
        cfg.tapName = nil
        let vif = try Vif(hypervisor: hv, config: cfg, logger: log)
        if let bridge {
            let nl = try Netlink()
            try nl.enslave(vif.name, to: bridge)
            try nl.setUp(vif.name)
        }
        let features = FrontendFeatures(
            rxNotify: !f.contains("no-rx-notify"), sg: f.contains("sg"), gsoTCPv4: f.contains("gso-tcpv4"),
            gsoTCPv6: f.contains("gso-tcpv6"), noChecksumOffload: f.contains("no-csum-offload"),
            ipv6ChecksumOffload: f.contains("ipv6-csum-offload"))
        try vif.connect(VifConnection(queues: queues.map(\.rings), features: features))
        ServiceReadiness.announce("netback ready \(vif.name)")
        // The signalfd is non-blocking: wait for it to become readable.
        var pfd = pollfd(fd: sfd, events: Int16(POLLIN), revents: 0)
        while poll(&pfd, 1, -1) < 0 && errno == EINTR {}
        var buf = [UInt8](repeating: 0, count: 128)
        _ = read(sfd, &buf, buf.count)
        log.info("stopping: \(vif.stats.snapshot)")
        vif.close()
    }
}

extension NetbackCommand {
    /// Service mode: every vif the toolstack writes, through the XenBus handshake.
    func serve(hv: Hypervisor, xenstorePath: String, signals sfd: CInt, log: Logger) throws {
        let xs = try XenBusClient.connect(socketPath: xenstorePath)
        let dir = ProcessLauncher.executableDirectory
        // $XEN_SCRIPTS_DIR, installed next to us, or the source tree's scripts/
        // above a build directory (.build/<triple>/<config>/).
        let env = ProcessInfo.processInfo.environment
        var candidates = [env["XEN_SCRIPTS_DIR"].map { "\($0)/vif-bridge" }, "\(dir)/vif-bridge"].compactMap { $0 }
        var up = dir
        for _ in 0..<4 {
            up += "/.."
            candidates.append("\(up)/scripts/vif-bridge")
        }
        // Absolute: relative `script` keys are read against its directory.
        let given = hotplugScript.map { $0.hasPrefix("/") ? $0 : FileManager.default.currentDirectoryPath + "/" + $0 }
        let script: String = given ?? candidates.first(where: { access($0, X_OK) == 0 }) ?? "\(dir)/vif-bridge"
        let driver = NetbackDriver(hypervisor: hv, logger: log, maxQueues: max(1, maxQueues), defaultScript: script,
                                   scriptEnvironment: ["XENSTORED_PATH": xenstorePath, "XEN_NETLINK": "\(dir)/xen-netlink"])
        let runDir = env["XEN_RUN_DIR"] ?? "/run/swiftxen"
        try NetbackService(xenbus: xs, driver: driver, logger: log)
            .serve(statisticsPath: runDir + "/stats/netback.stats", readyLine: "netback ready", untilReadable: sfd)
        xs.close()
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}

NetbackCommand.main()
