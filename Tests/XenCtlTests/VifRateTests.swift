import Testing
import XenCtl

/// A vif's `rate` as libxlu_vif.c's xlu_vif_parse_rate reads it: never a trap,
/// one error line for what xl refuses, xl's interval units.
@Suite struct VifRateTests {
    func rate(_ r: String) throws(SpecError) -> VifSpec.Rate? { try VifSpec(parsing: "rate=\(r)").rate }

    /// Refused as xl refuses them, each with xl's reason in one line (the
    /// arithmetic used to trap on the first three).
    @Test(arguments: [
        ("400000GB/s", "rate overflow"),               // 4e14 B/s × 50000 µs > 2^64
        ("20000000000GB/s", "rate overflow"),          // mantissa > UINT32_MAX
        ("5000000000B/s", "rate overflow"),            // mantissa > UINT32_MAX, unscaled
        ("99999999999999999999999MB/s", "rate overflow"),  // past UInt64 (ERANGE)
        ("4294967295GB/s@1s", "rate overflow"),        // 4.3e18 B/s × 1e6 µs
        ("4294967295GB/s@5us", "rate overflow"),       // 4.3e18 B/s × 5 µs > 2^64
        ("1Mb/s@20000000000000s", "replenishment interval overflow"),
        ("1Mb/s@5000s", "replenishment interval overflow"),  // 5e9 µs > UINT32_MAX after scaling
        ("1Mb/s@4294967296us", "replenishment interval overflow"),
        ("1Mb/s@0ms", "replenishment interval"),
        ("10Mb/s@", "invalid replenishment interval"),
        ("10Mb/s@ms", "invalid replenishment interval"),
        ("10Mb/s@20 ms", "invalid replenishment interval"),
        ("10Mb/s@20h", "invalid replenishment interval"),
        ("@20ms", "no rate specified"),
        ("", "no rate specified"),                     // used to index an empty split: a trap
        ("@", "no rate specified"),
        ("0MB/s", "rate"),
        ("10kB/s", "is not like"),                     // xl's units: K, M, G (no k)
        ("10MB", "is not like"),
        ("1b/s", "0 bytes"),                           // rounds to nothing per interval
    ])
    func refusedInOneLine(r: String, fragment: String) {
        do {
            let v = try rate(r)
            Issue.record("accepted rate=\(r): \(String(describing: v))")
        } catch {
            #expect(error.message.contains(fragment), "\(r): \(error)")
            #expect(!error.message.contains("\n"))
        }
    }

    /// xl's interval regex ^[0-9]+[mu]?s?$: a bare number or `s` is seconds,
    /// `m`/`ms` milliseconds, `u`/`us` microseconds.
    /// `xl network-attach DOMAIN mac=.. bridge=..`: each argument is one
    /// setting, whole (a comma in it is the value's, as parse_nic_config
    /// reads it).
    @Test func oneSettingPerArgument() throws {
        let v = try VifSpec(settings: ["mac=00:16:3e:01:02:03", "bridge=br0", "script=/etc/xen/a,b"])
        #expect(v.mac == (try MACAddress(parsing: "00:16:3e:01:02:03")) && v.bridge == "br0" && v.script == "/etc/xen/a,b")
        let error = #expect(throws: SpecError.self) { try VifSpec(settings: ["bridge=br0,mac=00:16:3e:01:02:03", "ip=10.0.0.2"]) }
        #expect(error?.message.contains("'br0,mac=00:16:3e:01:02:03' is not a valid bridge name") == true, "\(String(describing: error))")
    }

    @Test func intervalUnitsAsXl() throws {
        #expect(try rate("10MB/s@20") == .init(bytesPerInterval: 200_000_000, intervalMicroseconds: 20_000_000))
        #expect(try rate("10MB/s@20s") == .init(bytesPerInterval: 200_000_000, intervalMicroseconds: 20_000_000))
        #expect(try rate("10MB/s@20m") == .init(bytesPerInterval: 200_000, intervalMicroseconds: 20_000))
        #expect(try rate("10MB/s@20ms") == .init(bytesPerInterval: 200_000, intervalMicroseconds: 20_000))
        #expect(try rate("10MB/s@20u") == .init(bytesPerInterval: 200, intervalMicroseconds: 20))
        #expect(try rate("10MB/s@20us") == .init(bytesPerInterval: 200, intervalMicroseconds: 20))
        #expect(try rate("10MB/s@4294s") == .init(bytesPerInterval: 42_940_000_000, intervalMicroseconds: 4_294_000_000))
        #expect(try rate("10KB/s") == .init(bytesPerInterval: 500, intervalMicroseconds: 50_000))
        #expect(try rate("8Kb/s") == .init(bytesPerInterval: 50, intervalMicroseconds: 50_000))
        #expect(try rate("1GB/s") == .init(bytesPerInterval: 50_000_000, intervalMicroseconds: 50_000))
        // The largest mantissa xl takes, at the largest interval that does not overflow.
        #expect(try rate("4294967295GB/s@4us") == .init(bytesPerInterval: 17_179_869_180_000, intervalMicroseconds: 4))
        // strtoull(..., 0), as xl: a leading 0 is octal.
        #expect(try rate("010MB/s") == .init(bytesPerInterval: 400_000, intervalMicroseconds: 50_000))
    }

    /// A config with a rate that used to trap names the file and line.
    @Test func configErrorNamesTheLine() {
        do {
            _ = try DomainConfig(try XLConfig(parsing: "name = 'x'\n\nvif = [ 'bridge=xenbr0, rate=400000GB/s' ]\n", file: "r.cfg"))
            Issue.record("accepted")
        } catch {
            #expect(error.description == "r.cfg:3: vif 'bridge=xenbr0, rate=400000GB/s': rate overflow in '400000GB/s'", "\(error)")
        }
    }
}
