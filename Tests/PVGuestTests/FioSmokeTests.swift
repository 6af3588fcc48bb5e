import Foundation
import Glibc
import Testing

/// A smoke benchmark, not a check: fio's nbd engine (libnbd) against pvguest's
/// export, through blkfront, the blkif ring and blkback to an image file.
/// Opt in with PVGUEST_FIO=1 (CI leaves it off); prints IOPS per job.
@Suite struct FioSmokeTests {
    static var enabled: Bool { ProcessInfo.processInfo.environment["PVGUEST_FIO"] == "1" }

    @Test(.enabled(if: FioSmokeTests.enabled), .timeLimit(.minutes(2)))
    func fioThroughPVGuest() throws {
        var template = Array("/tmp/pvfio-XXXXXX".utf8CString)
        let dir = String(cString: mkdtemp(&template)!)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let img = DiskPathTests.image(dir, "xvda.img", size: 256 << 20)
        let rig = try DiskPathTests.Rig(disks: [("xvda", 51712, img, "w")])
        guard let uri = rig.disks["xvda"] else {
            Issue.record("pvguest exported \(rig.disks)")
            return
        }
        for (name, rw, bs, depth) in [("randwrite-4k-qd32", "randwrite", "4k", 32), ("randread-4k-qd32", "randread", "4k", 32),
                                      ("randread-4k-qd1", "randread", "4k", 1), ("seqread-1m-qd8", "read", "1m", 8)] {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/fio")
            p.arguments = ["--name=\(name)", "--ioengine=nbd", "--uri=\(uri)", "--rw=\(rw)", "--bs=\(bs)",
                           "--iodepth=\(depth)", "--size=256m", "--time_based", "--runtime=3", "--output-format=terse",
                           "--terse-version=3"]
            let pipe = Pipe()
            p.standardOutput = pipe
            p.standardError = pipe
            try p.run()
            let out = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            p.waitUntilExit()
            #expect(p.terminationStatus == 0, "\(out)")
            // terse v3: field 8 is read IOPS, 49 write IOPS (1-based: name is 3).
            let f = out.split(separator: "\n").last { $0.hasPrefix("3;") }?.split(separator: ";", omittingEmptySubsequences: false) ?? []
            if f.count > 49 {
                print("fio \(name): read \(f[7]) IOPS, write \(f[48]) IOPS, read \(f[6]) KiB/s, write \(f[47]) KiB/s")
            } else {
                print("fio \(name): \(out)")
            }
        }
    }
}
