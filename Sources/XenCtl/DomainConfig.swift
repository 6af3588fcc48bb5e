import Foundation
import XenHV

/// A domain as an xl.cfg file describes it: the keys this toolstack acts on,
/// checked with errors that name the file and line.
public struct DomainConfig: Sendable, Equatable {
    /// xl.cfg(5)'s actions on a domain's shutdown (libxl_action_on_shutdown).
    public enum Action: String, Sendable, CaseIterable {
        case destroy, restart, preserve
        case renameRestart = "rename-restart"
        case coredumpDestroy = "coredump-destroy"
        case coredumpRestart = "coredump-restart"
        case softReset = "soft-reset"

        /// The values this toolstack carries out (all of xl's but soft-reset).
        public static let supported: [Action] = [.destroy, .restart, .renameRestart, .preserve, .coredumpDestroy, .coredumpRestart]
    }

    public var name: String
    /// MiB.
    public var memory: UInt32 = 128
    public var vcpus: UInt32 = 1
    /// xl.cfg(5)'s `max_event_channels`: the highest port the guest may use
    /// (libxl's default 1023; the 2-level ABI names at most 4095).
    public var maxEventChannels: UInt32 = 1023
    /// xl.cfg(5)'s `cpus`: the host CPUs the guest may run on (its hard
    /// affinity); nil: any.
    public var cpus: CPUSet?
    public var disks: [DiskSpec] = []
    public var vifs: [VifSpec] = []
    /// xl.cfg(5)'s defaults: on_poweroff destroy, on_reboot restart,
    /// on_watchdog destroy, on_crash destroy.
    public var onCrash: Action = .destroy
    public var onPoweroff: Action = .destroy
    public var onReboot: Action = .restart
    public var onWatchdog: Action = .destroy

    /// The action for a domain that shut down for `reason` (xl's
    /// handle_domain_death); nil for suspend, which is no death.
    public func action(for reason: ShutdownReason) -> Action? {
        switch reason {
        case .poweroff: onPoweroff
        case .reboot: onReboot
        case .crash: onCrash
        case .watchdog: onWatchdog
        case .suspend: nil
        // on_soft_reset is not supported: a guest asking for it is destroyed, as xl does for unknown reasons.
        case .softReset: .destroy
        }
    }

    /// `online`: the CPUs `cpus` is checked against (the host's online CPUs).
    /// `workingDirectory`: what relative disk targets are relative to (nil:
    /// this process's current directory); they are made absolute here, as
    /// blkback, which opens them, runs in a directory of its own.
    public init(_ cfg: XLConfig, online: CPUSet? = DomainConfig.onlineCPUs(), workingDirectory: String? = nil) throws(ConfigError) {
        func fail(_ key: String, _ m: String) -> ConfigError {
            ConfigError(file: cfg.file, line: cfg.line(of: key) ?? 0, message: m)
        }
        guard let n = cfg["name"]?.string, !n.isEmpty else {
            throw ConfigError(file: cfg.file, line: cfg.line(of: "name") ?? 1, message: "the domain needs a name (name = \"...\")")
        }
        // It names files of the run directory and lines of `xenctl list`.
        guard n.utf8.count <= 64, !n.contains(where: { $0 == "/" || $0.isWhitespace }),
              !n.unicodeScalars.contains(where: { $0.properties.generalCategory == .control }) else {
            throw fail("name", "name '\(n)' must be 1-64 characters without '/', spaces or control characters")
        }
        // xl's verbs, and ours, would read such a name as an option.
        guard !n.hasPrefix("-") else { throw fail("name", "name '\(n)' must not start with '-'") }
        name = n
        /// xlu_cfg_get_bounded_long: any atom, quoted or not, read whole with
        /// strtol(..., 0) (`0x200`, `"512"`); a `+=` setting is refused.
        func number(_ key: String, in range: ClosedRange<Int64>, _ message: String) throws(ConfigError) -> UInt32? {
            guard let v = cfg[key] else { return nil }
            guard !cfg.isAppended(key) else { throw fail(key, "\(key): can't use += with numbers") }
            guard let s = v.string, let n = CNumber.signed(s[...]), range.contains(n) else { throw fail(key, message) }
            return UInt32(n)
        }
        if let v = try number("memory", in: 1...65536, "memory must be a number of MiB between 1 and 65536") { memory = v }
        if let v = try number("vcpus", in: 1...128, "vcpus must be 1..128") { vcpus = v }
        if let v = try number("max_event_channels", in: 1...4095, "max_event_channels must be 1..4095 (2-level event channels)") {
            maxEventChannels = v
        }
        if let v = cfg["cpus"] {
            guard let text = v.string else {
                throw fail("cpus", "cpus as a list of per-vCPU CPULISTs is not supported (a guest is one process): give one CPULIST, e.g. cpus = \"0-3,^1\"")
            }
            let set: CPUSet
            do { set = try Self.cpuList(text) } catch { throw fail("cpus", "cpus = '\(text)': \(error.message)") }
            // Xen takes a hard affinity that names at least one online CPU (vcpu_set_hard_affinity).
            if let online, CPUSet(set.cpus.filter(online.contains)).isEmpty {
                throw fail("cpus", "cpus = '\(text)': none of these CPUs is online (online: \(online))")
            }
            cpus = set
        }
        for (key, dst) in [("on_poweroff", \DomainConfig.onPoweroff), ("on_reboot", \.onReboot),
                           ("on_watchdog", \.onWatchdog), ("on_crash", \.onCrash)] {
            guard let v = cfg[key] else { continue }
            let shown = v.string.map { "'\($0)'" } ?? "a list"
            guard let s = v.string, let a = Action(rawValue: s) else {
                throw fail(key, "\(key) = \(shown): must be one of \(Action.supported.map(\.rawValue).joined(separator: ", "))")
            }
            guard a != .softReset else {
                throw fail(key, "\(key) = 'soft-reset' is not supported (a guest process cannot be reset in place); use restart")
            }
            self[keyPath: dst] = a
        }
        if let d = cfg["disk"] {
            guard case .list(let items) = d else { throw fail("disk", "disk must be a list: disk = [ '...' ]") }
            let directory = workingDirectory ?? DiskSpec.currentDirectory()
            for item in items {
                guard let s = item.string else { throw fail("disk", "each disk must be a string") }
                var disk: DiskSpec
                do { disk = try DiskSpec(parsing: s) } catch { throw fail("disk", "disk '\(s)': \(error.message)") }
                if !disk.target.hasPrefix("/") {
                    guard let directory else {
                        throw fail("disk", "disk '\(s)': the target is relative and this process has no current directory to resolve it against")
                    }
                    disk = disk.resolvingTarget(against: directory)
                }
                disks.append(disk)
            }
            var seen = Set<UInt32>()
            for disk in disks where !seen.insert(disk.devid).inserted {
                throw fail("disk", "duplicate vdev '\(disk.vdev)'")
            }
        }
        if let v = cfg["vif"] {
            guard case .list(let items) = v else { throw fail("vif", "vif must be a list: vif = [ '...' ]") }
            for item in items {
                guard let s = item.string else { throw fail("vif", "each vif must be a string") }
                do { vifs.append(try VifSpec(parsing: s)) } catch { throw fail("vif", "vif '\(s)': \(error.message)") }
            }
        }
    }
}

/// What is wrong with a CPULIST (xl.cfg's `cpus`).
public struct CPUListError: Error, Equatable, CustomStringConvertible, Sendable {
    public let message: String
    public init(message: String) { self.message = message.escapingControlCharacters }
    public var description: String { message }
}

extension DomainConfig {
    /// A CPULIST as xl's parse_cpurange reads it: comma-separated `N`, `N-M`
    /// or `all`, each taken away instead of added after a `^`, applied left
    /// to right to an empty set ("0-3,^1" is 0, 2 and 3). NUMA node ranges
    /// (`nodes:`) are refused: this toolstack knows no nodes.
    public static func cpuList(_ text: String) throws(CPUListError) -> CPUSet {
        func bad(_ m: String) -> CPUListError { CPUListError(message: m) }
        var set = CPUSet()
        for item in text.split(separator: ",", omittingEmptySubsequences: false) {
            var token = Substring(item.trimmingCharacters(in: .whitespaces))
            let remove = token.hasPrefix("^")
            if remove { token = token.dropFirst() }
            if token.hasPrefix("node:") || token.hasPrefix("nodes:") {
                throw bad("NUMA node ranges ('\(token)') are not supported")
            }
            if token == "all" {
                guard !remove else { throw bad("'^all' takes every CPU away") }
                for c in 0..<CPUSet.capacity { set.insert(c) }
                continue
            }
            let ends = token.split(separator: "-", omittingEmptySubsequences: false)
            guard (1...2).contains(ends.count), let a = Int(ends[0]), let b = ends.count == 2 ? Int(ends[1]) : a,
                  a >= 0, a <= b else {
                throw bad("'\(item)' is not a CPU, a range N-M or 'all'")
            }
            guard b < CPUSet.capacity else { throw bad("CPU \(b) is past the \(CPUSet.capacity) CPUs an affinity can name") }
            for c in a...b { if remove { set.remove(c) } else { set.insert(c) } }
        }
        guard !set.isEmpty else { throw bad("no CPU is left") }
        return set
    }

    /// The host's online CPUs (/sys/devices/system/cpu/online, a cpulist).
    public static func onlineCPUs() -> CPUSet? {
        guard let text = try? String(contentsOfFile: "/sys/devices/system/cpu/online", encoding: .utf8) else { return nil }
        return try? cpuList(text.trimmingCharacters(in: .whitespacesAndNewlines))
    }
}
