/// One disk in xl's disk specification syntax (xl-disk-configuration(5)):
/// `format=raw, vdev=xvda, access=rw, target=/path/disk.img`, or positionally
/// `target, format, vdev, access`. `target=` swallows the rest of the string,
/// commas included, as in xl.
public struct DiskSpec: Sendable, Equatable {
    public enum Access: String, Sendable { case readWrite = "w", readOnly = "r" }
    public var target: String
    public var format = "raw"
    public var vdev: String
    public var access: Access = .readWrite
    public var isCDROM = false
    public var discard = true
    public var script: String?

    /// The Linux/libxl device number of `vdev` (xvda = 51712), the `<devid>` of
    /// the backend and frontend directories.
    public var devid: UInt32 { (try? Self.devid(of: vdev)) ?? 0 }

    public init(parsing spec: String) throws(SpecError) {
        var target: String?, vdev: String?
        var format: String?, access: Access?
        var positional = 0
        var rest = Substring(spec)
        while !rest.isEmpty {
            let trimmed = rest.drop { $0 == " " || $0 == "\t" }
            if trimmed.hasPrefix("target=") {
                target = String(trimmed.dropFirst("target=".count)).trimmingSpaces
                break
            }
            let end = trimmed.firstIndex(of: ",") ?? trimmed.endIndex
            let item = String(trimmed[..<end]).trimmingSpaces
            rest = end == trimmed.endIndex ? "" : trimmed[trimmed.index(after: end)...]
            if let eq = item.firstIndex(of: "=") {
                let key = String(item[..<eq]), value = String(item[item.index(after: eq)...])
                switch key {
                case "format": format = value
                case "vdev": vdev = value
                case "access": access = try Self.access(value)
                case "devtype":
                    guard value == "cdrom" || value == "disk" else { throw SpecError("devtype must be cdrom or disk, not '\(value)'") }
                    isCDROM = value == "cdrom"
                case "script": script = value
                case "backendtype":
                    guard value == "phy" || value == "qdisk" else { throw SpecError("backendtype '\(value)' is not supported (phy or qdisk)") }
                case "backend": guard value == "0" || value == "Domain-0" else { throw SpecError("only dom0 backends exist here, not '\(value)'") }
                case "discard", "no-discard": discard = key == "discard"
                default: throw SpecError("unknown disk keyword '\(key)'")
                }
            } else {
                switch item {
                case "cdrom": isCDROM = true
                case "discard": discard = true
                case "no-discard": discard = false
                case "": if positional == 0 { positional = 1 } else { positional += 1 }  // empty positional
                default:
                    switch positional {
                    case 0: target = item
                    case 1: format = item
                    case 2: vdev = item
                    case 3: access = try Self.access(item)
                    default: throw SpecError("too many positional parameters at '\(item)'")
                    }
                    positional += 1
                }
            }
        }
        guard let vdev, !vdev.isEmpty else { throw SpecError("no vdev given (e.g. vdev=xvda)") }
        _ = try Self.devid(of: vdev)
        guard let target, !target.isEmpty else { throw SpecError("no target given (e.g. target=/path/disk.img)") }
        let fmt = format ?? "raw"
        guard fmt == "raw" else { throw SpecError("format '\(fmt)' is not supported: only raw images and block devices") }
        self.target = target
        self.vdev = vdev
        self.format = fmt
        if let access { self.access = access }
        if isCDROM && self.access == .readWrite && access == nil { self.access = .readOnly }
    }

    static func access(_ v: String) throws(SpecError) -> Access {
        switch v {
        case "rw", "w": return .readWrite
        case "ro", "r": return .readOnly
        default: throw SpecError("access must be rw or ro, not '\(v)'")
        }
    }

    /// libxl_device_disk_dev_number: xvdX[N] -> (202 << 8) | disk << 4 | part for
    /// disks below 16, the extended form (1 << 28) | disk << 8 | part above;
    /// hdX and sdX map to their Linux majors.
    public static func devid(of vdev: String) throws(SpecError) -> UInt32 {
        func split(_ s: Substring) -> (disk: UInt32, part: UInt32)? {
            // letters a..z, aa..zz (disk index), then an optional partition number
            let letters = s.prefix { ("a"..."z").contains($0) }
            guard !letters.isEmpty, letters.count <= 2 else { return nil }
            var disk: UInt32 = 0
            for c in letters.unicodeScalars { disk = disk * 26 + (c.value - 96) }
            disk -= 1
            let digits = s.dropFirst(letters.count)
            if digits.isEmpty { return (disk, 0) }
            guard let p = UInt32(digits), !digits.hasPrefix("0") else { return nil }
            return (disk, p)
        }
        let bad = SpecError("'\(vdev)' is not a virtual device name (xvda, xvdb1, hda, sda...)")
        if vdev.hasPrefix("xvd"), let (d, p) = split(vdev.dropFirst(3)) {
            if d < 16 && p < 16 { return 202 << 8 | d << 4 | p }
            guard d < (1 << 20), p < 256 else { throw bad }
            return 1 << 28 | d << 8 | p
        }
        if vdev.hasPrefix("hd"), let (d, p) = split(vdev.dropFirst(2)), d < 4, p < 64 {
            return (d < 2 ? 3 : 22) << 8 | (d % 2) << 6 | p
        }
        if vdev.hasPrefix("sd"), let (d, p) = split(vdev.dropFirst(2)), d < 16, p < 16 {
            return 8 << 8 | d << 4 | p
        }
        throw bad
    }
}

/// A bad device specification string; the caller adds where it came from.
public struct SpecError: Error, Equatable, CustomStringConvertible, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

extension String {
    var trimmingSpaces: String {
        String(self.drop { $0 == " " || $0 == "\t" }.reversed().drop { $0 == " " || $0 == "\t" }.reversed())
    }
}
