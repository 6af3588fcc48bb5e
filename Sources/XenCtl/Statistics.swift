import Glibc
import Prometheus

/// One device's counters as its backend published them in `<run-dir>/stats/`.
public struct DeviceStatistics: Sendable, Equatable {
    public let type: String
    public let domid: UInt32
    public let devid: Int
    public var counters: [String: UInt64]
}

extension Toolstack {
    /// Every backend's published counters, by device.
    public func statistics() -> [DeviceStatistics] {
        var byDevice: [String: DeviceStatistics] = [:]
        for file in ["blkback.stats", "netback.stats"] {
            guard let f = fopen(runDir + "/stats/" + file, "r") else { continue }
            defer { fclose(f) }
            var line: UnsafeMutablePointer<CChar>?
            var cap = 0
            while getline(&line, &cap, f) > 0, let l = line {
                let w = String(cString: l).split(separator: " ")
                guard w.count == 5, let d = UInt32(w[1]), let dev = Int(w[2]),
                      let v = UInt64(w[4].filter(\.isNumber)) else { continue }
                let key = "\(w[0]) \(d) \(dev)"
                byDevice[key, default: DeviceStatistics(type: String(w[0]), domid: d, devid: dev, counters: [:])]
                    .counters[String(w[3])] = v
            }
            free(line)
        }
        return byDevice.values.sorted { ($0.domid, $0.type, $0.devid) < ($1.domid, $1.type, $1.devid) }
    }

    /// `xenctl top`: one table of every device's counters, with rates against `previous`.
    public func topTable(previous: [DeviceStatistics], seconds: Double) -> String {
        let now = statistics()
        let names: [UInt32: String] = (try? connect().listDomains()).map {
            Dictionary($0.map { (UInt32($0.domid), $0.name) }, uniquingKeysWith: { a, _ in a })
        } ?? [:]
        func rate(_ d: DeviceStatistics, _ k: String) -> String {
            guard seconds > 0, let p = previous.first(where: { $0.type == d.type && $0.domid == d.domid && $0.devid == d.devid }),
                  let a = p.counters[k], let b = d.counters[k], b >= a else { return "-" }
            let r = Double(b - a) / seconds
            return r < 1e18 ? String(Int(r)) : "-"
        }
        var out = "Domain           Device      " + "ops-in".leftPadding(10) + "ops-out".leftPadding(10)
            + "/s-in".leftPadding(8) + "/s-out".leftPadding(8) + "bytes-in".leftPadding(14) + "bytes-out".leftPadding(14)
            + "errors".leftPadding(8)
        for d in now {
            let c = d.counters
            let dom = (names[d.domid] ?? "d\(d.domid)").padding(16)
            if d.type == "vbd" {
                out += "\n" + dom + " " + "vbd \(d.devid)".padding(11) + String(c["rd_req"] ?? 0).leftPadding(10)
                    + String(c["wr_req"] ?? 0).leftPadding(10) + rate(d, "rd_req").leftPadding(8) + rate(d, "wr_req").leftPadding(8)
                    + String((c["rd_sect"] ?? 0) * 512).leftPadding(14) + String((c["wr_sect"] ?? 0) * 512).leftPadding(14)
                    + String(c["errors"] ?? 0).leftPadding(8)
            } else {
                out += "\n" + dom + " " + "vif \(d.devid)".padding(11) + String(c["rx_packets"] ?? 0).leftPadding(10)
                    + String(c["tx_packets"] ?? 0).leftPadding(10) + rate(d, "rx_packets").leftPadding(8)
                    + rate(d, "tx_packets").leftPadding(8) + String(c["rx_bytes"] ?? 0).leftPadding(14)
                    + String(c["tx_bytes"] ?? 0).leftPadding(14)
                    + String((c["tx_errors"] ?? 0) + (c["tx_drops"] ?? 0) + (c["rx_drops"] ?? 0)).leftPadding(8)
            }
        }
        return out
    }

    /// `queue<N>_<name>` (netback's per-queue counters) as (N, name).
    static func perQueueCounter(_ key: String) -> (queue: String, name: String)? {
        guard key.hasPrefix("queue") else { return nil }
        let rest = key.dropFirst(5)
        let digits = rest.prefix { $0.isNumber }
        guard !digits.isEmpty, rest.dropFirst(digits.count).first == "_" else { return nil }
        let name = rest.dropFirst(digits.count + 1)
        return name.isEmpty ? nil : (String(digits), String(name))
    }

    /// Per-device counters and service health in the Prometheus text format.
    public func metricsText() -> String {
        let registry = PrometheusCollectorRegistry()
        /// swiftxen_SUBSYSTEM_NAME[_total], with its HELP line.
        func metric(_ subsystem: String?, _ name: String, counter: Bool, _ help: String) -> MetricNameDescriptor {
            MetricNameDescriptor(namespace: "swiftxen", subsystem: subsystem, metricName: name,
                                 unitName: counter ? "total" : "", helpText: help)
        }
        let names: [UInt32: String] = (try? connect().listDomains()).map {
            Dictionary($0.map { (UInt32($0.domid), $0.name) }, uniquingKeysWith: { a, _ in a })
        } ?? [:]
        for d in statistics() {
            let labels = [("domain", names[d.domid] ?? "d\(d.domid)"), ("domid", "\(d.domid)"), ("devid", "\(d.devid)")]
            for (k, v) in d.counters.sorted(by: { $0.key < $1.key }) {
                if let (queue, name) = Self.perQueueCounter(k) {
                    // One metric per counter with the queue as a label, not one per queue.
                    registry.makeCounter(descriptor: metric(d.type, "queue_" + name, counter: true, "\(d.type) \(name) per queue (the backend's statistics file)"),
                                         labels: labels + [("queue", queue)]).increment(by: Int64(clamping: v))
                } else if k == "persistent_grants" {
                    registry.makeGauge(descriptor: metric(d.type, k, counter: false, "\(d.type) \(k) (the backend's statistics file)"),
                                       labels: labels).set(Int64(v))
                } else {
                    registry.makeCounter(descriptor: metric(d.type, k, counter: true, "\(d.type) \(k) (the backend's statistics file)"),
                                         labels: labels).increment(by: Int64(clamping: v))
                }
            }
        }
        for s in ServiceStatus.read(runDir: runDir) ?? [] {
            registry.makeGauge(descriptor: metric("service", "up", counter: false, "1 while the dom0 service runs"),
                               labels: [("service", s.name)]).set(Int64(s.state == "running" ? 1 : 0))
            registry.makeCounter(descriptor: metric("service", "restarts", counter: true, "Restarts of the dom0 service by its supervisor"),
                                 labels: [("service", s.name)]).increment(by: Int64(s.restarts))
        }
        registry.makeGauge(descriptor: metric(nil, "domains", counter: false, "Domains the hypervisor core lists, as xl list shows them"))
            .set(Int64(names.count))
        return registry.emitToString()
    }
}
