// The XenbusState machine (xen/io/xenbus.h) and libxl's device-directory layout:
// backend  /local/domain/<backend-domid>/backend/<type>/<frontend-domid>/<devid>
// frontend /local/domain/<frontend-domid>/device/<type>/<devid>
import CXen
import func XenHV.monotonicSeconds
import XenStore

/// `enum xenbus_state` from xen/io/xenbus.h.
public enum XenbusState: Int, Sendable, CaseIterable, CustomStringConvertible {
    case unknown = 0, initialising, initWait, initialised, connected, closing, closed, reconfiguring, reconfigured

    public init?(string: String) {
        guard let v = Int(string.trimmingCharacters(in: [" ", "\n"])), let s = XenbusState(rawValue: v) else { return nil }
        self = s
    }

    public var description: String {
        switch self {
        case .unknown: return "Unknown"
        case .initialising: return "Initialising"
        case .initWait: return "InitWait"
        case .initialised: return "Initialised"
        case .connected: return "Connected"
        case .closing: return "Closing"
        case .closed: return "Closed"
        case .reconfiguring: return "Reconfiguring"
        case .reconfigured: return "Reconfigured"
        }
    }
}

extension String {
    fileprivate func trimmingCharacters(in set: Set<Character>) -> String {
        var s = Substring(self)
        while let f = s.first, set.contains(f) { s = s.dropFirst() }
        while let l = s.last, set.contains(l) { s = s.dropLast() }
        return String(s)
    }
}

/// One split device as libxl lays it out in xenstore.
public struct XenBusDevice: Sendable, Hashable {
    /// "vbd", "vif", ...
    public var type: String
    public var frontendDomid: DomID
    public var devid: Int
    public var backendDomid: DomID

    public init(type: String, frontendDomid: DomID, devid: Int, backendDomid: DomID = 0) {
        self.type = type; self.frontendDomid = frontendDomid; self.devid = devid; self.backendDomid = backendDomid
    }

    public var backendPath: String { "/local/domain/\(backendDomid)/backend/\(type)/\(frontendDomid)/\(devid)" }
    public var frontendPath: String { "/local/domain/\(frontendDomid)/device/\(type)/\(devid)" }
    /// Where a backend watches for new devices of its type.
    public static func backendRoot(type: String, backendDomid: DomID = 0) -> String {
        "/local/domain/\(backendDomid)/backend/\(type)"
    }

    /// Parses a backend device path (or a path below one) back into a device.
    public init?(backendPath p: String) {
        let c = p.split(separator: "/")
        guard c.count >= 7, c[0] == "local", c[1] == "domain", let be = DomID(c[2]), c[3] == "backend",
              let fe = DomID(c[5]), let dev = Int(c[6]) else { return nil }
        self.init(type: String(c[4]), frontendDomid: fe, devid: dev, backendDomid: be)
    }
}

extension XenBusClient {
    /// Reads `<dir>/state`; a missing node or junk reads as `.unknown` (as Linux does).
    public func state(at dir: String, tx: UInt32 = 0) throws(XenBusError) -> XenbusState {
        guard let s = try readIfExists(dir + "/state", tx: tx) else { return .unknown }
        return XenbusState(string: s) ?? .unknown
    }

    /// Writes `<dir>/state` (xenbus_switch_state). Does nothing if already there.
    public func switchState(at dir: String, to new: XenbusState) throws(XenBusError) {
        if try state(at: dir) == new { return }
        try write(dir + "/state", "\(new.rawValue)")
    }

    /// Writes `<dir>/state` only while it exists, checked in the same
    /// transaction (Linux's __xenbus_switch_state): a late write for a device
    /// the toolstack removed must not re-create its directory. With `owner`,
    /// only while `<dir>/<owner>` exists too: a key the writer put there, so
    /// a device the toolstack re-created in its place is left alone.
    public func switchStateIfPresent(at dir: String, to new: XenbusState, owner: String? = nil) throws {
        try transaction { t in
            if let owner, try t.readIfExists(dir + "/" + owner) == nil { return }
            guard let current = try t.readIfExists(dir + "/state") else { return }
            if current != "\(new.rawValue)" { try t.write(dir + "/state", "\(new.rawValue)") }
        }
    }

    /// Waits until `<dir>/state` satisfies `predicate` (xenbus_wait_for_state), using a
    /// watch; skipped states are fine since only the current value is tested.
    /// `.timeout` once `timeout` seconds have passed: the wait is woken by
    /// the watch or by the deadline, whichever comes first.
    public func waitForState(at dir: String, timeout: Double = 30,
                             _ predicate: @escaping @Sendable (XenbusState) -> Bool) async throws -> XenbusState {
        let (wakes, wake) = AsyncStream<Void>.makeStream(bufferingPolicy: .bufferingNewest(1))
        let w = try watch(dir + "/state", callback: { _ in wake.yield() })
        let deadline = monotonicSeconds() + timeout
        let timer = Task {
            try? await Task.sleep(nanoseconds: UInt64(max(0, timeout) * 1e9) + 1_000_000)
            wake.yield()
        }
        defer {
            timer.cancel()
            try? unwatch(w)
            wake.finish()
        }
        var it = wakes.makeAsyncIterator()
        while true {
            let s = try state(at: dir)
            if predicate(s) { return s }
            if monotonicSeconds() >= deadline { throw XenBusError.timeout }
            guard await it.next() != nil else { throw XenBusError.closed }
        }
    }

    /// Toolstack side (libxl_device_*_add): creates both directories in one transaction
    /// with libxl's permissions — the backend dir owned by the backend domain and
    /// readable by the frontend, the frontend dir owned by the frontend domain and
    /// readable by the backend — cross-linked, both in state Initialising.
    /// `exclusive`: fail with EEXIST, checked in the same transaction, when
    /// the backend directory exists (a hotplug must not replace a device);
    /// else a leftover is replaced. A frontend directory is always replaced.
    public func createDevice(_ d: XenBusDevice, backend: [String: String] = [:],
                             frontend: [String: String] = [:], exclusive: Bool = false) throws {
        try transaction { t in
            let bePerms = [XSPerm(d.backendDomid, .none), XSPerm(d.frontendDomid, .read)]
            let fePerms = [XSPerm(d.frontendDomid, .none), XSPerm(d.backendDomid, .read)]
            // Only the backend directory says the device exists: the frontend
            // one is the guest's to make, and a guest must not be able to
            // refuse its toolstack a device (libxl__device_exists looks at
            // dom0's own record; a stale frontend directory is replaced).
            if exclusive, try t.readIfExists(d.backendPath) != nil { throw XenBusError.xs(.EEXIST) }
            try t.rmIfPresent(d.backendPath)
            try t.rmIfPresent(d.frontendPath)
            try t.mkdir(d.backendPath)
            try t.setPermissions(d.backendPath, bePerms)
            try t.mkdir(d.frontendPath)
            try t.setPermissions(d.frontendPath, fePerms)
            var be = backend
            be["frontend"] = d.frontendPath
            be["frontend-id"] = "\(d.frontendDomid)"
            be["online"] = be["online"] ?? "1"
            be["state"] = "\(XenbusState.initialising.rawValue)"
            var fe = frontend
            fe["backend"] = d.backendPath
            fe["backend-id"] = "\(d.backendDomid)"
            fe["state"] = "\(XenbusState.initialising.rawValue)"
            for (k, v) in be.sorted(by: { $0.key < $1.key }) { try t.write(d.backendPath + "/" + k, v) }
            for (k, v) in fe.sorted(by: { $0.key < $1.key }) { try t.write(d.frontendPath + "/" + k, v) }
        }
    }

    /// Toolstack side: removes both directories (libxl_device_*_remove after Closed).
    public func destroyDevice(_ d: XenBusDevice) throws {
        try transaction { t in
            try t.rmIfPresent(d.backendPath)
            try t.rmIfPresent(d.frontendPath)
        }
    }
}

extension XenBusTransaction {
    /// RM that also accepts a missing parent (xenstore's RM wants the parent to exist).
    public func rmIfPresent(_ path: String) throws(XenBusError) {
        do { try rm(path) } catch .xs(.ENOENT) {}
    }
}
