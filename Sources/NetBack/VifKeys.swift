import XenHV

/// What a vif's xenstore keys mean, as pure functions the XenBus handshake
/// can call with a key reader (relative paths, nil for a missing key):
/// netback's `read_xenbus_vif_flags`, `connect_data_rings` and `xen_net_read_rate`.
public enum VifKeys {
    public struct KeyError: Error, CustomStringConvertible, Equatable, Sendable {
        public let message: String
        public var description: String { message }
        public init(_ m: String) { message = m }
    }

    static func flag(_ read: (String) -> String?, _ key: String, default d: Bool = false) -> Bool {
        guard let v = read(key) else { return d }
        return (UInt32(v) ?? 0) != 0
    }

    static func number(_ read: (String) -> String?, _ key: String, in dir: String) throws(KeyError) -> UInt32 {
        let path = dir.isEmpty ? key : "\(dir)/\(key)"
        guard let s = read(path) else { throw KeyError("reading \(path): missing") }
        guard let v = UInt32(s) else { throw KeyError("reading \(path): '\(s)' is not a number") }
        return v
    }

    /// The backend directory's keys (written by the toolstack): mac, mtu, rate, vifname.
    /// `warn` gets one line for a `rate` that is refused (traffic then
    /// unlimited, as Linux's "Failed to parse network rate limit").
    public static func config(frontendDomid: DomID, devid: UInt32, maxQueues: Int,
                              warn: (String) -> Void = { _ in },
                              backend read: (String) -> String?) throws(KeyError) -> VifConfig {
        var c = VifConfig(frontendDomid: frontendDomid, devid: devid, maxQueues: maxQueues)
        if let m = read("mac") {
            guard let mac = MACAddress(m) else { throw KeyError("bad mac '\(m)'") }
            c.mac = mac
        }
        if let m = read("mtu") {
            guard let mtu = UInt32(m), (68...65535).contains(mtu) else { throw KeyError("bad mtu '\(m)'") }
            c.mtu = mtu
        }
        c.rate = rate(read("rate"), warn: warn)
        // libxl's `vifname`: the tap gets that name instead of vif<domid>.<devid>
        // (Xen's hotplug scripts rename the netdev to it; netback makes its tap so).
        if let n = read("vifname"), !n.isEmpty {
            guard InterfaceName.isValid(n) else {
                throw KeyError("bad vifname '\(n)'")
            }
            c.tapName = n
        }
        return c
    }

    /// The backend's `rate` value: absent, or one that does not parse, means
    /// unlimited, as in Linux (which warns about the latter).
    public static func rate(_ value: String?, warn: (String) -> Void) -> RateLimit? {
        guard let r = value else { return nil }
        guard let rate = RateLimit(xenstoreValue: r) else {
            warn("failed to parse network rate limit '\(r)' (want BYTES,USEC, both 1...\(UInt64.max)): traffic unlimited")
            return nil
        }
        return rate
    }

    /// The frontend directory's keys at connect time: queues (ring refs and
    /// event channels, under queue-N/ when multi-queue) and features.
    public static func connection(maxQueues: Int, frontend read: (String) -> String?) throws(KeyError) -> VifConnection {
        let n: Int
        if let s = read("multi-queue-num-queues") {
            guard let v = Int(s) else { throw KeyError("multi-queue-num-queues '\(s)' is not a number") }
            n = v
        } else {
            n = 1
        }
        guard n >= 1 else { throw KeyError("guest requested 0 queues") }
        guard n <= maxQueues else { throw KeyError("guest requested \(n) queues, exceeding the maximum of \(maxQueues)") }
        guard flag(read, "request-rx-copy") else { throw KeyError("frontend does not support rx-copy") }
        var queues: [VifQueueRings] = []
        for q in 0..<n {
            let dir = n == 1 ? "" : "queue-\(q)"
            let tx = try number(read, "tx-ring-ref", in: dir)
            let rx = try number(read, "rx-ring-ref", in: dir)
            // Linux connect_data_rings: split channels first (both keys, both
            // numbers), else `event-channel`; a pair naming one port is that
            // one channel (xenvif_connect_data binds it once).
            let events: QueueEventChannels
            if let t = try? number(read, "event-channel-tx", in: dir), let r = try? number(read, "event-channel-rx", in: dir) {
                events = QueueEventChannels.split(tx: t, rx: r).normalized
            } else if let p = try? number(read, "event-channel", in: dir) {
                events = .shared(p)
            } else {
                throw KeyError("reading \(dir.isEmpty ? "" : dir + "/")event-channel(-tx/rx): missing or not a number")
            }
            queues.append(VifQueueRings(txRingRef: tx, rxRingRef: rx, events: events))
        }
        let features = FrontendFeatures(
            rxCopy: true, rxNotify: flag(read, "feature-rx-notify"), sg: flag(read, "feature-sg"),
            gsoTCPv4: flag(read, "feature-gso-tcpv4"), gsoTCPv6: flag(read, "feature-gso-tcpv6"),
            noChecksumOffload: flag(read, "feature-no-csum-offload"),
            ipv6ChecksumOffload: flag(read, "feature-ipv6-csum-offload"))
        return VifConnection(queues: queues, features: features)
    }
}
