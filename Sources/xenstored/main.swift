// xenstored: argument parsing only; the daemon lives in the XenStore library.
import ArgumentParser
import Glibc
import Logging
import XenHV
import XenStore

@main
struct XenstoredCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "xenstored",
        abstract: "The Xen store daemon: xs_wire over a Unix socket (dom0) and guest rings.")

    @Option(help: "Unix socket path (default: $XEN_RUN_DIR/xenstored/socket, XEN_RUN_DIR=/run/swiftxen).")
    var socket: String?

    @Option(help: "xenhv's socket: serve guests over their xenstore rings and follow domain deaths (VIRQ_DOM_EXC).")
    var hypervisor: String?

    @Option(help: "Nodes a domain may own (C xenstored -E).") var quotaNodes = XSQuotas.default.maxNodes
    @Option(help: "Bytes per node (C xenstored -S).") var quotaNodeSize = XSQuotas.default.maxNodeSize
    @Option(help: "Watches per domain (C xenstored -W).") var quotaWatches = XSQuotas.default.maxWatches
    @Option(help: "Transactions per connection (C xenstored -t).") var quotaTransactions = XSQuotas.default.maxTransactions
    @Option(help: "Nodes touched per transaction.") var quotaTransactionNodes = XSQuotas.default.maxTransactionNodes
    @Option(help: "Outstanding requests per connection (C xenstored -Q).") var quotaOutstanding = XSQuotas.default.maxOutstanding
    @Option(help: "Message payload bytes (at most XENSTORE_PAYLOAD_MAX, 4096); longer messages end the connection.")
    var quotaPayload = XSQuotas.default.maxPayload
    @Option(help: "Path length below /local/domain/<id>/.") var quotaPathLength = XSQuotas.default.maxPathLength
    @Option(help: "Permission entries per node.") var quotaPerms = XSQuotas.default.maxPerms
    @Option(help: "Undelivered output bytes a guest connection may hold; watch events past it are dropped.") var quotaOutputBytes = XSQuotas.default.maxOutputBytes
    @Option(help: "Seconds a guest's watch event may stay undelivered before it is dropped (0: never).") var watchEventTimeout = XSQuotas.default.watchEventTimeout
    @Option(parsing: .singleValue,
            help: "Per-domain quota override DOMID:KEY=VALUE (keys: nodes, node-size, watches, transactions, outstanding, payload, path-length, perms).")
    var domainQuota: [String] = []
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.") var logLevel = "notice"

    func validate() throws {
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("unknown log level \(logLevel)") }
        for q in domainQuota where parseOverride(q) == nil { throw ValidationError("bad --domain-quota \(q)") }
        guard quotaPayload > 0 && quotaPayload <= 4096 else { throw ValidationError("--quota-payload must be 1...4096") }
    }

    func parseOverride(_ s: String) -> (UInt32, String, Int)? {
        let a = s.split(separator: ":", maxSplits: 1)
        guard a.count == 2, let d = UInt32(a[0]) else { return nil }
        let kv = a[1].split(separator: "=", maxSplits: 1)
        guard kv.count == 2, let v = Int(kv[1]), v >= 0,
              ["nodes", "node-size", "watches", "transactions", "outstanding", "payload", "path-length", "perms"].contains(String(kv[0]))
        else { return nil }
        return (d, String(kv[0]), v)
    }

    func run() throws {
        let level = Logger.Level(rawValue: logLevel)!
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        signal(SIGPIPE, SIG_IGN)
        // A parent may have spawned us with these blocked (Foundation's Process does).
        var unblock = sigset_t()
        sigemptyset(&unblock)
        sigaddset(&unblock, SIGTERM)
        sigaddset(&unblock, SIGINT)
        sigprocmask(SIG_UNBLOCK, &unblock, nil)
        var q = XSQuotas()
        q.maxNodes = quotaNodes; q.maxNodeSize = quotaNodeSize; q.maxWatches = quotaWatches
        q.maxTransactions = quotaTransactions; q.maxTransactionNodes = quotaTransactionNodes
        q.maxOutstanding = quotaOutstanding; q.maxPayload = quotaPayload; q.maxPathLength = quotaPathLength; q.maxPerms = quotaPerms
        q.maxOutputBytes = quotaOutputBytes; q.watchEventTimeout = watchEventTimeout
        let core = XenStoreCore(quotas: q, logger: Logger(label: "xenstored"))
        for o in domainQuota {
            let (d, k, v) = parseOverride(o)!
            var dq = core.domainQuotas[d] ?? q
            switch k {
            case "nodes": dq.maxNodes = v
            case "node-size": dq.maxNodeSize = v
            case "watches": dq.maxWatches = v
            case "transactions": dq.maxTransactions = v
            case "outstanding": dq.maxOutstanding = v
            case "payload": dq.maxPayload = min(v, 4096)
            case "path-length": dq.maxPathLength = v
            default: dq.maxPerms = v
            }
            core.domainQuotas[d] = dq
        }
        let runDir = getenv("XEN_RUN_DIR").map { String(cString: $0) } ?? "/run/swiftxen"
        let path = socket ?? "\(runDir)/xenstored/socket"
        let daemon = try XenStoreDaemon(core: core)
        try daemon.listen(path: path)
        let handle = daemon.handle
        if let hvPath = hypervisor {
            let hv = try Hypervisor.connect(socketPath: hvPath)
            core.useHypervisor(hv)
            try DomainDeathWatcher(hypervisor: hv, daemon: handle, logger: Logger(label: "xenstored")).start()
        }
        // SIGTERM/SIGINT: stop the loop so the socket file is removed.
        XenstoredCommand.installStopSignals(handle)
        fflush(nil)
        ServiceReadiness.announce("xenstored ready \(path)")
        daemon.run()
    }

    nonisolated(unsafe) static var stopHandle: XenStoreDaemonHandle?
    static func installStopSignals(_ h: XenStoreDaemonHandle) {
        stopHandle = h
        let handler: @convention(c) (Int32) -> Void = { _ in XenstoredCommand.stopHandle?.stop() }
        signal(SIGTERM, handler)
        signal(SIGINT, handler)
    }
}
