import XenHV
/// One NIC in xl's network specification syntax (xl-network-configuration(5)):
/// `mac=00:16:3e:01:02:03, bridge=xenbr0, rate=100Mb/s`.
public struct VifSpec: Sendable, Equatable {
    public var mac: MACAddress?
    public var bridge = "xenbr0"
    public var script: String?
    public var vifname: String?
    public var ip: String?
    public var mtu: UInt32?
    public var model: String?
    /// `rate`: bytes allowed per interval, as libxl writes it for netback.
    public var rate: Rate?

    public struct Rate: Sendable, Equatable {
        public var bytesPerInterval: UInt64
        public var intervalMicroseconds: UInt32
        public init(bytesPerInterval: UInt64, intervalMicroseconds: UInt32) {
            self.bytesPerInterval = bytesPerInterval
            self.intervalMicroseconds = intervalMicroseconds
        }
        /// The xenstore `rate` key: "bytes,usecs".
        public var xenstoreValue: String { "\(bytesPerInterval),\(intervalMicroseconds)" }
    }

    public init(parsing spec: String) throws(SpecError) {
        try self.init(settings: spec.split(separator: ",", omittingEmptySubsequences: true).map(String.init))
    }

    /// One setting per string, as `xl network-attach DOMAIN mac=.. bridge=..`
    /// takes its arguments (parse_nic_config on each, whole: a comma is
    /// part of the value).
    public init(settings: [String]) throws(SpecError) {
        for raw in settings {
            let item = raw.trimmingSpaces
            if item.isEmpty { continue }
            guard let eq = item.firstIndex(of: "=") else { throw SpecError("'\(item)' is not key=value") }
            let key = String(item[..<eq]).trimmingSpaces, value = String(item[item.index(after: eq)...]).trimmingSpaces
            switch key {
            case "mac": mac = try MACAddress(parsing: value)
            case "bridge":
                guard Self.isValidInterfaceName(value) else { throw SpecError("'\(value)' is not a valid bridge name (1-15 characters, no '/', ':', '%' or spaces)") }
                bridge = value
            case "script": script = value
            case "vifname":
                guard Self.isValidInterfaceName(value) else { throw SpecError("'\(value)' is not a valid interface name") }
                vifname = value
            case "ip": ip = value
            case "model": model = value
            case "type": guard value == "vif" || value == "ioemu" else { throw SpecError("type must be vif or ioemu, not '\(value)'") }
            case "backend": guard value == "0" || value == "Domain-0" else { throw SpecError("only dom0 backends exist here, not '\(value)'") }
            case "mtu":
                guard let m = UInt32(value), (68...65535).contains(m) else { throw SpecError("mtu must be 68..65535, not '\(value)'") }
                mtu = m
            case "rate": rate = try Self.rate(value)
            default: throw SpecError("unknown vif keyword '\(key)'")
            }
        }
    }

    public static func isValidInterfaceName(_ n: String) -> Bool { InterfaceName.isValid(n) }

    /// xl's rate syntax, as libxlu_vif.c's xlu_vif_parse_rate reads it:
    /// `NUMBER[K|M|G](B|b)/s`, then optionally `@INTERVAL`: a number followed
    /// by `s` or nothing (seconds), `m`/`ms` or `u`/`us`; 50 ms by default.
    /// Numbers are read as strtoull(..., 0) reads them (a leading 0 is octal)
    /// and bounded as xl bounds them, before any arithmetic: a mantissa or an
    /// interval above 2^32-1, an interval past 2^32-1 µs once scaled, or bytes
    /// per second times the interval past 2^64 is refused as an overflow.
    static func rate(_ v: String) throws(SpecError) -> Rate {
        let bad = SpecError("rate '\(v)' is not like 100Mb/s or 10MB/s@20ms (B or b, with K, M or G before it)")
        let overflow = SpecError("rate overflow in '\(v)'")
        let at = v.firstIndex(of: "@")
        let r = at.map { v[..<$0] } ?? v[...]
        guard !r.isEmpty else { throw SpecError("no rate specified in '\(v)'") }
        // ^[0-9]+[GMK]?[Bb]/s$
        let digits = r.prefix { ("0"..."9").contains($0) }
        guard !digits.isEmpty, r.hasSuffix("/s") else { throw bad }
        var unit = r.dropFirst(digits.count).dropLast(2)
        var scale: UInt64 = 1
        switch unit.first {
        case "G": scale = 1_000_000_000
        case "M": scale = 1_000_000
        case "K": scale = 1_000
        default: break
        }
        if scale != 1 { unit = unit.dropFirst() }
        guard unit == "B" || unit == "b" else { throw bad }
        guard let (n, over) = CNumber.unsigned(digits) else { throw bad }  // e.g. 09: not octal
        guard !over, n <= UInt64(UInt32.max) else { throw overflow }
        guard n > 0 else { throw SpecError("rate must be above 0 in '\(v)'") }
        // n < 2^32 and scale <= 10^9: no overflow.
        let bytesPerSecond = unit == "b" ? n * scale / 8 : n * scale

        var interval: UInt64 = 50_000
        if let at {
            let s = v[v.index(after: at)...]
            let badInterval = SpecError("invalid replenishment interval '\(s)' in '\(v)' (like 20ms, 100us or 1s)")
            // ^[0-9]+[mu]?s?$
            let idigits = s.prefix { ("0"..."9").contains($0) }
            let suffix = s.dropFirst(idigits.count)
            guard !idigits.isEmpty, ["", "s", "m", "ms", "u", "us"].contains(suffix),
                  let (i, iover) = CNumber.unsigned(idigits) else { throw badInterval }
            let intervalOverflow = SpecError("replenishment interval overflow in '\(v)' (at most 4294967295 us)")
            guard !iover, i <= UInt64(UInt32.max) else { throw intervalOverflow }
            guard i > 0 else { throw SpecError("replenishment interval must be above 0 in '\(v)'") }
            // i < 2^32, the unit <= 10^6: no overflow.
            interval = i * (suffix.first == "m" ? 1_000 : suffix.first == "u" ? 1 : 1_000_000)
            guard interval <= UInt64(UInt32.max) else { throw intervalOverflow }
        }
        guard bytesPerSecond <= UInt64.max / interval else { throw overflow }
        let perInterval = bytesPerSecond * interval / 1_000_000
        guard perInterval > 0 else { throw SpecError("rate '\(v)' is 0 bytes per \(interval) us interval") }
        return Rate(bytesPerInterval: perInterval, intervalMicroseconds: UInt32(interval))
    }
}

/// An Ethernet address.
public struct MACAddress: Sendable, Equatable, Hashable, CustomStringConvertible {
    public let bytes: [UInt8]

    public init(parsing s: String) throws(SpecError) {
        let parts = s.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 6 else { throw SpecError("'\(s)' is not a MAC address like 00:16:3e:01:02:03") }
        var b: [UInt8] = []
        for p in parts {
            guard p.count == 2, p.allSatisfy(\.isHexDigit), let v = UInt8(p, radix: 16) else { throw SpecError("'\(s)' is not a MAC address like 00:16:3e:01:02:03") }
            b.append(v)
        }
        guard b[0] & 1 == 0 else { throw SpecError("'\(s)' is a multicast address; a NIC needs a unicast one") }
        bytes = b
    }

    public init(bytes: [UInt8]) { self.bytes = bytes }

    /// A random address in Xen's OUI, 00:16:3e, as xl picks one.
    public static func randomXen() -> MACAddress {
        MACAddress(bytes: [0x00, 0x16, 0x3E, UInt8.random(in: 0...0x7F), UInt8.random(in: 0...255), UInt8.random(in: 0...255)])
    }

    public var description: String {
        let d = Array("0123456789abcdef")
        return bytes.map { String([d[Int($0 >> 4)], d[Int($0 & 15)]]) }.joined(separator: ":")
    }
}
