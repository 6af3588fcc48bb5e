// The guest-mode benchmarks: a private dom0 (xenhv, xenstored), the blkback
// daemon as its own process, and guest domains whose processes are pvguest
// (for the memory figures) or pvguest-load (the load generator on pvguest's
// blkfront), each disk attached through xenstore as the toolstack does.
import Foundation
import Glibc
import XenBus
import XenHV
import XenRing
import XenStore
import XenTestKit

/// Resident size of a process, from /proc/PID/status, in KiB.
struct Resident {
    var total = 0, anon = 0, file = 0, shmem = 0
    /// What the process itself holds: heap, stacks, code; not the guest pages it maps (shmem).
    var own: Int { anon + file }

    init(pid: pid_t) {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return }
        for line in text.split(separator: "\n") {
            let f = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard f.count >= 2, let v = Int(f[1]) else { continue }
            switch f[0] {
            case "VmRSS:": total = v
            case "RssAnon:": anon = v
            case "RssFile:": file = v
            case "RssShmem:": shmem = v
            default: break
            }
        }
    }

    var text: String {
        String(format: "%.1f MiB (own %.1f MiB: anon %.1f + file %.1f; guest pages mapped %.1f MiB)",
               Double(total) / 1024, Double(own) / 1024, Double(anon) / 1024, Double(file) / 1024, Double(shmem) / 1024)
    }
}

final class GuestRig {
    let dom0: Dom0Harness
    let blkback: pid_t
    private var interrupted: InterruptCleanup.Token?
    let bin: String
    private var guests = 0
    /// blkback's size and descriptors once it is ready, before any disk.
    private(set) var initialResident = Resident(pid: 0)
    private(set) var initialDescriptors = 0

    init() throws {
        bin = selfDirectory()
        dom0 = try Dom0Harness(buildDirectory: bin)
        var p: [CInt] = [-1, -1]
        guard pipe(&p) == 0 else { throw HypervisorError.system(call: "pipe", errno: errno) }
        _ = fcntl(p[0], F_SETFD, FD_CLOEXEC)
        blkback = try ProcessLauncher.spawn(bin + "/blkback",
                                            arguments: ["--hypervisor", dom0.hypervisorSocket, "--xenstore", dom0.xenstoreSocket,
                                                        "--log-level", "warning"],
                                            environment: ["XEN_RUN_DIR": dom0.dir],
                                            descriptors: [(p[1], 1), (2, 2)])
        close(p[1])
        defer { close(p[0]) }
        while true {
            let line = ProcessLauncher.readLine(p[0])
            if line.hasPrefix("blkback ready") { break }
            if line.isEmpty { throw HypervisorError.protocolViolation("blkback did not start") }
        }
        initialResident = resident
        initialDescriptors = descriptors
        let pid = blkback
        interrupted = InterruptCleanup.register { InterruptCleanup.stop(pid) }
    }

    deinit {
        guard interrupted.map({ InterruptCleanup.unregister($0) }) ?? true else { return }
        kill(blkback, SIGTERM)
        var st: Int32 = 0
        waitpid(blkback, &st, 0)
    }

    var resident: Resident { Resident(pid: blkback) }

    /// blkback's open descriptors (each connected queue holds an event channel, an aio eventfd and a control eventfd).
    var descriptors: Int { ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(blkback)/fd")) ?? []).count }

    /// Waits (bounded) until blkback holds `n` descriptors, e.g. its idle count after a detach.
    func awaitDescriptors(_ n: Int, seconds: Double = 20) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if descriptors == n { return true }
            usleep(20_000)  // polling a condition with a deadline
        }
        return false
    }

    /// A running guest process and its domain.
    struct Guest {
        let domid: XenHV.DomID
        let pid: pid_t
        let out: CInt
    }

    /// `xl create` for a guest with one writable disk on `image`, its kernel
    /// being `program` (pvguest or pvguest-load); returns once it printed `readyPrefix`.
    func start(_ program: String, image: String, arguments: [String], readyPrefix: String, pages: UInt32 = 16384) throws -> Guest {
        guests += 1
        let d = try dom0.prepareGuest(name: "bench\(guests)", pages: pages)
        let dev = XenBusDevice(type: "vbd", frontendDomid: XenStore.DomID(d.domid), devid: 51712)
        try dom0.xenstore.createDevice(dev, backend: ["params": image, "mode": "w", "type": "file", "dev": "xvda",
                                                      "device-type": "disk", "discard-enable": "0"],
                                       frontend: ["virtual-device": "51712", "device-type": "disk"])
        var out: [CInt] = [-1, -1]
        guard pipe(&out) == 0 else { throw HypervisorError.system(call: "pipe", errno: errno) }
        _ = fcntl(out[0], F_SETFD, FD_CLOEXEC)
        // pvguest logs every connection at info: its stderr goes to a log file; pvguest-load's (warnings) to ours.
        let log = program == "pvguest" ? open(dom0.dir + "/guest\(guests).log", O_WRONLY | O_CREAT | O_CLOEXEC, 0o644) : 2
        defer { if log != 2 { close(log) } }
        let pid = try ProcessLauncher.spawn(bin + "/" + program, arguments: arguments,
                                            environment: ["XENHV_GUEST_FD": "3", "XEN_RUN_DIR": dom0.dir],
                                            descriptors: [(out[1], 1), (log, 2), (d.guestDescriptor, 3)])
        close(out[1])
        close(d.guestDescriptor)
        try dom0.hypervisor.attachProcess(pid, to: d.domid)
        let g = Guest(domid: d.domid, pid: pid, out: out[0])
        while true {
            let line = ProcessLauncher.readLine(g.out)
            if line.hasPrefix(readyPrefix) { return g }
            if line.isEmpty {
                stop(g)
                throw HypervisorError.protocolViolation("\(program) did not come up")
            }
        }
    }

    /// `xl destroy`: the domain (and its process), then its store entries.
    func stop(_ g: Guest) {
        try? dom0.hypervisor.destroyDomain(g.domid)
        var st: Int32 = 0
        waitpid(g.pid, &st, 0)
        close(g.out)
        try? dom0.xenstore.rm("/local/domain/0/backend/vbd/\(g.domid)")
        try? dom0.xenstore.rm("/local/domain/\(g.domid)")
    }

    /// Waits (bounded) until blkback serves `n` devices, by its statistics file.
    func awaitDevices(_ n: Int, seconds: Double = 20) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            var connected = 0
            for d in (try? dom0.xenstore.directory("/local/domain/0/backend/vbd")) ?? [] {
                for id in (try? dom0.xenstore.directory("/local/domain/0/backend/vbd/\(d)")) ?? [] {
                    if (try? dom0.xenstore.read("/local/domain/0/backend/vbd/\(d)/\(id)/state")) == "4" { connected += 1 }
                }
            }
            if connected == n { return true }
            usleep(20_000)  // polling a condition with a deadline
        }
        return false
    }

    /// Runs `loads` in a pvguest-load guest on `image`, one after the other.
    /// `during` is called once the guest is up with the guest, before its results are read.
    /// The load guest's blkfront: ring order and segments per request (with
    /// 256 a 1 MiB I/O is one ring request, as fio's is one io_submit).
    var ringPageOrder = 0
    var indirectSegments = 256

    /// Guest memory for pvguest-load: its slots' data and indirect pages
    /// (one ring's slots, each with its segments and an indirect page) within half of it.
    private var loadGuestPages: UInt32 {
        let slots = Int(BlkifRing.entries(pages: 1 << ringPageOrder))
        return UInt32(max(16384, 2 * (slots * (indirectSegments + 1) + 4096)))
    }

    func load(_ loads: [String], image: String, during: ((Guest) -> Void)? = nil) throws -> [Measured] {
        let g = try start("pvguest-load", image: image,
                          arguments: ["--ring-page-order", "\(ringPageOrder)", "--indirect-segments", "\(indirectSegments)",
                                      "--stay"] + loads.flatMap { ["--load", $0] },
                          readyPrefix: "pvguest-load ready", pages: loadGuestPages)
        defer { stop(g) }
        let cpu0 = processCPU(g.pid) + processCPU(blkback)
        let t0 = now()
        during?(g)
        var results: [Measured] = []
        while results.count < loads.count {
            let line = ProcessLauncher.readLine(g.out)
            guard !line.isEmpty else { throw HypervisorError.protocolViolation("pvguest-load stopped: see its stderr") }
            guard line.hasPrefix("load ") else { continue }
            let f = line.split(separator: " ").map(String.init)
            func value(_ k: String) -> Double { f.firstIndex(of: k).flatMap { Double(f[$0 + 1]) } ?? 0 }
            results.append(Measured(iops: value("iops"), mbps: value("mbps"), p50: value("p50_us") * 1000,
                                    p99: value("p99_us") * 1000))
        }
        // CPU of the guest and blkback over the whole run (only meaningful for one load).
        let secs = Double(now() - t0) / 1e9
        if results.count == 1 { results[0].cpu = (processCPU(g.pid) + processCPU(blkback) - cpu0) / secs * 100 }
        lastPath = pathReport(image: image, domid: g.domid)
        return results
    }

    /// How blkback served the last load: its descriptors on the image (O_DIRECT
    /// or not) and its counters for the device (segments through persistent
    /// grants are zero copy; bounced ones went through a grant copy).
    private(set) var lastPath = ""

    private func pathReport(image: String, domid: XenHV.DomID) -> String {
        var flags: [String] = []
        for fd in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(blkback)/fd")) ?? [] {
            guard (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(blkback)/fd/\(fd)")) == image,
                  let info = try? String(contentsOfFile: "/proc/\(blkback)/fdinfo/\(fd)", encoding: .utf8),
                  let line = info.split(separator: "\n").first(where: { $0.hasPrefix("flags:") }),
                  let v = Int(line.split(whereSeparator: { $0 == " " || $0 == "\t" }).last ?? "", radix: 8) else { continue }
            flags.append(v & 0o40000 != 0 ? "O_DIRECT" : "buffered")
        }
        // The statistics file is rewritten every second; give it one refresh.
        usleep(1_100_000)
        var c: [String: String] = [:]
        let stats = (try? String(contentsOfFile: dom0.dir + "/stats/blkback.stats", encoding: .utf8)) ?? ""
        for line in stats.split(separator: "\n") {
            let f = line.split(separator: " ")
            if f.count == 5, f[1] == "\(domid)" { c[String(f[3])] = String(f[4]) }
        }
        let segs = "segments: bounced \(c["bounced_segments"] ?? "?"), requests that waited for bounce pages (oo_req) \(c["oo_req"] ?? "?")"
        return "blkback: image fds \(flags.joined(separator: "+")); rd_req \(c["rd_req"] ?? "?") wr_req \(c["wr_req"] ?? "?"); \(segs); persistent grants \(c["persistent_grants"] ?? "?")"
    }
}

/// User + system CPU seconds of a process so far (/proc/PID/stat).
func processCPU(_ pid: pid_t) -> Double {
    guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
          let close = text.lastIndex(of: ")") else { return 0 }
    let f = text[text.index(after: close)...].split(separator: " ")
    // After the command: state is field 3, utime 14, stime 15 (1-based over the whole line).
    guard f.count > 13, let u = Double(f[11]), let s = Double(f[12]) else { return 0 }
    return (u + s) / Double(sysconf(Int32(_SC_CLK_TCK)))
}
