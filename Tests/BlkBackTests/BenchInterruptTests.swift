import Foundation
import Glibc
import Testing
import XenHV
import XenTestKit

/// An interrupted benchmark undoes what it made (InterruptCleanup): here
/// blkback-bench's null mode, stopped by SIGTERM while it measures, stops its
/// xenhv and removes its run directory, and exits 128 + SIGTERM. Root (the
/// benchmark's xenhv); every process and file it made is checked gone.
@Suite struct BenchInterruptTests {
    @Test func anInterruptedBenchmarkStopsWhatItStartedAndRemovesItsFiles() throws {
        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        defer { close(null) }
        let bench = try ProcessLauncher.spawn(BuildProducts.path("blkback-bench"),
                                              arguments: ["--null-only", "--seconds", "30"],
                                              descriptors: [(null, 0), (null, 1), (null, 2)])
        var reaped = false
        defer { if !reaped { kill(bench, SIGKILL); waitpid(bench, nil, 0) } }
        let dir = NSTemporaryDirectory() + "blkback-bench-\(bench)"
        func children() -> [pid_t] {
            ((try? String(contentsOfFile: "/proc/\(bench)/task/\(bench)/children", encoding: .utf8)) ?? "")
                .split(separator: " ").compactMap { pid_t($0) }
        }
        // Measuring: its xenhv is up (the only child) and its directory made.
        #expect(eventually(seconds: 30) { children().count == 1 && access(dir + "/xenhv.sock", F_OK) == 0 })
        let xenhv = children()
        // Whatever the benchmark failed to undo is undone here.
        let handles = xenhv.compactMap { ProcessHandle($0) }
        defer {
            for h in handles { h.signal(SIGKILL) }
            try? FileManager.default.removeItem(atPath: dir)
        }
        #expect(kill(bench, SIGTERM) == 0)
        var st: Int32 = 0
        #expect(waitpid(bench, &st, 0) == bench)
        reaped = true
        #expect(st & 0x7F == 0 && (st >> 8) & 0xFF == 128 + SIGTERM, "status \(st)")
        for pid in xenhv { #expect(kill(pid, 0) == -1 && errno == ESRCH, "xenhv \(pid) outlived the benchmark") }
        #expect(access(dir, F_OK) != 0, "\(dir) outlived the benchmark")
    }
}
