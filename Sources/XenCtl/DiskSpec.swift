import Glibc
import XenHV

/// One disk in xl's disk specification syntax (xl-disk-configuration(5)), read
/// as libxlu_disk_l.l reads it: comma-separated `key=value` parameters, flags
/// and positional parameters, each positional filling the first still
/// unspecified of target, format, vdev, access
/// (`/img,raw,xvda,rw` = `vdev=xvda,/img,,rw` = `format=raw,vdev=xvda,access=rw,target=/img`);
/// `target=` takes the rest of the string, commas included. A parameter given
/// twice is an error unless its first value was empty; an empty value is the
/// default. The deprecated prefixes (`phy:`, `file:`, `tap:aio:`, `raw:`, ...)
/// are taken as xl takes them. Only raw images and block devices are served.
public struct DiskSpec: Sendable, Equatable {
    public enum Access: String, Sendable { case readWrite = "w", readOnly = "r" }
    public var target: String
    public var format = "raw"
    public var vdev: String
    public var access: Access = .readWrite
    public var isCDROM = false
    public var discard = true

    /// The Linux/libxl device number of `vdev` (xvda = 51712), the `<devid>` of
    /// the backend and frontend directories.
    public var devid: UInt32 { (try? Self.devid(of: vdev)) ?? 0 }

    public init(parsing spec: String) throws(SpecError) {
        try self.init(parsing: [spec])
    }

    /// One disk given in several strings, as `xl block-attach DOMAIN
    /// phy:/dev/sdb xvdb w` gives it (xlu_disk_parse's nspecs): each is read
    /// as above, the positional parameters counted across them, and a
    /// `target=` takes the rest of its own string only.
    public init(parsing specs: [String]) throws(SpecError) {
        var p = Parse()
        for spec in specs { try Self.read(spec, into: &p) }
        try self.init(p)
    }

    private static func read(_ spec: String, into p: inout Parse) throws(SpecError) {
        var rest = Substring(spec)
        while true {
            rest = rest.drop { $0 == " " || $0 == "\t" || $0 == "\n" }
            if rest.isEmpty { break }
            if rest.hasPrefix("target=") {
                // Everything to the end, trailing blanks too; one trailing comma goes (STRIP).
                var value = rest.dropFirst("target=".count)
                if value.hasSuffix(",") { value = value.dropLast() }
                try Parse.save("target", &p.target, String(value))
                break
            }
            if let (word, after) = try Self.deprecatedPrefix(rest) {
                try p.deprecatedPrefix(word)
                rest = after
                continue
            }
            let end = rest.firstIndex(of: ",") ?? rest.endIndex
            let item = String(rest[..<end]).trimmingSpaces
            rest = end == rest.endIndex ? "" : rest[rest.index(after: end)...]
            if let eq = item.firstIndex(of: "=") {
                try p.keyword(String(item[..<eq]), String(item[item.index(after: eq)...]))
            } else {
                try p.flagOrPositional(item)
            }
        }
    }

    private init(_ p: Parse) throws(SpecError) {
        // xlu_disk_parse's checks, then what this backend serves.
        var fmt = p.format ?? "raw"
        var access = p.access
        if p.isCDROM {
            access = .readOnly  // xl: every cdrom is read-only
            if (p.target ?? "").isEmpty { fmt = "empty" }
        }
        guard let vdev = p.vdev, !vdev.isEmpty else { throw SpecError("no vdev given (e.g. vdev=xvda)") }
        _ = try Self.devid(of: vdev)
        guard fmt != "empty" else { throw SpecError("an empty cdrom drive (no target) is not supported") }
        guard let target = p.target, !target.isEmpty else { throw SpecError("no target given (e.g. target=/path/disk.img)") }
        guard fmt == "raw" else { throw SpecError("format '\(fmt)' is not supported: only raw images and block devices") }
        self.target = target
        self.vdev = vdev
        self.format = fmt
        self.access = access
        self.isCDROM = p.isCDROM
        self.discard = p.discard
    }

    /// The lexer's state: nil is unspecified, "" specified empty (the default).
    private struct Parse {
        var target: String?, format: String?, vdev: String?
        var backend: String?, backendType: String?, specification: String?
        var access: Access = .readWrite
        var accessSet = false
        var isCDROM = false, discard = true
        var hadDeprecatedPrefix = false

        /// savestring: a string parameter may be given again only if it was empty.
        static func save(_ what: String, _ slot: inout String?, _ value: String) throws(SpecError) {
            if let old = slot, !old.isEmpty { throw SpecError("\(what) respecified: '\(value)' after '\(old)'") }
            slot = value
        }

        /// DSET: an enum parameter may be given again only with the same value.
        static func set(_ what: String, _ slot: inout String?, _ value: String) throws(SpecError) {
            if let old = slot, old != value { throw SpecError("\(what) respecified: '\(value)' after '\(old)'") }
            slot = value
        }

        mutating func setFormat(_ v: String) throws(SpecError) {
            let f = v.isEmpty ? "raw" : v
            guard ["raw", "qcow", "qcow2", "vhd", "qed", "empty"].contains(f) else {
                throw SpecError("unknown value for format '\(v)' (raw, qcow, qcow2, vhd, qed)")
            }
            try Self.set("format", &format, f)
        }

        /// A deprecated `<vdev>:<devtype>`; false (and nothing done) without a colon.
        mutating func vdevAndDevtype(_ item: String) throws(SpecError) -> Bool {
            guard let colon = item.lastIndex(of: ":") else { return false }
            try Self.save("vdev", &vdev, String(item[..<colon]))
            switch item[item.index(after: colon)...] {
            case "cdrom": isCDROM = true
            case "disk": isCDROM = false
            case let t: throw SpecError("unknown deprecated type '\(t)' in '\(item)' (cdrom or disk)")
            }
            return true
        }

        mutating func deprecatedPrefix(_ word: String) throws(SpecError) {
            hadDeprecatedPrefix = true
            switch word {
            case "raw", "qcow", "qcow2", "vhd": try setFormat(word)
            case "iscsi", "nbd", "enbd", "drbd": throw Self.noScript("'\(word):' (script=block-\(word))")
            default: break  // tapdisk, tap, tap2, aio, ioemu, file, phy: stripped and ignored, as in xl
            }
        }

        static func noScript(_ what: String) -> SpecError {
            SpecError("\(what): block scripts are not supported; blkback opens the target itself (give a file or block device path)")
        }

        mutating func keyword(_ key: String, _ value: String) throws(SpecError) {
            switch key {
            case "format": try setFormat(value)
            case "vdev": try Self.save("vdev", &vdev, value)
            case "access": access = try DiskSpec.access(value)
            case "devtype":
                guard value == "cdrom" || value == "disk" else { throw SpecError("devtype must be cdrom or disk, not '\(value)'") }
                isCDROM = value == "cdrom"
            case "backend":
                try Self.save("backend", &backend, value)
                guard ["", "0", "Domain-0"].contains(value) else { throw SpecError("only dom0 backends exist here, not '\(value)'") }
            case "backendtype":
                guard ["phy", "qdisk", "tap", "standalone"].contains(value) else {
                    throw SpecError("unknown value for backendtype '\(value)' (phy, qdisk, tap, standalone)")
                }
                try Self.set("backendtype", &backendType, value)
                guard value == "phy" || value == "qdisk" else {
                    throw SpecError("backendtype '\(value)' is not supported (phy or qdisk: one blkback serves both)")
                }
            case "specification":
                guard value == "xen" || value == "virtio" else { throw SpecError("unknown value for specification '\(value)' (xen)") }
                try Self.set("specification", &specification, value)
                guard value == "xen" else { throw SpecError("specification '\(value)' is not supported: disks are Xen vbds") }
            case "script": throw Self.noScript("script=\(value)")
            case "colo-host", "colo-port", "colo-export", "active-disk", "hidden-disk":
                throw SpecError("\(key)= is not supported: COLO replication is not implemented")
            case "grant_usage": throw SpecError("grant_usage= is not supported: it is for virtio disks")
            default: throw SpecError("unknown disk parameter '\(key)'")
            }
        }

        mutating func flagOrPositional(_ item: String) throws(SpecError) {
            switch item {
            case "cdrom": isCDROM = true
            case "discard": discard = true
            case "no-discard": discard = false
            // O_DIRECT is blkback's own choice; the flag only lifts a qdisk workaround.
            case "direct-io-safe": break
            case "no-colo", "trusted": break  // the defaults
            case "colo": throw SpecError("colo is not supported: COLO replication is not implemented")
            case "untrusted": throw SpecError("untrusted is not supported: the guest's blkfront always trusts dom0's backend")
            default: try positional(item)
            }
        }

        /// The rule for parameters without `=`: the first unspecified of
        /// target, format (unless a deprecated prefix gave it), vdev, access.
        mutating func positional(_ item: String) throws(SpecError) {
            if target == nil {
                target = item
            } else if !hadDeprecatedPrefix && format == nil {
                // xend's empty cdrom: ",hdc:cdrom,r".
                if target == "", try vdevAndDevtype(item) { format = "empty" } else { try setFormat(item) }
            } else if vdev == nil {
                if try !vdevAndDevtype(item) { try Self.save("vdev", &vdev, item) }
            } else if !accessSet {
                accessSet = true
                access = try DiskSpec.access(item)
            } else {
                throw SpecError("too many positional parameters at '\(item)'")
            }
        }
    }

    /// A deprecated `<word>:` prefix at the start of `s`, as the lexer's
    /// prefix rules take it: a known one is returned with what follows it; an
    /// unknown one followed by the end or a non-alphanumeric is an error;
    /// anything else (`xvda:cdrom`, `/srv/a:b`) is no prefix.
    static func deprecatedPrefix(_ s: Substring) throws(SpecError) -> (String, Substring)? {
        func lowerOrDigit(_ c: Character) -> Bool { ("a"..."z").contains(c) || ("0"..."9").contains(c) }
        let word = s.prefix(while: lowerOrDigit)
        guard let first = word.first, ("a"..."z").contains(first), s.dropFirst(word.count).first == ":" else { return nil }
        let after = s.dropFirst(word.count + 1)
        if ["raw", "qcow", "qcow2", "vhd", "iscsi", "nbd", "enbd", "drbd", "tapdisk", "tap", "tap2", "aio", "ioemu", "file", "phy"]
            .contains(String(word)) {
            return (String(word), after)
        }
        if let c = after.first, lowerOrDigit(c) { return nil }
        throw SpecError("unknown deprecated disk prefix '\(word):'")
    }

    /// The spec with a relative target made absolute against `directory`
    /// (xenctl's current directory): blkback opens the target from its own.
    public func resolvingTarget(against directory: String) -> DiskSpec {
        guard !target.hasPrefix("/") else { return self }
        var d = self
        d.target = (directory.hasSuffix("/") ? directory : directory + "/") + target
        return d
    }

    /// This process's current directory, or nil if it has none (removed).
    public static func currentDirectory() -> String? {
        guard let p = getcwd(nil, 0) else { return nil }
        defer { free(p) }
        return String(cString: p)
    }

    static func access(_ v: String) throws(SpecError) -> Access {
        switch v {
        case "rw", "w", "": return .readWrite
        case "ro", "r": return .readOnly
        default: throw SpecError("access must be rw or ro, not '\(v)'")
        }
    }

    /// libxl__device_disk_dev_number, with docs/misc/vbd-interface.txt's
    /// numbers: `d<N>p<M>` (and `d<N>`, partition 0) and `xvd<letters>[M]`
    /// (any number of letters, bijective base 26) are Xen disk N partition M:
    /// 202 << 8 | N << 4 | M up to disk and partition 15, otherwise
    /// 1 << 28 | N << 8 | M (N < 2^20, M < 256). A plain number (decimal, 0x
    /// hex or 0 octal, at most 2^31-1) is the number itself. hdX (disks 0-3,
    /// partitions 0-63) and sdX (0-15, 0-15) map to the Linux IDE and SCSI
    /// majors. Partition numbers have no leading zeros.
    public static func devid(of vdev: String) throws(SpecError) -> UInt32 {
        func xen(_ disk: UInt32, _ part: UInt32) -> UInt32 {
            disk <= 15 && part <= 15 ? 202 << 8 | disk << 4 | part : 1 << 28 | disk << 8 | part
        }
        if let (d, p) = diskAndPartition(vdev), d < 1 << 20, p < 256 { return xen(UInt32(d), UInt32(p)) }
        if let (d, p) = letters(vdev, after: "xvd", maxDisk: (1 << 20) - 1, maxPartition: 255) { return xen(d, p) }
        if let (n, over) = CNumber.unsigned(vdev[...]), !over, n <= UInt64(Int32.max) { return UInt32(n) }
        if let (d, p) = letters(vdev, after: "hd", maxDisk: 3, maxPartition: 63) { return (d < 2 ? 3 : 22) << 8 | (d & 1) << 6 | p }
        if let (d, p) = letters(vdev, after: "sd", maxDisk: 15, maxPartition: 15) { return 8 << 8 | d << 4 | p }
        throw SpecError("'\(vdev)' is not a virtual device name (xvda, xvdb1, d0p1, hda, sda or a device number such as 51712), or is out of range")
    }

    /// `d<N>p<M>` or `d<N>`, N and M as C's %i reads them (no sign, no blanks).
    static func diskAndPartition(_ s: String) -> (UInt64, UInt64)? {
        guard s.hasPrefix("d") else { return nil }
        let body = s.dropFirst()
        let parts = body.split(separator: "p", maxSplits: 1, omittingEmptySubsequences: false)
        guard let (d, dOver) = CNumber.unsigned(parts[0]), !dOver else { return nil }
        if parts.count == 1 { return (d, 0) }
        guard let (p, pOver) = CNumber.unsigned(parts[1]), !pOver else { return nil }
        return (d, p)
    }

    /// device_virtdisk_matches: `prefix`, one or more letters a-z (the disk
    /// index, bijective base 26: a = 0, z = 25, aa = 26), then an optional
    /// decimal partition without leading zeros.
    static func letters(_ s: String, after prefix: String, maxDisk: UInt32, maxPartition: UInt32) -> (UInt32, UInt32)? {
        guard s.hasPrefix(prefix) else { return nil }
        let rest = s.utf8.dropFirst(prefix.utf8.count)
        let letters = rest.prefix { (UInt8(ascii: "a")...UInt8(ascii: "z")).contains($0) }
        guard !letters.isEmpty else { return nil }
        var disk: UInt64 = 0
        for c in letters {
            disk = disk * 26 + UInt64(c - UInt8(ascii: "a")) + 1
            guard disk - 1 <= UInt64(maxDisk) else { return nil }
        }
        let digits = rest.dropFirst(letters.count)
        if digits.isEmpty { return (UInt32(disk - 1), 0) }
        guard digits.first != UInt8(ascii: "0"), digits.count <= 10,
              digits.allSatisfy({ (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) }),
              let part = UInt64(String(decoding: digits, as: UTF8.self)), part <= UInt64(maxPartition) else { return nil }
        return (UInt32(disk - 1), UInt32(part))
    }
}

/// A bad device specification string; the caller adds where it came from.
public struct SpecError: Error, Equatable, CustomStringConvertible, Sendable {
    public let message: String
    /// Control characters of the input it quotes are escaped: one line, and no
    /// escape sequence reaches the user's terminal.
    public init(_ message: String) { self.message = message.escapingControlCharacters }
    public var description: String { message }
}

extension String {
    var trimmingSpaces: String {
        String(self.drop { $0 == " " || $0 == "\t" }.reversed().drop { $0 == " " || $0 == "\t" }.reversed())
    }
}
