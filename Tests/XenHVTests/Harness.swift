import Foundation
import Glibc
import XenHV
import XenTestKit

/// A child process with line-oriented pipes on stdin/stdout.
final class Child {
    let pid: pid_t
    let input: CInt
    let output: CInt
    private var buffer: [UInt8] = []
    private var reaped = false

    init(_ executable: String, _ arguments: [String], environment: [String: String] = [:],
         extra: [(ours: CInt, child: CInt)] = []) throws {
        var toChild: [CInt] = [-1, -1], fromChild: [CInt] = [-1, -1]
        guard pipe(&toChild) == 0, pipe(&fromChild) == 0 else {
            throw HypervisorError.system(call: "pipe", errno: errno)
        }
        for fd in toChild + fromChild { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        pid = try ProcessLauncher.spawn(
            BuildProducts.path(executable), arguments: arguments, environment: environment,
            descriptors: [(toChild[0], 0), (fromChild[1], 1)] + extra)
        close(toChild[0])
        close(fromChild[1])
        input = toChild[1]
        output = fromChild[0]
    }

    /// Reads one line; nil at end of stream.
    func readLine() -> String? {
        while true {
            if let nl = buffer.firstIndex(of: 10) {
                let line = String(decoding: buffer[..<nl], as: UTF8.self)
                buffer.removeSubrange(...nl)
                return line
            }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let n = read(output, &chunk, chunk.count)
            if n <= 0 { return nil }
            buffer.append(contentsOf: chunk[..<n])
        }
    }

    /// Sends a command and returns the reply line.
    @discardableResult
    func send(_ command: String) -> String {
        let line = command + "\n"
        _ = line.withCString { write(input, $0, strlen($0)) }
        return readLine() ?? "<eof>"
    }

    /// Sends without waiting for the reply (for blocking commands).
    func post(_ command: String) {
        let line = command + "\n"
        _ = line.withCString { write(input, $0, strlen($0)) }
    }

    func kill9() {
        guard !reaped else { return }
        kill(pid, SIGKILL)
        reap()
    }

    /// SIGTERM and reap, unless reaped already (its pid may be another's now).
    func terminate() {
        guard !reaped else { return }
        kill(pid, SIGTERM)
        reap()
    }

    func reap() {
        guard !reaped else { return }
        var st: Int32 = 0
        waitpid(pid, &st, 0)
        reaped = true
    }

    deinit {
        if !reaped { kill(pid, SIGKILL); reap() }
        close(input)
        close(output)
    }
}

/// A private xenhv for one test, on its own socket; stopped and cleaned up at deinit.
final class HypervisorFixture {
    let dir: String
    let socket: String
    let daemon: Child
    let dom0: Hypervisor

    /// `stderr`: where xenhv's log goes (else the test's own stderr).
    init(xenhvArguments: [String] = [], stderr: CInt? = nil) throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("xenhv-test-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        socket = dir + "/xenhv.sock"
        daemon = try Child("xenhv", ["--socket", socket, "--log-level", "error"] + xenhvArguments,
                           extra: stderr.map { [(ours: $0, child: CInt(2))] } ?? [])
        guard let line = daemon.readLine(), line.hasPrefix("xenhv ready") else {
            throw HypervisorError.protocolViolation("xenhv did not start")
        }
        dom0 = try Hypervisor.connect(socketPath: socket)
    }

    /// Creates a domain and starts a guest peer process on its connection.
    func guest(pages: UInt32 = 64, name: String = "guest", guestIDBase: UInt32 = 0) throws -> (Hypervisor.CreatedDomain, Child) {
        let d = try dom0.createDomain(pages: pages, name: name, guestIDBase: guestIDBase)
        let child = try Child("xen-testpeer", ["guest"], environment: ["XENHV_GUEST_FD": "3"],
                              extra: [(d.guestDescriptor, 3)])
        close(d.guestDescriptor)
        try dom0.attachProcess(child.pid, to: d.domid)
        guard child.readLine() == "ready domid \(d.domid)" else {
            throw HypervisorError.protocolViolation("guest peer did not start")
        }
        return (d, child)
    }

    /// A second dom0 process (a mapper we can kill).
    func dom0Peer() throws -> Child {
        let c = try Child("xen-testpeer", ["dom0", socket])
        guard c.readLine() == "ready domid 0" else { throw HypervisorError.protocolViolation("dom0 peer did not start") }
        return c
    }

    deinit {
        daemon.terminate()
        try? FileManager.default.removeItem(atPath: dir)
    }
}

func hex(_ b: [UInt8]) -> String {
    let digits = Array("0123456789abcdef")
    return String(b.flatMap { [digits[Int($0 >> 4)], digits[Int($0 & 15)]] })
}
