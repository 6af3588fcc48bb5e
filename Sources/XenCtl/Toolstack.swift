import CXen
import Glibc
import XenHV

/// The toolstack's operations on one run directory (xl's verbs and the service
/// launcher). Errors are single lines that name the object.
public struct Toolstack: Sendable {
    /// The run directory, absolute: guests run in `/` and the names made
    /// from it (network namespaces) must not depend on how it was spelt.
    public let runDir: String
    public init(runDir: String) { self.runDir = Self.absolutePath(runDir) }

    /// `path` made absolute against the current directory, without empty or
    /// `.` components (`..` is kept: what it means depends on symlinks).
    static func absolutePath(_ path: String) -> String {
        let full = path.hasPrefix("/") ? path : (DiskSpec.currentDirectory() ?? "") + "/" + path
        let parts = full.split(separator: "/").filter { $0 != "." }
        return "/" + parts.joined(separator: "/")
    }

    /// One error line: what a user, a config or a guest wrote is quoted with
    /// its control characters escaped.
    public struct Failure: Error, CustomStringConvertible {
        public let description: String
        init(_ d: String) { description = d.escapingControlCharacters }
    }

    public var hypervisorSocket: String { runDir + "/xenhv.sock" }
    public var xenstoreSocket: String { runDir + "/xenstored/socket" }

    /// The dom0 services, in start order, with the command lines the supervisor
    /// and the systemd units both use.
    public func services(bindir: String) -> [ServiceSpec] {
        [
            ServiceSpec(name: "xenhv", executable: bindir + "/xenhv",
                        arguments: ["--socket", hypervisorSocket], readyLine: "xenhv ready"),
            ServiceSpec(name: "xenstored", executable: bindir + "/xenstored",
                        arguments: ["--socket", xenstoreSocket, "--hypervisor", hypervisorSocket],
                        readyLine: "xenstored ready", dependsOn: ["xenhv"]),
            ServiceSpec(name: "blkback", executable: bindir + "/blkback",
                        arguments: ["--hypervisor", hypervisorSocket, "--xenstore", xenstoreSocket], readyLine: "blkback ready", dependsOn: ["xenhv", "xenstored"]),
            ServiceSpec(name: "netback", executable: bindir + "/netback",
                        arguments: ["--hypervisor", hypervisorSocket, "--xenstore", xenstoreSocket], readyLine: "netback ready", dependsOn: ["xenhv", "xenstored"]),
        ]
    }

    public static func systemdUnits(bindir: String) -> [(String, String)] {
        let t = Toolstack(runDir: "/run/swiftxen")
        let specs = t.services(bindir: bindir)
        return specs.enumerated().map { i, s in
            // As the supervisor does: a dependency that goes down takes its
            // dependents down (BindsTo=, with After=), and once it runs again,
            // so do they. Its own Restart= does not start them again (they
            // were stopped, not failed), so it upholds them (Upholds=,
            // systemd >= 249: started whenever found inactive while it runs).
            let deps = s.dependsOn.map { "swiftxen-\($0).service" }.joined(separator: " ")
            let dependents = specs.filter { $0.dependsOn.contains(s.name) }.map { "swiftxen-\($0.name).service" }.joined(separator: " ")
            let after = (deps.isEmpty ? "" : "\nAfter=\(deps)\nBindsTo=\(deps)") + (dependents.isEmpty ? "" : "\nUpholds=\(dependents)")
            return ("swiftxen-\(s.name).service", """
                [Unit]
                Description=SwiftXen \(s.name)\(after)

                [Service]
                Type=notify
                NotifyAccess=main
                Environment=XEN_RUN_DIR=/run/swiftxen
                RuntimeDirectory=swiftxen
                RuntimeDirectoryPreserve=yes
                ExecStart=\(s.commandLine)
                Restart=on-failure
                RestartSec=1

                [Install]
                WantedBy=multi-user.target

                """)
        }
    }

    /// The supervisor's pid if it is alive: the pid file's process, if that
    /// is this run directory's `xenctl supervise` (a supervisor that died
    /// without removing its file may have left its pid to anyone).
    public func supervisorPID() -> pid_t? {
        guard let f = fopen(runDir + "/supervisor.pid", "r") else { return nil }
        defer { fclose(f) }
        var pid: Int32 = 0
        guard fscanf_pid(f, &pid), pid > 0, kill(pid, 0) == 0 else { return nil }
        let fd = open("/proc/\(pid)/cmdline", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: 4096)
        let n = read(fd, &buf, buf.count)
        let args = buf.prefix(max(0, n)).split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
        guard args.count >= 4, args[1] == "supervise", let i = args.firstIndex(of: "--run-dir"), i + 1 < args.count,
              args[i + 1] == runDir else { return nil }
        return pid
    }

    /// Starts the supervisor (detached) unless it runs, and waits up to
    /// `seconds` until every service is ready. A supervisor found stopping
    /// (a `down` at the same time) is waited out and a new one started; one
    /// this call started that exits at once (another `up`'s won the run
    /// directory) leaves the wait to the winner. A supervisor this call
    /// started whose services do not come up in time is stopped again (with
    /// them): nothing half-made stays behind a failed `up`.
    public func up(seconds: Double = 60) throws {
        var started: (handle: ProcessHandle, pid: pid_t)?
        func startSupervisor() throws {
            mkdir(runDir, 0o755)
            Self.makePrivateDirectory(runDir + "/logs")
            unlink(runDir + "/supervisor.status")
            let log = open(runDir + "/logs/supervisor.log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
            guard log >= 0 else { throw Failure("cannot write \(runDir)/logs: \(String(cString: strerror(errno)))") }
            defer { close(log) }
            let null = open("/dev/null", O_RDONLY | O_CLOEXEC)
            defer { close(null) }
            let pid = try ProcessLauncher.spawn(ProcessLauncher.executableDirectory + "/xenctl", arguments: ["supervise", "--run-dir", runDir],
                                                descriptors: [(null, 0), (log, 1), (log, 2)], newSession: true)
            started = ProcessHandle(pid).map { ($0, pid) }
        }
        if supervisorPID() == nil { try startSupervisor() }
        // Wait (bounded) for the supervisor's published state.
        let deadline = monotonicSeconds() + seconds
        var status: [ServiceStatus] = []
        var exits = 0  // of supervisors this call started that left at once
        while true {
            status = ServiceStatus.read(runDir: runDir) ?? []
            if !status.isEmpty, status.count == services(bindir: "").count, status.allSatisfy({ $0.state == "running" }) { return }
            if let s = started, s.handle.waitForExit(until: 0) {
                // Ours went away: the supervisor now running (if any) is
                // another up's, or one still on its way out holds the run
                // directory (then ours is started again once it is gone).
                started = nil
                exits += 1
                if exits >= 3 && supervisorPID() == nil && !supervisorLockHeld() {
                    throw Failure("the supervisor exited before the dom0 services came up; see \(runDir)/logs/supervisor.log")
                }
            } else if started == nil, supervisorPID() == nil, !supervisorLockHeld() {
                try startSupervisor()  // the one that was stopping is gone
            }
            guard monotonicSeconds() < deadline else { break }
            idle(milliseconds: 50)
        }
        let behind = status.filter { $0.state != "running" }.map { "\($0.name) \($0.state)" + ($0.restarts > 0 ? " after \($0.restarts) restarts" : "") }
        let what = behind.isEmpty ? "" : " (" + behind.joined(separator: ", ") + ")"
        let secs = secondsText(seconds)
        if let s = started, supervisorPID() == s.pid {
            s.handle.signal(SIGTERM)
            let gone = s.handle.waitForExit(until: monotonicSeconds() + 90)
            throw Failure("dom0 services did not come up within \(secs) s\(what); \(gone ? "stopped them again" : "the supervisor did not stop") (see \(runDir)/logs/)")
        }
        throw Failure("dom0 services did not come up within \(secs) s\(what); see \(runDir)/logs/")
    }

    /// Whether a supervisor holds the run directory's lock (one is running,
    /// or still on its way out after removing its pid file).
    func supervisorLockHeld() -> Bool {
        let fd = open(runDir + "/supervisor.lock", O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return flock(fd, LOCK_EX | LOCK_NB) != 0
    }

    /// Stops everything; false if nothing was running.
    public func down() throws -> Bool {
        // Through a pidfd taken while the pid is known to be the supervisor's:
        // no signal reaches a process that got its pid later.
        guard let pid = supervisorPID(), let supervisor = ProcessHandle(pid), supervisorPID() == pid else { return false }
        supervisor.signal(SIGTERM)
        guard supervisor.waitForExit(until: monotonicSeconds() + 60) else {
            throw Failure("the supervisor (pid \(pid)) did not stop within 60 s")
        }
        return true
    }

    public func statusTable() -> String {
        let rows = ServiceStatus.read(runDir: runDir) ?? []
        var out = "Service      PID      State       Restarts"
        for r in rows {
            out += "\n" + r.name.padding(12) + " " + String(r.pid).padding(8) + " " + r.state.padding(11) + " " + String(r.restarts)
        }
        return out
    }

    func connect() throws -> Hypervisor {
        do { return try Hypervisor.connect(socketPath: hypervisorSocket) } catch {
            throw Failure("xenhv is not running at \(hypervisorSocket) (xenctl up starts it)")
        }
    }

    /// `xl list`.
    public func listTable() throws -> String {
        let hv = try connect()
        var out = "Name                                        ID   Mem VCPUs\tState\tTime(s)"
        for d in try hv.listDomains() {
            let mem = d.domid == 0 ? 0 : Int(d.pages) / 256
            out += "\n" + d.name.padding(40) + String(d.domid).leftPadding(5) + String(mem).leftPadding(6)
                + String(1).leftPadding(6) + "     " + d.stateLetters + "  " + "0.0".leftPadding(8)
        }
        return out
    }

    func resolve(_ hv: Hypervisor, _ domain: String) throws -> Hypervisor.DomainInfo {
        let all = try hv.listDomains()
        if let id = DomID(domain), let d = all.first(where: { $0.domid == id }) { return d }
        if let d = all.first(where: { $0.name == domain }) { return d }
        throw Failure("no domain '\(domain)'")
    }

    /// `xl pause` / `xl unpause`: the domain's process stops (all of it: a
    /// confined guest's whole PID namespace) or continues.
    public func pause(_ domain: String, _ paused: Bool) throws {
        let hv = try connect()
        let d = try resolve(hv, domain)
        guard d.domid != 0 else { throw Failure("domain 0 cannot be \(paused ? "paused" : "unpaused")") }
        if paused { try hv.pauseDomain(d.domid) } else { try hv.unpauseDomain(d.domid) }
    }

    /// `xl destroy`.
    public func destroy(_ domain: String) throws {
        let hv = try connect()
        let d = try resolve(hv, domain)
        guard d.domid != 0 else { throw Failure("domain 0 cannot be destroyed") }
        try hv.destroyDomain(d.domid)
        removeStoreEntries(of: d.domid)
    }

    /// Destroys every guest (before the services stop).
    public func destroyAllGuests() {
        guard let hv = try? Hypervisor.connect(socketPath: hypervisorSocket), let all = try? hv.listDomains() else { return }
        let xs = try? connectStore()
        for d in all where d.domid != 0 {
            try? hv.destroyDomain(d.domid)
            removeStoreEntries(of: d.domid, xs)
        }
        xs?.close()
    }
}

private func fscanf_pid(_ f: UnsafeMutablePointer<FILE>, _ pid: inout Int32) -> Bool {
    var line = [CChar](repeating: 0, count: 32)
    guard fgets(&line, 32, f) != nil else { return false }
    guard let v = Int32(cString(line).filter(\.isNumber)) else { return false }
    pid = v
    return true
}

extension String {
    func padding(_ n: Int) -> String { count >= n ? self : self + String(repeating: " ", count: n - count) }
    func leftPadding(_ n: Int) -> String { count >= n ? self : String(repeating: " ", count: n - count) + self }
    /// The longest prefix of whole characters that is at most `bytes` UTF-8 bytes
    /// (Xen counts a domain name's length in bytes).
    func prefix(utf8 bytes: Int) -> String {
        var end = startIndex, used = 0
        for c in self {
            used += c.utf8.count
            guard used <= bytes else { break }
            end = index(after: end)
        }
        return String(self[..<end])
    }
}

/// A number of seconds as the CLI prints it: whole ones without a fraction.
public func secondsText(_ x: Double) -> String { x == x.rounded() ? String(Int(x)) : String(x) }
