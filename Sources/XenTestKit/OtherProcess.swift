import Foundation
import Glibc

/// Another process seen from a test: its open descriptors and CPU time from
/// /proc, and its soft RLIMIT_NOFILE moved with prlimit(1), which is how
/// tests make a daemon's failures to get a descriptor real.
public enum OtherProcess {
    /// `pid`'s open descriptor numbers.
    public static func descriptors(_ pid: pid_t) -> Set<Int> {
        Set(((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []).compactMap { Int($0) })
    }

    /// `pid`'s soft RLIMIT_NOFILE, as prlimit takes it ("soft:"). Only the
    /// soft limit moves: raising a hard one back needs CAP_SYS_RESOURCE.
    public static func openFileLimit(_ pid: pid_t) -> String {
        let limits = (try? String(contentsOfFile: "/proc/\(pid)/limits", encoding: .utf8)) ?? ""
        guard let line = limits.split(separator: "\n").first(where: { $0.hasPrefix("Max open files") }) else { return "1024:" }
        return "\(line.split(separator: " ")[3]):"
    }

    /// Lets `pid` open exactly `count` more descriptors (the lowest free
    /// numbers are handed out first), none with 0, until
    /// ``setOpenFileLimit(_:to:)``: the limit is the next free number after them.
    public static func allowDescriptors(_ count: Int, in pid: pid_t) -> Bool {
        let open = descriptors(pid)
        var free: [Int] = []
        var n = 0
        while free.count <= count {
            if !open.contains(n) { free.append(n) }
            n += 1
        }
        return setOpenFileLimit(pid, to: "\(free[count]):")
    }

    @discardableResult
    public static func setOpenFileLimit(_ pid: pid_t, to limit: String) -> Bool {
        CommandResult.run("prlimit", ["--pid", "\(pid)", "--nofile=\(limit)"]).ok
    }

    /// `pid`'s user + system CPU time in seconds (/proc/PID/stat fields 14
    /// and 15, in clock ticks: 10 ms steps).
    public static func cpuSeconds(_ pid: pid_t) -> Double {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return 0 }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        // After the ")": state is field 3, so utime (14) and stime (15) are at 11 and 12.
        let ticks = fields.count > 12 ? (Int(fields[11]) ?? 0) + (Int(fields[12]) ?? 0) : 0
        return Double(ticks) / clockTicksPerSecond
    }
}
