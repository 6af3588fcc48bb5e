import CNetShim
import CXen

/// `struct virtio_net_hdr` as the tap reads and writes it in front of every
/// frame: checksum request (csum_start/csum_offset) and GSO request.
public struct VnetHeader: Equatable, Sendable {
    public static let size = MemoryLayout<cnet_vnet_hdr>.size  // 10

    public var flags: UInt8 = 0
    public var gsoType: UInt8 = 0
    public var headerLength: UInt16 = 0
    public var gsoSize: UInt16 = 0
    public var csumStart: UInt16 = 0
    public var csumOffset: UInt16 = 0

    public init() {}
    public init(flags: UInt8, gsoType: UInt8, headerLength: UInt16, gsoSize: UInt16, csumStart: UInt16, csumOffset: UInt16) {
        self.flags = flags; self.gsoType = gsoType; self.headerLength = headerLength
        self.gsoSize = gsoSize; self.csumStart = csumStart; self.csumOffset = csumOffset
    }

    public var needsChecksum: Bool { flags & CNET_VNET_F_NEEDS_CSUM != 0 }
    public var dataValid: Bool { flags & CNET_VNET_F_DATA_VALID != 0 }
    /// The GSO type without the ECN bit.
    public var gsoKind: UInt8 { gsoType & ~CNET_VNET_GSO_ECN }

    @inline(__always)
    public func store(to p: UnsafeMutableRawPointer) {
        var h = cnet_vnet_hdr()
        h.flags = flags; h.gso_type = gsoType; h.hdr_len = headerLength
        h.gso_size = gsoSize; h.csum_start = csumStart; h.csum_offset = csumOffset
        p.storeBytes(of: h, as: cnet_vnet_hdr.self)
    }

    @inline(__always)
    public static func load(from p: UnsafeRawPointer) -> VnetHeader {
        let h = p.loadUnaligned(as: cnet_vnet_hdr.self)
        return VnetHeader(flags: h.flags, gsoType: h.gso_type, headerLength: h.hdr_len, gsoSize: h.gso_size,
                          csumStart: h.csum_start, csumOffset: h.csum_offset)
    }

    /// The netif GSO request (XEN_NETIF_GSO_TYPE_*) for a frame the tap gave
    /// with this header: nil without GSO; `UnsupportedGSO` for a kind the
    /// other end did not negotiate (`tcpv4`, `tcpv6`: feature-gso-tcpv4/6).
    @inline(__always)
    public func netifGSO(tcpv4: Bool, tcpv6: Bool) throws(UnsupportedGSO) -> TxGSO? {
        switch gsoKind {
        case CNET_VNET_GSO_NONE: return nil
        case CNET_VNET_GSO_TCPV4 where tcpv4: return TxGSO(type: UInt8(XEN_NETIF_GSO_TYPE_TCPV4), size: gsoSize)
        case CNET_VNET_GSO_TCPV6 where tcpv6: return TxGSO(type: UInt8(XEN_NETIF_GSO_TYPE_TCPV6), size: gsoSize)
        default: throw UnsupportedGSO(kind: gsoKind)
        }
    }
}

/// A vnet header's GSO kind the other end cannot take (UDP, or a TCP
/// version it did not negotiate).
public struct UnsupportedGSO: Error, Equatable, Sendable {
    public let kind: UInt8
}

/// Why a transmitted packet's checksum could not be set up (Linux's
/// `skb_checksum_setup` returning -EPROTO): the packet is dropped.
public enum ChecksumSetupError: Error, Equatable, Sendable, CustomStringConvertible {
    case truncated(String)
    case notIP(etherType: UInt16)
    case fragment
    case unsupportedProtocol(UInt8)
    case badIPHeader

    public var description: String {
        switch self {
        case .truncated(let what): "packet too short for its \(what) header"
        case .notIP(let t): "ethertype 0x\(String(t, radix: 16)) is neither IPv4 nor IPv6"
        case .fragment: "IP fragment"
        case .unsupportedProtocol(let p): "L4 protocol \(p) is neither TCP nor UDP"
        case .badIPHeader: "bad IP header"
        }
    }
}

/// Where a frame's checksum lives, found by walking its headers (what Linux's
/// `skb_checksum_setup` does for a CHECKSUM_PARTIAL skb from a guest).
public struct ChecksumLocation: Equatable, Sendable {
    /// Offset of the L4 header (csum_start).
    public var l4Offset: Int
    /// Offset of the checksum field inside the L4 header (16 TCP, 6 UDP).
    public var checksumOffset: Int
    public var l4Protocol: UInt8
    public var isIPv6: Bool
    /// Ethernet + IP + L4 header length (virtio hdr_len for GSO); for UDP the
    /// 8-byte header.
    public var headerLength: Int
}

public enum PacketParser {
    public static let ethernetHeader = 14
    static let ipprotoTCP: UInt8 = 6
    static let ipprotoUDP: UInt8 = 17

    @inline(__always) static func be16(_ p: UnsafeRawBufferPointer, _ o: Int) -> UInt16 {
        UInt16(p[o]) << 8 | UInt16(p[o + 1])
    }

    /// Finds the L4 checksum of an Ethernet frame: IPv4 (not a fragment) or
    /// IPv6 (walking hop-by-hop, routing, destination-options, fragment and
    /// AH headers), carrying TCP or UDP with its header complete.
    public static func checksumLocation(_ p: UnsafeRawBufferPointer) throws(ChecksumSetupError) -> ChecksumLocation {
        guard p.count >= ethernetHeader else { throw .truncated("Ethernet") }
        let etherType = be16(p, 12)
        var off = ethernetHeader
        var proto: UInt8
        let v6: Bool
        switch etherType {
        case 0x0800:
            v6 = false
            guard p.count >= off + 20 else { throw .truncated("IPv4") }
            guard p[off] >> 4 == 4 else { throw .badIPHeader }
            let ihl = Int(p[off] & 0x0F) * 4
            guard ihl >= 20 else { throw .badIPHeader }
            guard p.count >= off + ihl else { throw .truncated("IPv4") }
            // More-fragments or a fragment offset (ip_is_fragment).
            guard be16(p, off + 6) & 0x3FFF == 0 else { throw .fragment }
            proto = p[off + 9]
            off += ihl
        case 0x86DD:
            v6 = true
            guard p.count >= off + 40 else { throw .truncated("IPv6") }
            guard p[off] >> 4 == 6 else { throw .badIPHeader }
            proto = p[off + 6]
            off += 40
            var hops = 0
            walk: while true {
                hops += 1
                guard hops < 16 else { throw .badIPHeader }
                switch proto {
                case 0, 43, 60:  // hop-by-hop, routing, destination options
                    guard p.count >= off + 8 else { throw .truncated("IPv6 extension") }
                    let len = (Int(p[off + 1]) + 1) * 8
                    proto = p[off]
                    off += len
                case 44:  // fragment
                    guard p.count >= off + 8 else { throw .truncated("IPv6 fragment") }
                    guard be16(p, off + 2) & 0xFFF9 == 0 else { throw .fragment }
                    proto = p[off]
                    off += 8
                case 51:  // AH: length in 4-byte units minus 2
                    guard p.count >= off + 8 else { throw .truncated("IPv6 AH") }
                    let len = (Int(p[off + 1]) + 2) * 4
                    proto = p[off]
                    off += len
                default:
                    break walk
                }
            }
        default:
            throw .notIP(etherType: etherType)
        }
        switch proto {
        case ipprotoTCP:
            guard p.count >= off + 20 else { throw .truncated("TCP") }
            let doff = Int(p[off + 12] >> 4) * 4
            guard doff >= 20, p.count >= off + doff else { throw .truncated("TCP") }
            return ChecksumLocation(l4Offset: off, checksumOffset: 16, l4Protocol: proto, isIPv6: v6, headerLength: off + doff)
        case ipprotoUDP:
            guard p.count >= off + 8 else { throw .truncated("UDP") }
            return ChecksumLocation(l4Offset: off, checksumOffset: 6, l4Protocol: proto, isIPv6: v6, headerLength: off + 8)
        default:
            throw .unsupportedProtocol(proto)
        }
    }

    /// Writes the folded (not inverted) pseudo-header sum into the L4
    /// checksum field, as Linux's recalculate_partial_csum does for a GSO
    /// packet the guest sent without csum_blank.
    /// `totalLength` is the frame's length when `p` holds only its head.
    public static func writePseudoHeaderChecksum(_ p: UnsafeMutableRawBufferPointer, _ loc: ChecksumLocation,
                                                 totalLength: Int? = nil) {
        var sum: UInt32 = 0
        let ro = UnsafeRawBufferPointer(p)
        let l4len = (totalLength ?? p.count) - loc.l4Offset
        if loc.isIPv6 {
            for i in stride(from: ethernetHeader + 8, to: ethernetHeader + 40, by: 2) { sum += UInt32(be16(ro, i)) }
            sum += UInt32(l4len >> 16) + UInt32(l4len & 0xFFFF)
        } else {
            for i in stride(from: ethernetHeader + 12, to: ethernetHeader + 20, by: 2) { sum += UInt32(be16(ro, i)) }
            sum += UInt32(l4len)
        }
        sum += UInt32(loc.l4Protocol)
        while sum >> 16 != 0 { sum = (sum & 0xFFFF) + (sum >> 16) }
        let at = loc.l4Offset + loc.checksumOffset
        p[at] = UInt8(sum >> 8)
        p[at + 1] = UInt8(sum & 0xFF)
    }

    /// RFC 1071 Internet checksum of `p` (for tests and the test kit).
    public static func internetChecksum(_ p: UnsafeRawBufferPointer, initial: UInt32 = 0) -> UInt16 {
        var sum = initial
        var i = 0
        while i + 1 < p.count { sum += UInt32(p[i]) << 8 | UInt32(p[i + 1]); i += 2 }
        if i < p.count { sum += UInt32(p[i]) << 8 }
        while sum >> 16 != 0 { sum = (sum & 0xFFFF) + (sum >> 16) }
        return ~UInt16(sum)
    }
}
