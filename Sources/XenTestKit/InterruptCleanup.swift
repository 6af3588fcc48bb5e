import CXen
import Dispatch
import Glibc
import Synchronization
import XenHV

/// Clean-up that also runs when a benchmark is interrupted (Ctrl-C, SIGTERM,
/// SIGHUP), so the processes, bridges, namespaces and files it made outside
/// itself do not outlive it. Each owner registers what it must undo when it
/// makes it, and in its own teardown undoes it only if ``unregister(_:)``
/// says the clean-up has not taken it over; outside ``run(_:)`` (the tests)
/// registrations are kept and never run.
///
/// On a signal a thread of its own runs every registered action, newest
/// first; the run's own thread, whose children are gone then, fails and
/// unwinds through its teardown, and whatever it registers meanwhile is undone
/// at once. The process then exits with 128 + the signal's number, as a shell
/// reports it: when the run's thread is done, or 5 s after the clean-up;
/// SIGALRM ends it 60 s after the signal if the clean-up hangs.
public enum InterruptCleanup {
    public struct Token: Sendable { let id: Int }
    private struct State {
        var next = 0
        var actions: [(id: Int, action: @Sendable () -> Void)] = []
        var signal: Int32 = 0
    }
    private static let state = Mutex(State())
    /// Signalled once the actions have run (and again by every waiter).
    private static let cleaned = DispatchSemaphore(value: 0)

    /// Runs `body` (a benchmark's whole run) with the signals taken by the
    /// clean-up thread (a handler writes them to a pipe; children start with
    /// default dispositions).
    public static func run(_ body: () throws -> Void) throws {
        let signals = cxen_termination_pipe()
        guard signals >= 0 else { throw HypervisorError.system(call: "sigaction", errno: -signals) }
        let started = DetachedThread.start(name: "interrupt") {
            var b: UInt8 = 0
            guard read(signals, &b, 1) == 1 else { return }
            let sig = Int32(b)
            alarm(60)
            let actions = state.withLock { s in
                s.signal = sig
                defer { s.actions = [] }
                return s.actions.reversed().map(\.action)
            }
            let line = "interrupted (\(String(cString: strsignal(sig)))): cleaning up\n"
            _ = line.withCString { write(2, $0, strlen($0)) }
            for a in actions { a() }
            cleaned.signal()
            // The run's thread has this long to unwind (its children are
            // gone, so it mostly fails at once); one still measuring
            // something in-process is not waited for.
            idle(milliseconds: 5_000)
            _exit(128 + sig)
        }
        guard started else { throw HypervisorError.system(call: "pthread_create (interrupt clean-up)", errno: EAGAIN) }
        do {
            try body()
        } catch where state.withLock({ $0.signal }) == 0 {
            throw error
        } catch {}  // the interruption's consequence, not news
        let sig = state.withLock { $0.signal }
        if sig != 0 {
            waitForCleanUp()
            exit(128 + sig)
        }
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

    /// Takes the action back: true if its owner is to undo what it made, as
    /// usual; false once the run was interrupted, after the clean-up has run
    /// (the action ran, or ran at registration).
    @discardableResult
    public static func unregister(_ token: Token) -> Bool {
        let interrupted = state.withLock { s in
            s.actions.removeAll { $0.id == token.id }
            return s.signal != 0
        }
        if interrupted { waitForCleanUp() }
        return !interrupted
    }

    private static func waitForCleanUp() {
        cleaned.wait()
        cleaned.signal()
    }

    /// Stops a child of ours for an interrupted run: SIGTERM, then SIGKILL if
    /// it is still there after `seconds`, and reaps it. Only its owner reaps
    /// it otherwise, and only while ``unregister(_:)`` says so.
    public static func stop(_ pid: pid_t, seconds: Double = 5) {
        guard pid > 0, let p = ProcessHandle(pid) else { return }
        p.signal(SIGTERM)
        if !p.waitForExit(until: monotonicSeconds() + seconds) { p.signal(SIGKILL) }
        var st: Int32 = 0
        _ = waitpid(pid, &st, 0)
    }
}
