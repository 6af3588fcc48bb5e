import NetBack

/// Builds and parses the Ethernet/IPv4 frames the test guest sends and
/// expects: ICMP echo, UDP and TCP, with correct checksums.
public enum Frames {
    public static func ipv4(_ s: String) -> [UInt8] { s.split(separator: ".").map { UInt8($0)! } }

    static func be16(_ v: UInt16) -> [UInt8] { [UInt8(v >> 8), UInt8(v & 0xFF)] }
    static func be32(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }

    static func checksum(_ b: [UInt8], initial: UInt32 = 0) -> UInt16 {
        b.withUnsafeBytes { PacketParser.internetChecksum($0, initial: initial) }
    }

    public static func ethernet(dst: [UInt8], src: [UInt8], type: UInt16, _ payload: [UInt8]) -> [UInt8] {
        dst + src + be16(type) + payload
    }

    public static func ipv4Packet(src: [UInt8], dst: [UInt8], proto: UInt8, id: UInt16 = 1, _ payload: [UInt8]) -> [UInt8] {
        var h: [UInt8] = [0x45, 0] + be16(UInt16(20 + payload.count)) + be16(id) + [0x40, 0, 64, proto, 0, 0] + src + dst
        let c = checksum(h)
        h[10] = UInt8(c >> 8); h[11] = UInt8(c & 0xFF)
        return h + payload
    }

    static func pseudoSum(src: [UInt8], dst: [UInt8], proto: UInt8, length: Int) -> UInt32 {
        var s: UInt32 = 0
        for i in stride(from: 0, to: 4, by: 2) {
            s += UInt32(src[i]) << 8 | UInt32(src[i + 1])
            s += UInt32(dst[i]) << 8 | UInt32(dst[i + 1])
        }
        return s + UInt32(proto) + UInt32(length)
    }

    /// Folded pseudo-header sum as a partial checksum (what a guest puts in
    /// the checksum field when it sets csum_blank).
    public static func partialChecksum(src: [UInt8], dst: [UInt8], proto: UInt8, length: Int) -> UInt16 {
        var s = pseudoSum(src: src, dst: dst, proto: proto, length: length)
        while s >> 16 != 0 { s = (s & 0xFFFF) + (s >> 16) }
        return UInt16(s)
    }

    /// Ethernet + IPv4 + UDP. With `checksumBlank` the UDP checksum holds only
    /// the pseudo-header sum (for NETTXF_csum_blank).
    public static func udp(srcMAC: [UInt8], dstMAC: [UInt8], src: [UInt8], dst: [UInt8], sport: UInt16, dport: UInt16,
                           payload: [UInt8], checksumBlank: Bool = false) -> [UInt8] {
        var u = be16(sport) + be16(dport) + be16(UInt16(8 + payload.count)) + [0, 0] + payload
        let c: UInt16 = checksumBlank
            ? partialChecksum(src: src, dst: dst, proto: 17, length: u.count)
            : checksum(u, initial: pseudoSum(src: src, dst: dst, proto: 17, length: u.count))
        u[6] = UInt8(c >> 8); u[7] = UInt8(c & 0xFF)
        return ethernet(dst: dstMAC, src: srcMAC, type: 0x0800, ipv4Packet(src: src, dst: dst, proto: 17, u))
    }

    public static func icmpEcho(srcMAC: [UInt8], dstMAC: [UInt8], src: [UInt8], dst: [UInt8], reply: Bool,
                                id: UInt16, seq: UInt16, payload: [UInt8]) -> [UInt8] {
        var m: [UInt8] = [reply ? 0 : 8, 0, 0, 0] + be16(id) + be16(seq) + payload
        let c = checksum(m)
        m[2] = UInt8(c >> 8); m[3] = UInt8(c & 0xFF)
        return ethernet(dst: dstMAC, src: srcMAC, type: 0x0800, ipv4Packet(src: src, dst: dst, proto: 1, m))
    }

    /// Ethernet + IPv4 + TCP (20-byte header + options). With `checksumBlank`
    /// the checksum holds only the pseudo-header sum.
    public static func tcp(srcMAC: [UInt8], dstMAC: [UInt8], src: [UInt8], dst: [UInt8], sport: UInt16, dport: UInt16,
                           seq: UInt32, ack: UInt32, flags: UInt8, window: UInt16 = 65535, options: [UInt8] = [],
                           payload: [UInt8], checksumBlank: Bool = false, ipID: UInt16 = 1) -> [UInt8] {
        let hl = 20 + options.count
        var t = be16(sport) + be16(dport) + be32(seq) + be32(ack) + [UInt8(hl / 4) << 4, flags] + be16(window) + [0, 0, 0, 0]
        t += options + payload
        let c: UInt16 = checksumBlank
            ? partialChecksum(src: src, dst: dst, proto: 6, length: t.count)
            : checksum(t, initial: pseudoSum(src: src, dst: dst, proto: 6, length: t.count))
        t[16] = UInt8(c >> 8); t[17] = UInt8(c & 0xFF)
        return ethernet(dst: dstMAC, src: srcMAC, type: 0x0800, ipv4Packet(src: src, dst: dst, proto: 6, id: ipID, t))
    }

    /// Ethernet + IPv4 + TCP headers for a segment of `payloadLength` bytes
    /// that follow separately, with the checksum field holding the
    /// pseudo-header sum (csum_blank): what a guest stack hands to netfront.
    public static func tcpHeaders(srcMAC: [UInt8], dstMAC: [UInt8], src: [UInt8], dst: [UInt8], sport: UInt16, dport: UInt16,
                                  seq: UInt32, ack: UInt32, flags: UInt8, window: UInt16 = 65535, payloadLength: Int,
                                  ipID: UInt16 = 1) -> [UInt8] {
        var t = be16(sport) + be16(dport) + be32(seq) + be32(ack) + [5 << 4, flags] + be16(window) + [0, 0, 0, 0]
        let c = partialChecksum(src: src, dst: dst, proto: 6, length: 20 + payloadLength)
        t[16] = UInt8(c >> 8); t[17] = UInt8(c & 0xFF)
        var h: [UInt8] = [0x45, 0] + be16(UInt16(40 + payloadLength)) + be16(ipID) + [0x40, 0, 64, 6, 0, 0] + src + dst
        let hc = checksum(h)
        h[10] = UInt8(hc >> 8); h[11] = UInt8(hc & 0xFF)
        return dstMAC + srcMAC + [0x08, 0x00] + h + t
    }

    /// Ethernet + IPv6 + UDP. With `checksumBlank` the UDP checksum holds
    /// only the pseudo-header sum (for NETTXF_csum_blank with ipv6-csum-offload).
    public static func udp6(srcMAC: [UInt8], dstMAC: [UInt8], src: [UInt8], dst: [UInt8], sport: UInt16, dport: UInt16,
                            payload: [UInt8], checksumBlank: Bool = false) -> [UInt8] {
        var u = be16(sport) + be16(dport) + be16(UInt16(8 + payload.count)) + [0, 0] + payload
        var sum: UInt32 = 0
        for i in stride(from: 0, to: 16, by: 2) {
            sum += UInt32(src[i]) << 8 | UInt32(src[i + 1])
            sum += UInt32(dst[i]) << 8 | UInt32(dst[i + 1])
        }
        sum += UInt32(u.count) + 17
        var c: UInt16
        if checksumBlank {
            while sum >> 16 != 0 { sum = (sum & 0xFFFF) + (sum >> 16) }
            c = UInt16(sum)
        } else {
            c = checksum(u, initial: sum)
            if c == 0 { c = 0xFFFF }
        }
        u[6] = UInt8(c >> 8); u[7] = UInt8(c & 0xFF)
        let ip: [UInt8] = [0x60, 0, 0, 0] + be16(UInt16(u.count)) + [17, 64] + src + dst
        return ethernet(dst: dstMAC, src: srcMAC, type: 0x86DD, ip + u)
    }

    /// A parsed Ethernet/IPv4 frame.
    public struct Parsed: Sendable {
        public var dstMAC: [UInt8], srcMAC: [UInt8], etherType: UInt16
        public var src: [UInt8] = [], dst: [UInt8] = [], proto: UInt8 = 0
        /// L4 header + payload.
        public var l4: [UInt8] = []
        public var l4ChecksumOK = false
        public var sport: UInt16 { UInt16(l4[0]) << 8 | UInt16(l4[1]) }
        public var dport: UInt16 { UInt16(l4[2]) << 8 | UInt16(l4[3]) }
        public var udpPayload: [UInt8] { Array(l4[8...]) }
        public var tcpFlags: UInt8 { l4[13] }
        public var tcpSeq: UInt32 { l4[4..<8].reduce(0) { $0 << 8 | UInt32($1) } }
        public var tcpAck: UInt32 { l4[8..<12].reduce(0) { $0 << 8 | UInt32($1) } }
        public var tcpPayload: [UInt8] { let h = Int(l4[12] >> 4) * 4; return Array(l4[h...]) }
    }

    public static func parse(_ f: [UInt8]) -> Parsed? {
        guard f.count >= 14 else { return nil }
        var p = Parsed(dstMAC: Array(f[0..<6]), srcMAC: Array(f[6..<12]), etherType: UInt16(f[12]) << 8 | UInt16(f[13]))
        guard p.etherType == 0x0800, f.count >= 34 else { return p }
        let ihl = Int(f[14] & 15) * 4
        let total = Int(f[16]) << 8 | Int(f[17])
        guard f.count >= 14 + total, total >= ihl else { return p }
        p.proto = f[23]
        p.src = Array(f[26..<30]); p.dst = Array(f[30..<34])
        p.l4 = Array(f[(14 + ihl)..<(14 + total)])
        switch p.proto {
        case 6, 17:
            p.l4ChecksumOK = checksum(p.l4, initial: pseudoSum(src: p.src, dst: p.dst, proto: p.proto, length: p.l4.count)) == 0
        case 1:
            p.l4ChecksumOK = checksum(p.l4) == 0
        default: break
        }
        return p
    }
}
