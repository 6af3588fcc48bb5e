import CXen
import Glibc

/// Starts a process with chosen descriptors in chosen slots (posix_spawn), the
/// way a toolstack starts a guest with its hypervisor connection inherited.
public enum ProcessLauncher {
    /// How a guest process is kept from dom0's powers (libxl's dm_restrict
    /// for QEMU: its own uid, no capabilities; here also its own user and
    /// network namespace, in which it may make its NICs and nothing else,
    /// and a PID namespace whose init it is, so what it starts dies with it,
    /// with a /proc of that namespace in a mount namespace of its own).
    public struct Confinement: Sendable, Equatable {
        public var uid: uid_t
        public var gid: gid_t
        /// The `ip netns` name the child's network namespace gets before it
        /// runs (its mount point, ``NetNamespace/makeMountPoint(_:)``, must
        /// exist); nil leaves it unnamed.
        public var networkNamespace: String?
        /// Hard limits it cannot raise: the largest file it may write
        /// (RLIMIT_FSIZE; a write past it fails with EFBIG) and how many
        /// processes and threads its uid may have (RLIMIT_NPROC); nil leaves one as it is.
        public var maxFileSize: UInt64?
        public var maxProcesses: UInt64?
        /// What failed, for the error line: the step of the shim and, where
        /// the host is the likely cause, what to change.
        static func describe(step: CInt, errno e: CInt) -> String {
            switch Int(step) {
            case Int(CXEN_CONFINE_CREDENTIALS): return "changing its uid and gid"
            case Int(CXEN_CONFINE_LIMITS): return "setting its resource limits"
            case Int(CXEN_CONFINE_NAMESPACES):
                return "making its user, network and PID namespaces"
                    + (e == EPERM || e == ENOSPC || e == EUSERS
                        ? " (unprivileged user namespaces must be allowed: sysctl user.max_user_namespaces > 0, and kernel.unprivileged_userns_clone=1 where that exists)"
                        : "")
            case Int(CXEN_CONFINE_ID_MAPS): return "mapping its uid and gid in its user namespace"
            case Int(CXEN_CONFINE_NAME): return "naming its network namespace \(NetNamespace.directory)/..."
            case Int(CXEN_CONFINE_EXEC): return "executing the program"
            case Int(CXEN_CONFINE_PROC): return "making its mount namespace"
            default: return "preparing the child"
            }
        }

        public init(uid: uid_t, gid: gid_t, networkNamespace: String? = nil, maxFileSize: UInt64? = nil, maxProcesses: UInt64? = nil) {
            self.uid = uid
            self.gid = gid
            self.networkNamespace = networkNamespace
            self.maxFileSize = maxFileSize
            self.maxProcesses = maxProcesses
        }
    }

    /// Spawns `path` with `arguments`; `descriptors` maps our fd to the child's
    /// slot (e.g. a pipe to 0, the guest connection to 3); no other
    /// descriptor above 2 reaches the child. `newSession`
    /// detaches the child into its own session (a daemon outliving its starter).
    /// `cpus` is the child's hard CPU affinity (xl.cfg's `cpus`, which libxl
    /// sets with xc_vcpu_setaffinity before the guest runs): the calling
    /// thread takes it for the spawn, so the child and every thread it ever
    /// starts inherit it, and gets its own back.
    /// `confinement` starts it as another uid in a user and network
    /// namespace of its own (``Confinement``). `tiedToThread` has the kernel
    /// kill it (SIGKILL) when the calling thread ends or this process dies,
    /// kill -9 included (PR_SET_PDEATHSIG): for a helper that must not
    /// outlive the thread waiting for it, such as a hotplug script.
    public static func spawn(
        _ path: String, arguments: [String], environment: [String: String] = [:],
        descriptors: [(ours: CInt, child: CInt)] = [], newSession: Bool = false, cpus: CPUSet? = nil,
        confinement: Confinement? = nil, tiedToThread: Bool = false
    ) throws -> pid_t {
        var saved = CPUSet.Words(repeating: 0, count: Int(CXEN_CPU_WORDS))
        if let cpus {
            guard cxen_thread_affinity(&saved) == 0 else { throw HypervisorError.system(call: "sched_getaffinity", errno: errno) }
            guard cxen_set_thread_affinity(cpus.words) == 0 else {
                throw HypervisorError.system(call: "sched_setaffinity \(cpus)", errno: errno)
            }
        }
        defer { if cpus != nil { _ = cxen_set_thread_affinity(saved) } }
        // Move sources out of the way first so no dup2 clobbers a later source,
        // and so source == target still ends up without close-on-exec.
        var staged: [(CInt, CInt)] = []
        defer { for (t, _) in staged { close(t) } }
        for (ours, child) in descriptors {
            let tmp = fcntl(ours, F_DUPFD_CLOEXEC, 100)
            guard tmp >= 0 else { throw HypervisorError.system(call: "fcntl(F_DUPFD)", errno: errno) }
            staged.append((tmp, child))
        }
        // Nothing else crosses over, not even descriptors we inherited without
        // close-on-exec (a caller's pipe would otherwise never see EOF).
        let closeFrom = max(3, (descriptors.map(\.child).max() ?? 2) + 1)

        var env = [String: String]()
        var i = 0
        while let e = environ[i] {
            let kv = String(cString: e)
            if let eq = kv.firstIndex(of: "=") { env[String(kv[..<eq])] = String(kv[kv.index(after: eq)...]) }
            i += 1
        }
        for (k, v) in environment { env[k] = v }
        let argv = ([path] + arguments).map { strdup($0) } + [nil]
        let envp = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            argv.forEach { free($0) }
            envp.forEach { free($0) }
        }
        var pid: pid_t = 0
        if let confinement {
            // clone and exec in the shim, which resets signals, moves the
            // descriptors and closes the rest itself: posix_spawn cannot
            // change uid or namespaces.
            let from = staged.map(\.0), to = staged.map(\.1)
            let mountPoint = confinement.networkNamespace.map(NetNamespace.path)
            var step: CInt = 0
            let rc = cxen_spawn_confined(path, argv, envp, from, to, CInt(staged.count), closeFrom, newSession ? 1 : 0,
                                         confinement.uid, confinement.gid, mountPoint,
                                         confinement.maxFileSize ?? 0, confinement.maxProcesses ?? 0, &pid, &step)
            guard rc == 0 else {
                throw HypervisorError.system(call: "starting \(path) as uid \(confinement.uid): \(Confinement.describe(step: step, errno: rc))", errno: rc)
            }
            return pid
        }
        if tiedToThread {
            // fork and exec in the shim: posix_spawn cannot set a death signal.
            let rc = cxen_spawn_tied(path, argv, envp, staged.map(\.0), staged.map(\.1), CInt(staged.count), closeFrom,
                                     newSession ? 1 : 0, &pid)
            guard rc == 0 else { throw HypervisorError.system(call: "starting \(path)", errno: rc) }
            return pid
        }
        // The child starts with no blocked signals and default dispositions,
        // whatever signalfd or handlers its parent set up.
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attr, &empty)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for sig in [SIGPIPE, SIGTERM, SIGINT, SIGHUP, SIGCHLD] { sigaddset(&defaults, sig) }
        posix_spawnattr_setsigdefault(&attr, &defaults)
        posix_spawnattr_setflags(&attr, Int16(0x08 /* SETSIGMASK */ | 0x04 /* SETSIGDEF */ | (newSession ? 0x80 /* SETSID */ : 0)))
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for (t, child) in staged { posix_spawn_file_actions_adddup2(&actions, t, child) }
        _ = cxen_spawn_closefrom(&actions, closeFrom)
        let rc = posix_spawn(&pid, path, &actions, &attr, argv, envp)
        guard rc == 0 else { throw HypervisorError.system(call: "posix_spawn \(path)", errno: rc) }
        return pid
    }
}

/// A process named by a pidfd (pidfd_open(2)): its signals reach the process
/// it was taken for, or nobody once that has exited, never one that got its
/// pid later; and anyone, not only its parent, can wait for it to exit.
/// Taken while something shows that pid is still the process meant.
public final class ProcessHandle: Sendable {
    public let pid: pid_t
    private let fd: CInt

    /// nil when the process has gone (or no descriptor is left).
    public init?(_ pid: pid_t) {
        let fd = cxen_pidfd_open(pid)
        guard fd >= 0 else { return nil }
        self.pid = pid
        self.fd = fd
    }

    deinit { close(fd) }

    /// Sends `signal` (0 only checks); false once the process has exited.
    @discardableResult
    public func signal(_ signal: CInt) -> Bool { cxen_pidfd_send_signal(fd, signal) == 0 }

    /// Waits until the process has exited (the pidfd polls readable) or
    /// `deadline` (``monotonicSeconds()``) has passed; true if it exited.
    public func waitForExit(until deadline: Double) -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        while true {
            let left = deadline - monotonicSeconds()
            if poll(&p, 1, left > 0 ? Int32(min(left, 1) * 1000) + 1 : 0) > 0 && p.revents & Int16(POLLIN) != 0 { return true }
            if left <= 0 { return false }
        }
    }
}

/// A set of CPUs by number (a CPU affinity), in the bitmap the C shim takes.
public struct CPUSet: Sendable, Equatable, CustomStringConvertible {
    public typealias Words = [UInt64]
    /// CPU n is bit n % 64 of word n / 64.
    public private(set) var words = Words(repeating: 0, count: Int(CXEN_CPU_WORDS))
    /// CPU numbers a set can hold (0..<1024, glibc's CPU_SETSIZE).
    public static let capacity = Int(CXEN_CPU_WORDS) * 64

    public init() {}
    public init<S: Sequence<Int>>(_ cpus: S) {
        for c in cpus { insert(c) }
    }

    public mutating func insert(_ cpu: Int) {
        precondition((0..<Self.capacity).contains(cpu), "CPU \(cpu) out of range")
        words[cpu / 64] |= 1 << UInt64(cpu % 64)
    }
    public mutating func remove(_ cpu: Int) {
        precondition((0..<Self.capacity).contains(cpu), "CPU \(cpu) out of range")
        words[cpu / 64] &= ~(1 << UInt64(cpu % 64))
    }
    public func contains(_ cpu: Int) -> Bool {
        (0..<Self.capacity).contains(cpu) && words[cpu / 64] >> UInt64(cpu % 64) & 1 == 1
    }
    public var cpus: [Int] { (0..<Self.capacity).filter(contains) }
    public var isEmpty: Bool { words.allSatisfy { $0 == 0 } }

    /// The calling thread's affinity.
    public static func current() -> CPUSet? {
        var s = CPUSet()
        return cxen_thread_affinity(&s.words) == 0 ? s : nil
    }

    /// Ranges, as Linux's cpulist format writes them ("0-3,6").
    public var description: String {
        var parts: [String] = []
        var i = 0
        let all = cpus
        while i < all.count {
            var j = i
            while j + 1 < all.count && all[j + 1] == all[j] + 1 { j += 1 }
            parts.append(i == j ? "\(all[i])" : "\(all[i])-\(all[j])")
            i = j + 1
        }
        return parts.joined(separator: ",")
    }
}

extension ProcessLauncher {
    /// The directory of the running executable: where its sibling tools
    /// (xenhv, xenstored, the backends) were built or installed.
    public static var executableDirectory: String {
        var buf = [CChar](repeating: 0, count: 4096)
        _ = readlink("/proc/self/exe", &buf, buf.count - 1)  // the rest stays NUL
        let path = cString(buf)
        return String(path[..<(path.lastIndex(of: "/") ?? path.endIndex)])
    }

    /// Writes one line to a descriptor (line protocols with child processes).
    public static func writeLine(_ fd: CInt, _ s: String) {
        _ = (s + "\n").withCString { write(fd, $0, strlen($0)) }
    }

    /// Reads one line (without the newline) from a descriptor, byte by byte so
    /// nothing past the line is consumed; "" at end of stream. For a process
    /// that may be hostile (a guest's ready pipe): nil once `deadline`
    /// (``monotonicSeconds()``) has passed first; a line is cut at `limit`
    /// bytes (the rest comes as the next).
    /// Also nil once a termination signal was noted (`cxen_note_termination`).
    public static func readLine(_ fd: CInt, deadline: Double, limit: Int = 4096, interruptFD: CInt = -1) -> String? {
        var line = [UInt8]()
        var c: UInt8 = 0
        while line.count < limit {
            let left = deadline - monotonicSeconds()
            guard left > 0, cxen_termination_noted() == 0 else { return nil }
            if left.isFinite {  // a trusted writer's line (no deadline) is read straight
                // `interruptFD` (a signalfd of termination signals, which then
                // interrupt no wait): readable is an interruption too. Not read.
                var p = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0),
                         pollfd(fd: interruptFD, events: Int16(POLLIN), revents: 0)]
                let r = poll(&p, 2, Int32(min(left * 1000, 60_000)) + 1)
                if r < 0 && errno == EINTR { continue }
                if p[1].revents != 0 { return nil }
                guard r > 0 else { continue }
            }
            let n = read(fd, &c, 1)
            if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
            if n <= 0 || c == 10 { break }
            line.append(c)
        }
        return String(decoding: line, as: UTF8.self)
    }

    /// ``readLine(_:deadline:limit:)`` from a trusted process: no deadline, no limit.
    public static func readLine(_ fd: CInt) -> String {
        readLine(fd, deadline: .infinity, limit: .max) ?? ""
    }
}

/// `sockaddr_un` for a filesystem path, checked against sun_path's size.
public enum UnixSocketAddress {
    public static func make(_ path: String) throws(HypervisorError) -> sockaddr_un {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            throw .cannotConnect(path: path, errno: ENAMETOOLONG)
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: bytes); $0[bytes.count] = 0 }
        return addr
    }

    /// Calls `body` with the address as a `sockaddr` pointer and its length.
    public static func with<R>(_ addr: inout sockaddr_un, _ body: (UnsafePointer<sockaddr>, socklen_t) -> R) -> R {
        withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }
}

/// A detached OS thread for a loop that blocks in system calls (a ring's
/// completion loop, a VIRQ watcher): one place instead of a copy per module.
public final class DetachedThread: @unchecked Sendable {
    // Sound: `body` and `name` are immutable and only used once, on the new thread.
    let body: @Sendable () -> Void
    let name: String?
    init(_ body: @escaping @Sendable () -> Void, name: String?) { self.body = body; self.name = name }

    /// Starts `body` on a new detached thread, named `name` (15 bytes are
    /// kept); false if no thread could be made (EAGAIN: RLIMIT_NPROC, memory),
    /// and then `body` never runs.
    @discardableResult
    public static func start(name: String? = nil, _ body: @escaping @Sendable () -> Void) -> Bool {
        let box = Unmanaged.passRetained(DetachedThread(body, name: name)).toOpaque()
        var attr = pthread_attr_t()
        pthread_attr_init(&attr)
        defer { pthread_attr_destroy(&attr) }
        pthread_attr_setdetachstate(&attr, Int32(PTHREAD_CREATE_DETACHED))
        var tid = pthread_t()
        guard pthread_create(&tid, &attr, { arg in
            let t = Unmanaged<DetachedThread>.fromOpaque(arg!).takeRetainedValue()
            if let n = t.name { cxen_set_thread_name(n) }
            t.body()
            return nil
        }, box) == 0 else {
            Unmanaged<DetachedThread>.fromOpaque(box).release()
            return false
        }
        return true
    }

    /// Names the calling thread, as top -H and perf show it.
    public static func setName(_ name: String) { cxen_set_thread_name(name) }
}

/// A NUL-terminated C character array (a `strftime`, `readlink` or `fgets`
/// buffer, an interface name) as a String, up to its first NUL.
@inline(__always) public func cString(_ a: [CChar]) -> String {
    String(decoding: a.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// A daemon telling whoever started it that it serves: the line xenctl's
/// supervisor (and tests) wait for on its stdout, written straight to the
/// descriptor (a piped stdout is fully buffered), and systemd's `READY=1`
/// (sd_notify) when a `Type=notify` unit started it with `$NOTIFY_SOCKET`.
public enum ServiceReadiness {
    public static func announce(_ line: String) {
        _ = (line + "\n").withCString { write(1, $0, strlen($0)) }
        guard let p = getenv("NOTIFY_SOCKET"), p.pointee != 0 else { return }
        let path = String(cString: p)
        // Ours alone (sd_notify's unset_environment): children that inherit
        // it would write to systemd, which takes only the main process.
        unsetenv("NOTIFY_SOCKET")
        guard var addr = try? UnixSocketAddress.make(path) else { return }
        // "@name" is an abstract socket: a leading NUL, and a length that ends the name.
        let abstract = path.hasPrefix("@")
        if abstract { withUnsafeMutableBytes(of: &addr.sun_path) { $0[0] = 0 } }
        let s = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { return }
        defer { close(s) }
        _ = UnixSocketAddress.with(&addr) { sa, full in
            let length = abstract ? socklen_t(MemoryLayout<sockaddr_un>.offset(of: \.sun_path)! + path.utf8.count) : full
            return sendto(s, "READY=1", 7, Int32(MSG_NOSIGNAL), sa, length)
        }
    }
}
