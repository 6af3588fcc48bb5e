import CXen
import Glibc
import Synchronization
import XenHV

/// Clean-up that also runs when a benchmark is interrupted (Ctrl-C, SIGTERM,
/// SIGHUP), so the processes, bridges, namespaces and files it made outside
/// itself do not outlive it. Each owner registers what it must undo when it
/// makes it and unregisters once its own teardown has run; outside
/// ``run(_:)`` (the tests) registrations are kept and never run.
///
/// On a signal a thread of its own runs every registered action, newest
/// first; the run's own thread, whose children are gone then, fails and
/// unwinds through its teardown, and whatever it registers meanwhile is undone
/// at once. The process then exits with 128 + the signal's number, as a shell
/// reports it (after at most 60 s, if the run's thread is stuck).
public enum InterruptCleanup {
    public struct Token: Sendable { let id: Int }
    private struct State {
        var next = 0
        var actions: [(id: Int, action: @Sendable () -> Void)] = []
        var signal: Int32 = 0
    }
    private static let state = Mutex(State())

    /// Runs `body` (a benchmark's whole run) with the signals taken by the
    /// clean-up thread (a handler writes them to a pipe; children start with
    /// default dispositions).
    public static func run(_ body: () throws -> Void) throws {
        let signals = cxen_termination_pipe()
        guard signals >= 0 else { throw HypervisorError.system(call: "sigaction", errno: -signals) }
        DetachedThread.start(name: "interrupt") {
            var b: UInt8 = 0
            guard read(signals, &b, 1) == 1 else { return }
            let sig = Int32(b)
            let actions = state.withLock { s in
                s.signal = sig
                return s.actions.reversed().map(\.action)
            }
            let line = "interrupted (\(String(cString: strsignal(sig)))): cleaning up\n"
            _ = line.withCString { write(2, $0, strlen($0)) }
            for a in actions { a() }
            idle(milliseconds: 60_000)
            _exit(128 + sig)
        }
        do {
            try body()
        } catch where state.withLock({ $0.signal }) == 0 {
            throw error
        } catch {}  // the interruption's consequence, not news
        let sig = state.withLock { $0.signal }
        if sig != 0 { exit(128 + sig) }
    }

    /// `action` runs if the process is interrupted before ``unregister(_:)``.
    public static func register(_ action: @escaping @Sendable () -> Void) -> Token {
        let (token, interrupted) = state.withLock { s in
            s.next += 1
            if s.signal == 0 { s.actions.append((s.next, action)) }
            return (Token(id: s.next), s.signal != 0)
        }
        if interrupted { action() }
        return token
    }

    public static func unregister(_ token: Token) {
        state.withLock { s in s.actions.removeAll { $0.id == token.id } }
    }

    /// Stops a child of ours for an interrupted run: SIGTERM, then SIGKILL if
    /// it is still there after `seconds`, and reaps it.
    public static func stop(_ pid: pid_t, seconds: Double = 5) {
        guard pid > 0, let p = ProcessHandle(pid) else { return }
        p.signal(SIGTERM)
        if !p.waitForExit(until: monotonicSeconds() + seconds) { p.signal(SIGKILL) }
        var st: Int32 = 0
        _ = waitpid(pid, &st, 0)
    }
}
