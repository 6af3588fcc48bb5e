import Dispatch
import Foundation
import Synchronization
import Glibc
import Logging
import XenBus
import XenHV
import XenStore

/// A private dom0 for integration tests and benchmarks: a real xenhv process,
/// xenstored (in-process, with its guest rings on the hypervisor core and
/// VIRQ_DOM_EXC followed), a toolstack connection to each, and helpers for the
/// toolstack's part of `xl create`. Everything is torn down at deinit.
public final class Dom0Harness: @unchecked Sendable {
    public let dir: String
    public let xenhvPID: pid_t
    /// The toolstack's hypervisor connection.
    public let hypervisor: Hypervisor
    /// The toolstack's xenstore connection (over the Unix socket).
    public let xenstore: XenBusClient
    public let xenstoreSocket: String
    public let hypervisorSocket: String
    let daemon: XenStoreDaemon
    let stopped = DispatchSemaphore(value: 0)
    private var interrupted: InterruptCleanup.Token?

    /// Where `swift build` put the executables (XEN_BUILD_DIR, else .build/debug).
    public static func buildDirectory(packageRoot: String) -> String {
        ProcessInfo.processInfo.environment["XEN_BUILD_DIR"] ?? packageRoot + "/.build/debug"
    }

    /// A first domid for a private xenhv that other test processes and other
    /// harnesses in this one are unlikely to use, so tap names (vif<domid>.N)
    /// of dom0s running side by side do not collide.
    public static func distinctFirstDomID() -> UInt16 {
        let n = harnessCounter.withLock { c -> UInt32 in c += 1; return c }
        // 300 bands of 100 domids per process id, a band per harness after that.
        let band = (UInt32(getpid()) &* 7 &+ n &* 31) % 300
        return UInt16(100 + band * 100)
    }

    public init(buildDirectory: String) throws {
        var template = Array("/tmp/xen-dom0-XXXXXX".utf8CString)
        dir = String(cString: mkdtemp(&template)!)
        hypervisorSocket = dir + "/xenhv.sock"
        xenstoreSocket = dir + "/xenstored.sock"
        var p: [CInt] = [-1, -1]
        guard pipe(&p) == 0 else { throw HypervisorError.system(call: "pipe", errno: errno) }
        _ = fcntl(p[0], F_SETFD, FD_CLOEXEC)
        xenhvPID = try ProcessLauncher.spawn(buildDirectory + "/xenhv",
                                             arguments: ["--socket", hypervisorSocket, "--log-level", "error",
                                                         "--first-domid", "\(Self.distinctFirstDomID())"],
                                             descriptors: [(p[1], 1)])
        close(p[1])
        let ready = ProcessLauncher.readLine(p[0])
        close(p[0])
        guard ready.hasPrefix("xenhv ready") else { throw HypervisorError.protocolViolation("xenhv did not start") }
        hypervisor = try Hypervisor.connect(socketPath: hypervisorSocket)

        let hv = try Hypervisor.connect(socketPath: hypervisorSocket)
        let core = XenStoreCore(quotas: .default)
        core.useHypervisor(hv)
        daemon = try XenStoreDaemon(core: core)
        try daemon.listen(path: xenstoreSocket)
        try DomainDeathWatcher(hypervisor: hv, daemon: daemon.handle, logger: Logger(label: "xenstored")).start()
        nonisolated(unsafe) let d = daemon
        let sem = stopped
        Foundation.Thread { d.run(); sem.signal() }.start()
        xenstore = try XenBusClient.connect(socketPath: xenstoreSocket)
        let (pid, dir) = (xenhvPID, dir)
        interrupted = InterruptCleanup.register {
            InterruptCleanup.stop(pid)  // its guests end with it
            try? FileManager.default.removeItem(atPath: dir)
        }
    }

    /// A new xenstore connection for a dom0 service (a backend).
    public func dom0XenStore() throws -> XenBusClient { try XenBusClient.connect(socketPath: xenstoreSocket) }
    /// A new hypervisor connection for a dom0 service.
    public func dom0Hypervisor() throws -> Hypervisor { try Hypervisor.connect(socketPath: hypervisorSocket) }

    public struct Guest: @unchecked Sendable {
        public let domain: Hypervisor.CreatedDomain
        /// The guest's own hypervisor connection (in this process).
        public let hypervisor: Hypervisor
        /// The guest's xenstore connection over its ring page.
        public let xenstore: XenBusClient
        public var domid: XenHV.DomID { domain.domid }
        public var home: String { "/local/domain/\(domain.domid)" }
    }

    /// The toolstack's part of `xl create`: the domain, its home directory owned
    /// by it (name, domid), XS_INTRODUCE of its ring; then the guest side's own
    /// connections, played in this process.
    public func createGuest(name: String, pages: UInt32 = 1024) throws -> Guest {
        let d = try prepareGuest(name: name, pages: pages)
        let hv = try Hypervisor.guest(descriptor: d.guestDescriptor)
        return Guest(domain: d, hypervisor: hv, xenstore: try XenBusClient.guest(hypervisor: hv))
    }

    /// The toolstack's part only: the domain, its home directory and its
    /// introduction; the caller hands `guestDescriptor` to a guest process.
    public func prepareGuest(name: String, pages: UInt32 = 1024) throws -> Hypervisor.CreatedDomain {
        let d = try hypervisor.createDomain(pages: pages, name: name)
        let home = "/local/domain/\(d.domid)"
        // The home first, owned by the guest; its children inherit that (libxl's order).
        try xenstore.mkdir(home)
        try xenstore.setPermissions(home, [XSPerm(XenStore.DomID(d.domid), [])])
        try xenstore.write(home + "/name", name)
        try xenstore.write(home + "/domid", "\(d.domid)")
        try xenstore.introduce(domid: XenStore.DomID(d.domid), mfn: d.storeMFN, port: d.storePort)
        return d
    }

    /// A guest's kernel process, started the way `xenctl create` starts it.
    public struct GuestKernel {
        public let pid: pid_t
        /// What it printed before its ready line (disk and nic lines).
        public let lines: [String]
        /// The read end of its stdout, still open after the ready line when asked
        /// for (`keepOutput`), else -1.
        public let output: CInt
    }

    /// Starts `program` (pvguest, pvguest-load) as `domain`'s kernel: the
    /// domain's descriptor as XENHV_GUEST_FD, attached to the domain, stderr to
    /// `stderr`. Returns once it printed a line starting with `readyPrefix`;
    /// throws if it exits first.
    public func startKernel(_ domain: Hypervisor.CreatedDomain, _ program: String, arguments: [String],
                            buildDirectory: String, environment: [String: String] = [:], stderr: CInt = 2,
                            readyPrefix: String = "pvguest ready", keepOutput: Bool = false) throws -> GuestKernel {
        var out: [CInt] = [-1, -1]
        guard pipe(&out) == 0 else { throw HypervisorError.system(call: "pipe", errno: errno) }
        _ = fcntl(out[0], F_SETFD, FD_CLOEXEC)
        let pid: pid_t
        do {
            pid = try ProcessLauncher.spawn(buildDirectory + "/" + program, arguments: arguments,
                                            environment: environment.merging(["XENHV_GUEST_FD": "3"]) { $1 },
                                            descriptors: [(out[1], 1), (stderr, 2), (domain.guestDescriptor, 3)])
        } catch {
            close(out[0]); close(out[1]); close(domain.guestDescriptor)
            throw error
        }
        close(out[1])
        close(domain.guestDescriptor)
        try hypervisor.attachProcess(pid, to: domain.domid)
        var lines: [String] = []
        while true {
            let line = ProcessLauncher.readLine(out[0])
            if line.hasPrefix(readyPrefix) { break }
            if line.isEmpty {
                close(out[0])
                throw HypervisorError.protocolViolation("\(program) exited before it was ready")
            }
            lines.append(line.trimmingCharacters(in: .whitespacesAndNewlines))
        }
        if !keepOutput { close(out[0]) }
        return GuestKernel(pid: pid, lines: lines, output: keepOutput ? out[0] : -1)
    }

    /// Waits (bounded) until `<dir>/state` satisfies `predicate`.
    public static func wait(_ xs: XenBusClient, state dir: String, seconds: Double = 20,
                            _ predicate: (XenBus.XenbusState) -> Bool) -> XenBus.XenbusState? {
        xs.awaitState(at: dir, seconds: seconds, predicate)
    }

    deinit {
        xenstore.close()
        daemon.handle.stop()
        stopped.wait()
        if interrupted.map({ InterruptCleanup.unregister($0) }) ?? true {
            kill(xenhvPID, SIGTERM)
            var st: Int32 = 0
            waitpid(xenhvPID, &st, 0)
            try? FileManager.default.removeItem(atPath: dir)
        }
    }
}

private let harnessCounter = Mutex<UInt32>(0)
