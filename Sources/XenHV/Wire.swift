import CXen
import Glibc

/// Operations of the xenhv socket protocol. Each mirrors a hypercall or a
/// toolstack call; the fast paths (notify, grant checks, ring access) never
/// come here.
package enum HVOp: UInt32 {
    /// First message on a connection: who am I, and my shared objects.
    case hello = 1
    /// XEN_DOMCTL_createdomain + the PV domain builder.
    case createDomain
    /// XEN_DOMCTL_destroydomain.
    case destroyDomain
    /// XEN_SYSCTL_getdomaininfolist.
    case listDomains
    /// XEN_DOMCTL_pausedomain / unpausedomain.
    case pauseDomain
    case unpauseDomain
    /// Descriptors of a domain's memory, grant table, shared_info and private area (dom0).
    case openDomain
    /// EVTCHNOP_alloc_unbound.
    case allocUnbound
    /// EVTCHNOP_bind_interdomain.
    case bindInterdomain
    /// EVTCHNOP_bind_virq.
    case bindVirq
    /// EVTCHNOP_close.
    case close
    /// EVTCHNOP_status.
    case status
    /// The send descriptor of an interdomain port (an eventfd in the peer
    /// port's wake-up set, ours alone), for the in-process send.
    case peerDescriptor
    /// The wake-up descriptor of one of our own ports allocated on our behalf.
    case portDescriptor
    /// GNTTABOP_setup_table.
    case setupTable
    /// GNTTABOP_query_size.
    case querySize
    /// Tells xenhv which process runs a domain (for pause, unpause, destroy).
    case attachProcess
    /// SCHEDOP_shutdown: the guest reports its own shutdown, with a SHUTDOWN_* reason.
    case shutdown
    /// libxl_domain_rename (the name lives in xenhv here, not only in xenstore).
    case renameDomain
    /// The re-raise of EVTCHNOP_unmask: xenhv kicks one of our ports' wake-up set.
    case raisePort
    /// XEN_DOMCTL_set_max_evtchn.
    case setMaxEventChannels
}

/// Little-endian encoder for protocol payloads.
package struct WireWriter {
    package var bytes: [UInt8] = []
    package init() {}
    package mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    package mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    package mutating func i32(_ v: Int32) { u32(UInt32(bitPattern: v)) }
    package mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    package mutating func string(_ s: String) {
        let u = Array(s.utf8)
        u32(UInt32(u.count))
        bytes.append(contentsOf: u)
    }
}

/// Bounds-checked decoder; a short or malformed message is a protocol violation.
package struct WireReader {
    package let bytes: [UInt8]
    package var at = 0
    package init(_ bytes: [UInt8]) { self.bytes = bytes }

    package mutating func take(_ n: Int) throws(HypervisorError) -> ArraySlice<UInt8> {
        guard n >= 0, at + n <= bytes.count else { throw .protocolViolation("short message") }
        defer { at += n }
        return bytes[at..<at + n]
    }
    package mutating func u16() throws(HypervisorError) -> UInt16 {
        let s = try take(2)
        return UInt16(s[s.startIndex]) | UInt16(s[s.startIndex + 1]) << 8
    }
    package mutating func u32() throws(HypervisorError) -> UInt32 {
        let s = try take(4)
        var v: UInt32 = 0
        for (i, b) in s.enumerated() { v |= UInt32(b) << (8 * UInt32(i)) }
        return v
    }
    package mutating func i32() throws(HypervisorError) -> Int32 { Int32(bitPattern: try u32()) }
    package mutating func u64() throws(HypervisorError) -> UInt64 {
        UInt64(try u32()) | UInt64(try u32()) << 32
    }
    package mutating func string() throws(HypervisorError) -> String {
        let n = Int(try u32())
        guard n <= 4096 else { throw .protocolViolation("string of \(n) bytes") }
        return String(decoding: try take(n), as: UTF8.self)
    }
}

/// One framed message: a 12-byte header (op or status, payload length, spare)
/// and the payload, with up to 16 descriptors riding along.
package struct WireMessage {
    package static let maxPayload = 64 << 10
    package var code: Int32
    package var payload: [UInt8]
    package var fds: [CInt] = []
    package init(code: Int32, payload: [UInt8], fds: [CInt] = []) {
        self.code = code
        self.payload = payload
        self.fds = fds
    }

    /// Sends header and payload as one datagram-like write on a SOCK_SEQPACKET socket.
    /// `blocking: false` is for xenhv's replies: a client that stops reading
    /// gets EAGAIN (and is dropped) instead of stalling the daemon.
    package func send(on sock: CInt, blocking: Bool = true) throws(HypervisorError) {
        var buf = [UInt8]()
        buf.reserveCapacity(8 + payload.count)
        withUnsafeBytes(of: code.littleEndian) { buf.append(contentsOf: $0) }
        withUnsafeBytes(of: UInt32(payload.count).littleEndian) { buf.append(contentsOf: $0) }
        buf.append(contentsOf: payload)
        let r = buf.withUnsafeBytes { b in
            fds.withUnsafeBufferPointer { f in
                blocking
                    ? cxen_send_with_fds(sock, b.baseAddress, b.count, f.baseAddress, CInt(f.count))
                    : cxen_send_with_fds_nowait(sock, b.baseAddress, b.count, f.baseAddress, CInt(f.count))
            }
        }
        guard r == buf.count else {
            if r < 0, errno == EPIPE || errno == ECONNRESET { throw .connectionLost }
            throw .system(call: "sendmsg", errno: errno)
        }
    }

    /// What one receive found.
    package enum Receipt {
        case message(WireMessage)
        /// The peer closed or shut down its side, and nothing is left to read.
        case end
        /// Nothing queued (non-blocking receives only).
        case wouldBlock
    }

    /// Receives one message; nil at end of stream.
    package static func receive(on sock: CInt, buffer: inout [UInt8]) throws(HypervisorError) -> WireMessage? {
        switch try receive(on: sock, buffer: &buffer, blocking: true) {
        case .message(let m): return m
        case .end: return nil
        case .wouldBlock: throw .system(call: "recvmsg", errno: EAGAIN)
        }
    }

    /// Receives one message. `blocking: false` is for xenhv, which must never
    /// wait on a client (MSG_DONTWAIT). A record shorter than the header, an
    /// empty one included, is a protocol violation, never the end of the
    /// stream: on SOCK_SEQPACKET recvmsg returns 0 for an empty record as it
    /// does at the end, and only the peer's shutdown tells them apart. Every
    /// descriptor a refused record carried is closed.
    package static func receive(on sock: CInt, buffer: inout [UInt8], blocking: Bool) throws(HypervisorError) -> Receipt {
        if buffer.count < maxPayload + 8 { buffer = [UInt8](repeating: 0, count: maxPayload + 8) }
        var fds = [CInt](repeating: -1, count: 16)
        var nfds: CInt = 0
        var eof: CInt = 0
        let r = buffer.withUnsafeMutableBytes { b in
            fds.withUnsafeMutableBufferPointer { f in
                cxen_recv_with_fds(sock, b.baseAddress, b.count, f.baseAddress, 16, &nfds, blocking ? 0 : 1, &eof)
            }
        }
        if r == 0 && eof != 0 { return .end }
        guard r >= 8 else {
            let e = errno
            for i in 0..<Int(nfds) { cxen_close_received(fds[i]) }
            if r < 0, e == EAGAIN || e == EWOULDBLOCK { return .wouldBlock }
            if r < 0, e == ECONNRESET { return .end }
            if r < 0 { throw .system(call: "recvmsg", errno: e) }
            throw .protocolViolation("message of \(r) bytes")
        }
        let code = buffer.withUnsafeBytes { Int32(littleEndian: $0.loadUnaligned(fromByteOffset: 0, as: Int32.self)) }
        let len = buffer.withUnsafeBytes { Int(UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: 4, as: UInt32.self))) }
        guard len == r - 8 else {
            for i in 0..<Int(nfds) { cxen_close_received(fds[i]) }
            throw .protocolViolation("length \(len) but \(r - 8) payload bytes")
        }
        return .message(WireMessage(code: code, payload: Array(buffer[8..<r]), fds: Array(fds[0..<Int(nfds)])))
    }
}
