import BlkBack
import BlkFrontKit
import Foundation
import Glibc
import Logging
import Testing
import XenHV
import XenRing
import XenTestKit

/// The suites that start xenhv: run one test at a time (they count the
/// process's descriptors and share two cores with the backend's threads).
@Suite(.serialized) enum BlkBackIntegration {}

/// A private xenhv on its own socket, a dom0 connection (the backend's) and
/// any number of guest connections held by this same process (the frontends').
/// Everything — daemon, temp directory, images — goes at deinit.
final class BlkFixture {
    let dir: String
    let socket: String
    let daemon: pid_t
    private let daemonOut: CInt
    let dom0: Hypervisor
    private var guests: [Hypervisor] = []

    init() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("blkback-test-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        socket = dir + "/xenhv.sock"
        var out: [CInt] = [-1, -1]
        guard pipe(&out) == 0 else { throw HypervisorError.system(call: "pipe", errno: errno) }
        _ = fcntl(out[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(out[1], F_SETFD, FD_CLOEXEC)
        let devnull = open("/dev/null", O_RDONLY | O_CLOEXEC)
        daemon = try ProcessLauncher.spawn(
            BuildProducts.path("xenhv"), arguments: ["--socket", socket, "--log-level", "error"], environment: [:],
            descriptors: [(devnull, 0), (out[1], 1)])
        close(devnull)
        close(out[1])
        daemonOut = out[0]
        var line: [UInt8] = []
        var c: UInt8 = 0
        while read(daemonOut, &c, 1) == 1, c != 10 { line.append(c) }
        guard String(decoding: line, as: UTF8.self).hasPrefix("xenhv ready") else {
            kill(daemon, SIGKILL)
            throw HypervisorError.protocolViolation("xenhv did not start")
        }
        dom0 = try Hypervisor.connect(socketPath: socket)
    }

    /// A new domain and its guest connection, held in-process.
    func guest(pages: UInt32 = 2048, name: String = "guest") throws -> Hypervisor {
        let d = try dom0.createDomain(pages: pages, name: name)
        let g = try Hypervisor.guest(descriptor: d.guestDescriptor)
        guests.append(g)
        return g
    }

    /// A sparse image of `bytes`, filled with a pattern in its first `pattern` bytes.
    func image(_ name: String = "disk.img", bytes: Int, pattern: Int = 0) throws -> String {
        let path = dir + "/" + name
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw HypervisorError.system(call: "open", errno: errno) }
        defer { close(fd) }
        guard ftruncate(fd, off_t(bytes)) == 0 else { throw HypervisorError.system(call: "ftruncate", errno: errno) }
        if pattern > 0 {
            let data = (0..<pattern).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 9) }
            _ = data.withUnsafeBytes { pwrite(fd, $0.baseAddress, pattern, 0) }
        }
        return path
    }

    deinit {
        guests.removeAll()
        kill(daemon, SIGTERM)
        var st: Int32 = 0
        waitpid(daemon, &st, 0)
        close(daemonOut)
        try? FileManager.default.removeItem(atPath: dir)
    }
}

/// Bytes of a file at an offset, read with plain pread (the image as the host sees it).
func fileBytes(_ path: String, offset: Int, count: Int) -> [UInt8] {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    defer { close(fd) }
    var b = [UInt8](repeating: 0, count: count)
    let n = b.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
    return Array(b.prefix(max(0, n)))
}

func allocatedBytes(_ path: String) -> Int {
    var st = stat()
    stat(path, &st)
    return Int(st.st_blocks) * 512
}

/// A procfs file's text (they report size 0, so read until end of file).
func readProcFile(_ path: String) -> String {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return "" }
    defer { close(fd) }
    var out: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n <= 0 { break }
        out += chunk[..<n]
    }
    return String(decoding: out, as: UTF8.self)
}

/// aio contexts mapped in this process (io_setup maps one "[aio]" region each).
/// This process's aio contexts: the start address and inode of each [aio]
/// ring mapping. The inode tells a context apart from a later one that
/// another test, running in parallel, set up at the same address.
func aioContexts() -> [UInt: String] {
    var out: [UInt: String] = [:]
    for line in readProcFile("/proc/self/maps").split(separator: "\n") where line.contains("[aio]") {
        let f = line.split(separator: " ", omittingEmptySubsequences: true)
        guard f.count >= 5, let start = f[0].split(separator: "-").first, let a = UInt(start, radix: 16) else { continue }
        out[a] = String(f[4])
    }
    return out
}

func pattern(_ n: Int, seed: UInt8) -> [UInt8] {
    (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed) &+ $0 >> 12) }
}

/// Warnings and errors only, so test output stays readable.
let quietLogger: Logger = {
    var l = Logger(label: "blkback-test")
    l.logLevel = .warning
    return l
}()

/// A log handler that keeps every message (to check that a log line says why).
final class CapturedLog: @unchecked Sendable {
    private let lock = NSLock()
    private var lines: [String] = []
    func append(_ s: String) { lock.lock(); lines.append(s); lock.unlock() }
    var all: [String] { lock.lock(); defer { lock.unlock() }; return lines }

    var logger: Logger {
        Logger(label: "blkback-capture") { _ in Handler(log: self) }
    }

    struct Handler: LogHandler {
        let log: CapturedLog
        var logLevel: Logger.Level = .info
        var metadata: Logger.Metadata = [:]
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            log.append("\(event.level) \(event.message)")
        }
    }
}
