import Testing
import XenCtl

/// The toolstack's parsers on random input built from their own syntax:
/// every string is accepted or refused in one line, none traps.
@Suite struct ParserRobustnessTests {
    /// xorshift64*: the same strings on every run.
    struct Generator {
        var state: UInt64
        mutating func next() -> UInt64 {
            state ^= state >> 12
            state ^= state << 25
            state ^= state >> 27
            return state &* 2_685_821_657_736_338_717
        }
        mutating func string(_ pieces: [String], count: Int) -> String {
            (0..<Int(next() % UInt64(count))).map { _ in pieces[Int(next() % UInt64(pieces.count))] }.joined()
        }
    }

    @Test func randomSpecsNeverTrap() {
        var g = Generator(state: 0x5EED_0F_D15C)
        let disk = ["/img", "x.img", ",", ",", "raw", "qcow2", "xvda", "xvd", "aaa", "d", "p", "0x", "1", "9", "255", "1048576",
                    "phy:", "file:", "tap:", "aio:", "raw:", "nbd:", "foo:", ":", "cdrom", ":cdrom", "=", "vdev=", "target=",
                    "format=", "access=", "ro", "rw", "devtype=", "backendtype=", "discard", "no-discard", "direct-io-safe", " ", "hd", "sd"]
        let rate = ["rate=", "0", "1", "9", "4294967295", "99999999999", "K", "M", "G", "k", "B", "b", "/s", "@", "ms", "us", "m", "u", "s", ","]
        var lines = 0
        for _ in 0..<20_000 {
            for result in [Result { () throws(SpecError) in _ = try DiskSpec(parsing: g.string(disk, count: 9)) },
                           Result { () throws(SpecError) in _ = try VifSpec(parsing: g.string(rate, count: 8)) },
                           Result { () throws(SpecError) in _ = try DiskSpec.devid(of: g.string(disk, count: 4)) }] {
                if case .failure(let e) = result, e.message.contains("\n") { lines += 1 }
            }
        }
        #expect(lines == 0)
    }

    @Test func randomConfigsNeverTrap() {
        var g = Generator(state: 0xC0F_F1E)
        let cfg = ["name", "memory", "vcpus", "extra", "disk", " ", "=", "+=", "'", "\"", "\\", "\\'", "\\x4", "\\1", "\\n", "[", "]", ",",
                   "0x", "0", "512", "08", "a", "#", "\n", ";", "'xvda'"]
        for _ in 0..<20_000 {
            let text = g.string(cfg, count: 16)
            if let c = try? XLConfig(parsing: text, file: "r.cfg") {
                _ = try? DomainConfig(c, online: nil, workingDirectory: "/")
            }
        }
    }
}
