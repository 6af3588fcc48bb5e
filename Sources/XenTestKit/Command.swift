import Glibc
import XenHV

/// Runs a tool to completion and captures what it printed, for tests and
/// benchmarks that drive real tools (xenctl, ip, ping, qemu-io). Bounded: a
/// tool still running after `timeout` seconds is killed and reported with
/// status -1, so a hung tool fails the caller instead of hanging it.
public struct CommandResult: Sendable, CustomStringConvertible {
    public let status: Int32
    public let out: String
    public let err: String
    public var ok: Bool { status == 0 }
    public var description: String { "status \(status); stdout: \(out) stderr: \(err)" }

    /// `path` (absolute, or looked up in /usr/sbin, /usr/bin, /sbin, /bin) with `arguments`.
    public static func run(_ path: String, _ arguments: [String], environment: [String: String] = [:],
                           timeout: Double = 60) -> CommandResult {
        let exe = path.hasPrefix("/") ? path
            : ["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map { $0 + "/" + path }.first { access($0, X_OK) == 0 } ?? path
        var o: [CInt] = [-1, -1], e: [CInt] = [-1, -1]
        guard pipe(&o) == 0 else { return CommandResult(status: -1, out: "", err: "pipe: \(errno)") }
        guard pipe(&e) == 0 else { close(o[0]); close(o[1]); return CommandResult(status: -1, out: "", err: "pipe: \(errno)") }
        for fd in [o[0], e[0]] { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        let null = open("/dev/null", O_RDONLY | O_CLOEXEC)
        let pid: pid_t
        do {
            pid = try ProcessLauncher.spawn(exe, arguments: arguments, environment: environment,
                                            descriptors: [(null, 0), (o[1], 1), (e[1], 2)])
        } catch {
            for fd in [o[0], o[1], e[0], e[1], null] { close(fd) }
            return CommandResult(status: -1, out: "", err: "\(error)")
        }
        for fd in [o[1], e[1], null] { close(fd) }
        var out: [UInt8] = [], err: [UInt8] = []
        var open = [o[0], e[0]]
        let end = monotonicSeconds() + timeout
        var timedOut = false
        var buf = [UInt8](repeating: 0, count: 65536)
        while !open.isEmpty {
            let left = end - monotonicSeconds()
            if left <= 0 { timedOut = true; kill(pid, SIGKILL); break }
            var fds = open.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            if poll(&fds, nfds_t(fds.count), Int32(min(left * 1000, 1000)) + 1) < 0 && errno != EINTR { break }
            for p in fds where p.revents != 0 {
                let n = read(p.fd, &buf, buf.count)
                if n > 0 {
                    if p.fd == o[0] { out += buf[0..<n] } else { err += buf[0..<n] }
                } else if n == 0 || errno != EINTR {
                    open.removeAll { $0 == p.fd }
                }
            }
        }
        close(o[0]); close(e[0])
        var st: Int32 = 0
        while waitpid(pid, &st, 0) < 0 && errno == EINTR {}
        let exited = (st & 0x7f) == 0
        return CommandResult(status: timedOut || !exited ? -1 : (st >> 8) & 0xff,
                             out: String(decoding: out, as: UTF8.self),
                             err: String(decoding: err, as: UTF8.self) + (timedOut ? "\n(killed after \(timeout) s)" : ""))
    }
}
