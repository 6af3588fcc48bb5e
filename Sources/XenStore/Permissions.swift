// Per-node permissions (docs/misc/xenstore.txt "PERMISSIONS"): the first entry names
// the owner and the access every domain not listed gets; later entries grant a
// specific domain none/read/write/both.

/// Domain id as used on the wire (domid_t).
public typealias DomID = UInt32

public struct XSAccess: OptionSet, Sendable, Hashable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    public static let read = XSAccess(rawValue: 1)
    public static let write = XSAccess(rawValue: 2)
    public static let owner = XSAccess(rawValue: 4)
    public static let none: XSAccess = []
    public static let both: XSAccess = [.read, .write]
    public static let all: XSAccess = [.read, .write, .owner]

    /// The wire letter: n, r, w or b.
    public var letter: Character {
        switch (contains(.read), contains(.write)) {
        case (true, true): return "b"
        case (true, false): return "r"
        case (false, true): return "w"
        case (false, false): return "n"
        }
    }
}

public struct XSPerm: Sendable, Hashable {
    public var domid: DomID
    public var access: XSAccess
    public init(_ domid: DomID, _ access: XSAccess) { self.domid = domid; self.access = access }

    /// Parses "r5", "w0", "b12", "n3". Mirrors xenstore_strings_to_perms.
    public init?(_ s: Substring) {
        guard let c = s.first else { return nil }
        switch c {
        case "n": access = .none
        case "r": access = .read
        case "w": access = .write
        case "b": access = .both
        default: return nil
        }
        let rest = s.dropFirst()
        guard !rest.isEmpty, rest.count <= 5, rest.allSatisfy({ $0.isASCII && $0.isNumber }),
              let id = UInt32(rest), id <= 0xFFFF else { return nil }
        domid = id
    }

    public var string: String { "\(access.letter)\(domid)" }
}

/// A node's permission list; never empty (entry 0 is the owner).
public struct XSPermissions: Sendable, Hashable {
    public var entries: [XSPerm]

    public init(owner: DomID, others: XSAccess = .none, acl: [XSPerm] = []) {
        entries = [XSPerm(owner, others)] + acl
    }
    public init?(entries: [XSPerm]) {
        guard !entries.isEmpty else { return nil }
        self.entries = entries
    }

    public var owner: DomID {
        get { entries[0].domid }
        set { entries[0].domid = newValue }
    }

    /// Drops the entries after the owner's that name `domid` (C's
    /// domain_adjust_node_perms for a released domain); whether any went.
    mutating func removeGrants(to domid: DomID) -> Bool {
        guard entries.dropFirst().contains(where: { $0.domid == domid }) else { return false }
        entries = [entries[0]] + entries.dropFirst().filter { $0.domid != domid }
        return true
    }

    /// Access of a connection acting as `domid` (with an optional SET_TARGET target).
    /// Mirrors perm_for_conn in C xenstored: privileged connections and the owner get
    /// everything; a listed domain gets its entry; everyone else gets entry 0's access.
    @inline(__always)
    public func access(for domid: DomID, privileged: Bool, target: DomID? = nil) -> XSAccess {
        if privileged { return .all }
        let e0 = entries[0]
        if e0.domid == domid || (target != nil && e0.domid == target!) { return .all }
        var i = 1
        while i < entries.count {
            let e = entries[i]
            if e.domid == domid || (target != nil && e.domid == target!) { return e.access }
            i += 1
        }
        return e0.access
    }

    /// GET_PERMS reply: "w0\0r5\0".
    public var wire: [UInt8] {
        var out: [UInt8] = []
        for e in entries { out.append(contentsOf: e.string.utf8); out.append(0) }
        return out
    }
}
