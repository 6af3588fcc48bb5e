import CXen
import Glibc

/// Starts a process with chosen descriptors in chosen slots (posix_spawn), the
/// way a toolstack starts a guest with its hypervisor connection inherited.
public enum ProcessLauncher {
    /// Spawns `path` with `arguments`; `descriptors` maps our fd to the child's
    /// slot (e.g. a pipe to 0, the guest connection to 3); no other
    /// descriptor above 2 reaches the child. `newSession`
    /// detaches the child into its own session (a daemon outliving its starter).
    public static func spawn(
        _ path: String, arguments: [String], environment: [String: String] = [:],
        descriptors: [(ours: CInt, child: CInt)] = [], newSession: Bool = false
    ) throws -> pid_t {
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
        // Move sources out of the way first so no dup2 clobbers a later source,
        // and so source == target still ends up without close-on-exec.
        var staged: [(CInt, CInt)] = []
        for (ours, child) in descriptors {
            let tmp = fcntl(ours, F_DUPFD_CLOEXEC, 100)
            guard tmp >= 0 else { throw HypervisorError.system(call: "fcntl(F_DUPFD)", errno: errno) }
            staged.append((tmp, child))
        }
        defer { for (t, _) in staged { close(t) } }
        for (t, child) in staged { posix_spawn_file_actions_adddup2(&actions, t, child) }
        // Nothing else crosses over, not even descriptors we inherited without
        // close-on-exec (a caller's pipe would otherwise never see EOF).
        let firstFree = (descriptors.map(\.child).max() ?? 2) + 1
        _ = cxen_spawn_closefrom(&actions, max(3, firstFree))

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
        let rc = posix_spawn(&pid, path, &actions, &attr, argv, envp)
        guard rc == 0 else { throw HypervisorError.system(call: "posix_spawn \(path)", errno: rc) }
        return pid
    }
}
