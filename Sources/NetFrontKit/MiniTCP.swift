import CXen
import NetBack

/// Just enough TCP for a test guest without a network stack: an active open,
/// in-order sending (optionally as GSO super-packets) paced by the peer's
/// ACKs and window, and in-order receiving with cumulative ACKs. No
/// retransmission: the path under test is lossless, and a loss fails the test.
public final class MiniTCP {
    public let queue: FrontQueue
    let mac: [UInt8], peerMAC: [UInt8]
    let ip: [UInt8], peerIP: [UInt8]
    let port: UInt16, peerPort: UInt16
    public private(set) var sndNxt: UInt32 = 0x1000_0000
    public private(set) var sndUna: UInt32 = 0x1000_0000
    public private(set) var rcvNxt: UInt32 = 0
    var peerWindow: UInt32 = 0
    var peerScale: UInt32 = 0
    let mss = 1448
    var ipID: UInt16 = 1
    public var received: [UInt8] = []
    /// Frames that arrived as GSO super-packets (GSO extra on the rx ring).
    public private(set) var gsoFramesReceived = 0
    /// Frames that arrived in more than one rx slot.
    public private(set) var multiSlotFramesReceived = 0

    public init(queue: FrontQueue, mac: [UInt8], peerMAC: [UInt8], ip: [UInt8], peerIP: [UInt8], port: UInt16, peerPort: UInt16) {
        self.queue = queue
        self.mac = mac; self.peerMAC = peerMAC; self.ip = ip; self.peerIP = peerIP
        self.port = port; self.peerPort = peerPort
    }

    static let fin: UInt8 = 0x01, syn: UInt8 = 0x02, rst: UInt8 = 0x04, psh: UInt8 = 0x08, ack: UInt8 = 0x10

    func segment(flags: UInt8, payload: ArraySlice<UInt8>, seq: UInt32, options: [UInt8] = [], blank: Bool) -> [UInt8] {
        ipID &+= 1
        return Frames.tcp(srcMAC: mac, dstMAC: peerMAC, src: ip, dst: peerIP, sport: port, dport: peerPort, seq: seq,
                          ack: rcvNxt, flags: flags, window: 65535, options: options, payload: Array(payload),
                          checksumBlank: blank, ipID: ipID)
    }

    func transmit(_ frame: [UInt8], flags: UInt16 = 0, gso: TxGSO? = nil) throws {
        while !(try queue.send(frame, flags: flags, gso: gso)) {
            // Ring or buffers full: wait for responses (and keep reading ACKs).
            _ = try queue.txResponses(1, timeout: 50)
            try pollIncoming(timeout: 0)
        }
        try queue.pushTx()
    }

    /// Active open: SYN (MSS 1460, window scale 7), SYN-ACK, ACK.
    /// The SYN is sent again every second without an answer, as a real TCP
    /// does (a frame the bridge dropped while the vif's port came up is not
    /// the end of the connection).
    public func connect(timeout: Int32 = 5000) throws {
        let opts: [UInt8] = [2, 4, 0x05, 0xB4, 1, 3, 3, 7]
        let syn = segment(flags: Self.syn, payload: [], seq: sndNxt, options: opts, blank: false)
        try transmit(syn)
        sndNxt &+= 1
        let deadline = RateLimiter.now() + UInt64(timeout) * 1_000_000
        var resend = RateLimiter.now() + 1_000_000_000
        while RateLimiter.now() < deadline {
            if RateLimiter.now() >= resend {
                _ = try queue.reapTx()
                try transmit(syn)
                resend = RateLimiter.now() + 1_000_000_000
            }
            guard let f = try queue.receive(timeout: 100), let p = Frames.parse(f.bytes), p.proto == 6,
                  p.sport == peerPort, p.dport == port else { continue }
            guard p.tcpFlags & (Self.syn | Self.ack) == Self.syn | Self.ack else { throw FrontError("expected SYN-ACK, flags \(p.tcpFlags)") }
            rcvNxt = p.tcpSeq &+ 1
            sndUna = p.tcpAck
            peerWindow = UInt32(p.l4[14]) << 8 | UInt32(p.l4[15])
            // Window scale option from the SYN-ACK.
            var o = 20
            let hl = Int(p.l4[12] >> 4) * 4
            while o < hl {
                let kind = p.l4[o]
                if kind == 0 { break }
                if kind == 1 { o += 1; continue }
                let len = Int(p.l4[o + 1])
                if kind == 3 { peerScale = UInt32(p.l4[o + 2]) }
                o += max(2, len)
            }
            try transmit(segment(flags: Self.ack, payload: [], seq: sndNxt, blank: false))
            _ = try queue.reapTx()
            return
        }
        throw FrontError("no SYN-ACK")
    }

    /// Reads what arrived: ACKs advance `sndUna`, in-order data is kept and ACKed.
    public func pollIncoming(timeout: Int32) throws {
        var t = timeout
        while let f = try queue.receive(timeout: t) {
            t = 0
            if f.gso != nil { gsoFramesReceived += 1 }
            if f.slots > 1 { multiSlotFramesReceived += 1 }
            guard let p = Frames.parse(f.bytes), p.proto == 6, p.sport == peerPort, p.dport == port else { continue }
            if p.tcpFlags & Self.rst != 0 { throw FrontError("peer reset the connection") }
            if p.tcpFlags & Self.ack != 0, Int32(bitPattern: p.tcpAck &- sndUna) > 0 { sndUna = p.tcpAck }
            peerWindow = (UInt32(p.l4[14]) << 8 | UInt32(p.l4[15])) << peerScale
            let data = p.tcpPayload
            if !data.isEmpty {
                if p.tcpSeq == rcvNxt {
                    received += data
                    rcvNxt &+= UInt32(data.count)
                }
                try transmit(segment(flags: Self.ack, payload: [], seq: sndNxt, blank: false))
            }
            if p.tcpFlags & Self.fin != 0 && p.tcpSeq &+ UInt32(data.count) == rcvNxt {
                rcvNxt &+= 1
                try transmit(segment(flags: Self.ack, payload: [], seq: sndNxt, blank: false))
            }
        }
        _ = try queue.reapTx()
    }

    /// Sends `data`; with `gsoSize` in super-packets of up to `chunk` bytes
    /// (csum_blank + GSO extra), else in MSS-sized, fully checksummed segments.
    public func send(_ data: [UInt8], gso: Bool, chunk: Int = 60000, timeout: Int32 = 10000) throws {
        var at = 0
        let deadline = RateLimiter.now() + UInt64(timeout) * 1_000_000
        while at < data.count {
            let inFlight = Int(sndNxt &- sndUna)
            let window = Int(max(peerWindow, 1))
            let room = window - inFlight
            let size = min(gso ? chunk : mss, data.count - at)
            if room < min(size, mss) || (gso && room < size && inFlight > 0) {
                guard RateLimiter.now() < deadline else { throw FrontError("send stalled: \(inFlight) bytes in flight") }
                try pollIncoming(timeout: 50)
                continue
            }
            let n = min(size, room)
            if gso {
                ipID &+= 1
                let h = Frames.tcpHeaders(srcMAC: mac, dstMAC: peerMAC, src: ip, dst: peerIP, sport: port, dport: peerPort,
                                          seq: sndNxt, ack: rcvNxt, flags: Self.ack | Self.psh, payloadLength: n, ipID: ipID)
                let g = n > mss ? TxGSO(type: UInt8(XEN_NETIF_GSO_TYPE_TCPV4), size: UInt16(mss)) : nil
                try data.withUnsafeBytes { all in
                    let p = UnsafeRawBufferPointer(rebasing: all[at..<at + n])
                    while !(try queue.sendGather(header: h, payload: p, flags: UInt16(NETTXF_csum_blank), gso: g)) {
                        _ = try queue.txResponses(1, timeout: 50)
                        try pollIncoming(timeout: 0)
                    }
                }
                try queue.pushTx()
            } else {
                try transmit(segment(flags: Self.ack | Self.psh, payload: data[at..<at + n], seq: sndNxt, blank: false))
            }
            sndNxt &+= UInt32(n)
            at += n
            try pollIncoming(timeout: 0)
        }
        while sndUna != sndNxt {
            guard RateLimiter.now() < deadline else { throw FrontError("unacknowledged: \(sndNxt &- sndUna) bytes") }
            try pollIncoming(timeout: 50)
        }
    }

    /// Receives until `count` bytes arrived in order.
    public func receive(count: Int, timeout: Int32 = 10000) throws -> [UInt8] {
        let deadline = RateLimiter.now() + UInt64(timeout) * 1_000_000
        while received.count < count {
            guard RateLimiter.now() < deadline else { throw FrontError("received \(received.count) of \(count) bytes") }
            try pollIncoming(timeout: 50)
        }
        return received
    }
}
