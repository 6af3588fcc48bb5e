import CXen
import Dispatch
import Foundation
import Glibc
import Synchronization
import Testing
@testable import XenHV
import XenTestKit

@Suite struct ProcessLauncherTests {
    /// Spawns /bin/sleep from a thread of its own, which then ends; returns its pid.
    static func sleeperFromAnEndedThread(tied: Bool) throws -> pid_t {
        let spawned = Mutex<Result<pid_t, any Error>?>(nil)
        let ended = DispatchSemaphore(value: 0)
        #expect(DetachedThread.start(name: "spawner") {
            let r = Result { try ProcessLauncher.spawn("/bin/sleep", arguments: ["600"], tiedToThread: tied) }
            spawned.withLock { $0 = r }
        ended.signal()
        })
        #expect(ended.wait(timeout: .now() + 10) == .success)
        return try #require(spawned.withLock { $0 }).get()
    }

    /// How `pid`, a child of ours, ended (its wait status), reaping it; nil while it runs.
    static func ended(_ pid: pid_t) -> Int32? {
        var st: Int32 = 0
        return waitpid(pid, &st, WNOHANG) == pid ? st : nil
    }

    /// A tied child is killed (SIGKILL) when the thread that spawned it ends,
    /// as it would be when its process dies; an untied one lives on.
    @Test func aTiedChildDiesWithTheThreadThatSpawnedIt() throws {
        let tied = try Self.sleeperFromAnEndedThread(tied: true)
        let untied = try Self.sleeperFromAnEndedThread(tied: false)
        defer {
            kill(untied, SIGKILL)
            var st: Int32 = 0
            waitpid(untied, &st, 0)
        }
        var status: Int32?
        #expect(eventually(seconds: 10) { status = Self.ended(tied); return status != nil }, "the tied child \(tied) still runs")
        if let status { #expect(status & 0x7F == SIGKILL, "wait status \(status)") }
        #expect(Self.ended(untied) == nil, "the untied child ended with its thread")
        #expect(kill(untied, 0) == 0)
    }

    /// A tied child gets its descriptors and session as a spawned one does,
    /// and a program that cannot be executed is an error, not a child.
    @Test func aTiedChildGetsItsDescriptorsAndSession() throws {
        var p: [CInt] = [-1, -1]
        #expect(pipe(&p) == 0 && fcntl(p[0], F_SETFD, FD_CLOEXEC) == 0 && fcntl(p[1], F_SETFD, FD_CLOEXEC) == 0)
        let pid = try ProcessLauncher.spawn("/bin/sh", arguments: ["-c", "echo $$; ls /proc/self/fd"],
                                            descriptors: [(p[1], 1), (2, 2)], newSession: true, tiedToThread: true)
        close(p[1])
        defer { close(p[0]) }
        let out = FileHandle(fileDescriptor: p[0], closeOnDealloc: false).readDataToEndOfFile()
        var st: Int32 = 0
        #expect(waitpid(pid, &st, 0) == pid && st == 0)
        let lines = String(decoding: out, as: UTF8.self).split(separator: "\n")
        #expect(lines.first == "\(pid)"[...])
        // 0, 1, 2 and the descriptor ls reads the directory through: nothing else of ours.
        #expect(lines.dropFirst().compactMap { Int($0) }.filter { $0 > 2 }.count <= 1, "\(lines)")
        let alive = try ProcessLauncher.spawn("/bin/sleep", arguments: ["600"], newSession: true, tiedToThread: true)
        #expect(getsid(alive) == alive)
        kill(alive, SIGKILL)
        waitpid(alive, &st, 0)
        #expect(throws: HypervisorError.self) {
            _ = try ProcessLauncher.spawn("/nonexistent/program", arguments: [], tiedToThread: true)
        }
    }
}
