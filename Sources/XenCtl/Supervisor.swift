import CXen
import Glibc
import Logging
import XenHV

/// One dom0 service as the supervisor (and its systemd unit) runs it.
public struct ServiceSpec: Sendable, Equatable {
    public var name: String
    public var executable: String
    public var arguments: [String]
    /// The service is up once it prints a stdout line starting with this.
    public var readyLine: String
    /// Services this one needs: it restarts when one of them does.
    public var dependsOn: [String]
    public init(name: String, executable: String, arguments: [String], readyLine: String, dependsOn: [String] = []) {
        self.name = name
        self.executable = executable
        self.arguments = arguments
        self.readyLine = readyLine
        self.dependsOn = dependsOn
    }
    public var commandLine: String { ([executable] + arguments).joined(separator: " ") }
}

/// Supervises the dom0 services: starts them in order, each once the previous
/// is ready; restarts one that dies with exponential back-off; logs each to
/// `<run-dir>/logs/<name>.log`; on SIGTERM stops them in reverse order.
/// Its state is published in `<run-dir>/supervisor.status` for `xenctl status`.
public final class Supervisor {
    final class Service {
        let spec: ServiceSpec
        var pid: pid_t = 0
        var stdout: CInt = -1
        var log: CInt = -1
        var ready = false
        var restarts = 0
        var startedAt: Double = 0
        var restartAt: Double?
        var backoff: Double = 0.5
        var lineBuffer: [UInt8] = []
        var everStarted = false
        /// Stopped on purpose (a dependency restarts): not a crash.
        var expectedExit = false
        /// Stopped with a dependency; started again in order once that is ready.
        var waitingForDependency = false
        /// When it was asked to stop (SIGTERM) for a dependency's restart: past
        /// ``Supervisor/stopGraceSeconds`` it gets SIGKILL.
        var stopAskedAt: Double?
        init(_ s: ServiceSpec) { spec = s }
    }

    let runDir: String
    let services: [Service]
    var logger: Logger
    /// Called before the services stop (e.g. destroy guests while xenhv still runs).
    public var beforeStop: (() -> Void)?
    let signals: CInt
    /// The next service to start once the one before it is ready.
    var startIndex = 0
    /// How long a service asked to stop (at shutdown, or for its dependency's
    /// restart) may take before it is killed.
    static let stopGraceSeconds = 10.0

    public init(runDir: String, services: [ServiceSpec], logger: Logger) throws {
        self.runDir = runDir
        self.services = services.map(Service.init)
        self.logger = logger
        var sigs: [CInt] = [SIGTERM, SIGINT, SIGHUP, SIGCHLD]
        signals = cxen_signalfd(&sigs, CInt(sigs.count))
        guard signals >= 0 else { throw HypervisorError.system(call: "signalfd", errno: errno) }
        mkdir(runDir, 0o755)
        Toolstack.makePrivateDirectory(runDir + "/logs")
    }

    /// Runs until SIGTERM/SIGINT; returns after every service has stopped.
    public func run() {
        // One supervisor per run directory: the lock is held (its descriptor
        // never closed) for this one's life. A second, from a concurrent
        // `xenctl up`, leaves at once and touches nothing of the first's.
        let lock = open(runDir + "/supervisor.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard lock >= 0, flock(lock, LOCK_EX | LOCK_NB) == 0 else {
            logger.error("another supervisor runs for \(runDir); this one stops")
            if lock >= 0 { close(lock) }
            return
        }
        writeFile(runDir + "/supervisor.pid", "\(getpid())\n")
        var stopping = false
        start(services[0])
        publish()
        while true {
            var fds = [pollfd(fd: signals, events: Int16(POLLIN), revents: 0)]
            for s in services where s.stdout >= 0 { fds.append(pollfd(fd: s.stdout, events: Int16(POLLIN), revents: 0)) }
            let now = monotonicSeconds()
            // Wake for the next restart, or to kill a service slow to stop.
            let nextRestart = (services.compactMap(\.restartAt) + services.compactMap { $0.stopAskedAt.map { $0 + Self.stopGraceSeconds } }).min()
            let timeout = nextRestart.map { Int32(max(0, min(60_000, ($0 - now) * 1000))) } ?? -1
            _ = poll(&fds, nfds_t(fds.count), timeout)

            while case let sig = cxen_signalfd_read(signals), sig > 0 {
                if sig == SIGCHLD { reap(stopping: stopping) } else { stopping = true }
            }
            for p in fds.dropFirst() where p.revents != 0 {
                guard let s = services.first(where: { $0.stdout == p.fd }) else { continue }
                pump(s)
            }
            if stopping { break }
            // Start the next service once the previous one is ready; one still
            // on its way out (stopped for a dependency's restart) is waited
            // for, not passed over, so it is started again once it is gone.
            while startIndex + 1 < services.count, services[startIndex].ready {
                let next = services[startIndex + 1]
                if next.expectedExit && next.pid > 0 { break }
                if next.pid == 0 && next.restartAt == nil && (next.waitingForDependency || !next.everStarted) {
                    next.waitingForDependency = false
                    start(next)
                }
                startIndex += 1
            }
            let t = monotonicSeconds()
            for s in services where s.expectedExit && s.pid > 0 && (s.stopAskedAt.map { t - $0 > Self.stopGraceSeconds } ?? false) {
                logger.warning("\(s.spec.name) did not stop within \(Int(Self.stopGraceSeconds)) s; killing it")
                kill(s.pid, SIGKILL)  // our child, not reaped yet: its pid is its own
                s.stopAskedAt = nil
            }
            for s in services where s.restartAt.map({ $0 <= t }) ?? false {
                s.restartAt = nil
                start(s)
            }
            publish()
        }
        stopAll()
    }

    func start(_ s: Service) {
        var p: [CInt] = [-1, -1]
        guard pipe(&p) == 0 else {
            // Out of descriptors for now: tried again like a failed start, not dropped.
            logger.error("cannot start \(s.spec.name): pipe: \(String(cString: strerror(errno)))")
            scheduleRestart(s)
            return
        }
        _ = fcntl(p[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(p[0], F_SETFL, O_NONBLOCK)
        if s.log < 0 { s.log = open(runDir + "/logs/\(s.spec.name).log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644) }
        do {
            s.pid = try ProcessLauncher.spawn(s.spec.executable, arguments: s.spec.arguments,
                                              environment: ["XEN_RUN_DIR": runDir],
                                              descriptors: [(p[1], 1), (s.log, 2)])
            s.stdout = p[0]
            s.ready = false
            s.everStarted = true
            s.startedAt = monotonicSeconds()
            logger.info("started \(s.spec.name)", metadata: ["pid": "\(s.pid)"])
        } catch {
            close(p[0])
            logger.error("cannot start \(s.spec.name): \(error)")
            scheduleRestart(s)
        }
        close(p[1])
    }

    /// Copies a service's stdout to its log and watches for the ready line.
    func pump(_ s: Service) {
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(s.stdout, &buf, buf.count)
            if n <= 0 {
                if n == 0 { close(s.stdout); s.stdout = -1 }
                return
            }
            _ = buf.withUnsafeBytes { write(s.log, $0.baseAddress, n) }
            guard !s.ready else { continue }
            s.lineBuffer += buf[0..<n]
            while let nl = s.lineBuffer.firstIndex(of: 10) {
                let line = String(decoding: s.lineBuffer[..<nl], as: UTF8.self)
                s.lineBuffer.removeSubrange(...nl)
                if line.hasPrefix(s.spec.readyLine) {
                    s.ready = true
                    s.backoff = 0.5
                    logger.info("\(s.spec.name) is ready")
                }
            }
            if s.lineBuffer.count > 65536 { s.lineBuffer.removeAll() }
        }
    }

    func reap(stopping: Bool) {
        while true {
            var st: Int32 = 0
            let pid = waitpid(-1, &st, WNOHANG)
            guard pid > 0 else { return }
            guard let i = services.firstIndex(where: { $0.pid == pid }) else { continue }
            let s = services[i]
            s.pid = 0
            s.ready = false
            if s.stdout >= 0 { pump(s); close(s.stdout); s.stdout = -1 }
            if s.expectedExit {
                s.expectedExit = false
                s.stopAskedAt = nil
                continue
            }
            guard !stopping else { continue }
            logger.warning("\(s.spec.name) exited (status \(st)); restarting in \(s.backoff)s")
            // A service that ran a minute is healthy again: reset its back-off.
            if monotonicSeconds() - s.startedAt > 60 { s.backoff = 0.5 }
            scheduleRestart(s)
            // Its dependents (a new xenhv has no domains, a new xenstored no
            // connections) stop too and start again, in order, once it is ready.
            let dependents = self.dependents(of: s.spec.name)
            for d in services[(i + 1)...] where dependents.contains(d.spec.name) {
                if d.pid > 0 {
                    d.expectedExit = true
                    d.ready = false  // it is going: nothing after it starts against it
                    d.stopAskedAt = monotonicSeconds()
                    kill(d.pid, SIGTERM)
                }
                d.restartAt = nil
                d.waitingForDependency = true
            }
            startIndex = min(startIndex, i)
        }
    }

    /// Every service that needs `name`, directly or through another.
    func dependents(of name: String) -> Set<String> {
        var out = Set<String>()
        var frontier = [name]
        while let n = frontier.popLast() {
            for s in services where s.spec.dependsOn.contains(n) && !out.contains(s.spec.name) {
                out.insert(s.spec.name)
                frontier.append(s.spec.name)
            }
        }
        return out
    }

    func scheduleRestart(_ s: Service) {
        s.restarts += 1
        s.restartAt = monotonicSeconds() + s.backoff
        s.backoff = min(s.backoff * 2, 30)
    }

    /// Stops services in reverse order: SIGTERM, then SIGKILL after 10 s.
    func stopAll() {
        // Published first: an `up` meanwhile must not take the services
        // still listed as running for a supervisor that is going away.
        publish(stopping: true)
        beforeStop?()
        for s in services.reversed() where s.pid > 0 {
            kill(s.pid, SIGTERM)
            let deadline = monotonicSeconds() + Self.stopGraceSeconds
            var st: Int32 = 0
            while waitpid(s.pid, &st, WNOHANG) == 0 {
                if monotonicSeconds() > deadline {
                    logger.warning("\(s.spec.name) did not stop; killing it")
                    kill(s.pid, SIGKILL)
                    waitpid(s.pid, &st, 0)
                    break
                }
                var pfd = pollfd(fd: signals, events: Int16(POLLIN), revents: 0)
                _ = poll(&pfd, 1, 100)
                _ = cxen_signalfd_read(signals)
            }
            logger.info("stopped \(s.spec.name)")
            s.pid = 0
            if s.stdout >= 0 { close(s.stdout); s.stdout = -1 }
        }
        for s in services where s.log >= 0 { close(s.log) }
        unlink(runDir + "/supervisor.pid")
        unlink(runDir + "/supervisor.status")
    }

    /// One line per service: name, pid, state, restarts.
    func publish(stopping: Bool = false) {
        let text = services.map { s in
            let state = s.pid > 0 ? (stopping ? "stopping" : s.ready ? "running" : "starting")
                : (s.restartAt != nil && !stopping ? "restarting" : "stopped")
            return "\(s.spec.name) \(s.pid) \(state) \(s.restarts)"
        }.joined(separator: "\n") + "\n"
        writeFile(runDir + "/supervisor.status.tmp", text)
        rename(runDir + "/supervisor.status.tmp", runDir + "/supervisor.status")
    }
}

func writeFile(_ path: String, _ text: String) {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    guard fd >= 0 else { return }
    _ = text.withCString { write(fd, $0, strlen($0)) }
    close(fd)
}

/// The supervisor's published view, as `xenctl status` reads it.
public struct ServiceStatus: Sendable, Equatable {
    public let name: String
    public let pid: Int32
    public let state: String
    public let restarts: Int

    public static func read(runDir: String) -> [ServiceStatus]? {
        guard let f = fopen(runDir + "/supervisor.status", "r") else { return nil }
        defer { fclose(f) }
        var out: [ServiceStatus] = []
        var line: UnsafeMutablePointer<CChar>?
        var cap = 0
        while getline(&line, &cap, f) > 0, let l = line {
            let w = String(cString: l).split(separator: " ").map(String.init)
            guard w.count == 4 else { continue }
            out.append(ServiceStatus(name: w[0], pid: Int32(w[1]) ?? 0, state: w[2].trimmingSpaces, restarts: Int(w[3].filter(\.isNumber)) ?? 0))
        }
        free(line)
        return out
    }
}
