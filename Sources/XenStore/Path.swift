// Node names (docs/misc/xenstore.txt "PATHS"): absolute "/a/b", relative names resolve
// under /local/domain/<domid>/, characters [A-Za-z0-9-/_@], no "//", no trailing "/".

public enum XSPath {
    public static let absMax = 3072   // XENSTORE_ABS_PATH_MAX
    public static let relMax = 2048   // XENSTORE_REL_PATH_MAX

    public static func domainPath(_ domid: DomID) -> String { "/local/domain/\(domid)" }

    @inline(__always)
    static func validChar(_ c: UInt8) -> Bool {
        switch c {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
             UInt8(ascii: "0")...UInt8(ascii: "9"),
             UInt8(ascii: "-"), UInt8(ascii: "/"), UInt8(ascii: "_"), UInt8(ascii: "@"):
            return true
        default: return false
        }
    }

    /// Canonicalizes a path as sent by a connection acting as `domid`.
    /// - Parameters:
    ///   - allowSpecial: accept "@introduceDomain"-style names (watches only).
    ///   - localLimit: the path-length quota applied to the part after
    ///     /local/domain/<n>/ (unprivileged connections); nil = unlimited.
    /// - Returns: the absolute path and whether the caller used a relative name.
    public static func canonicalize(_ b: UnsafeRawBufferPointer, domid: DomID,
                                    allowSpecial: Bool = false,
                                    localLimit: Int? = nil) throws(XSError) -> (path: String, relative: Bool) {
        guard let first = b.first else { throw .EINVAL }
        if first == UInt8(ascii: "@") {
            guard allowSpecial, b.count > 1, b.count <= absMax else { throw .EINVAL }
            for c in b where !validChar(c) { throw .EINVAL }
            return (String(xsBytes: b), false)
        }
        let relative = first != UInt8(ascii: "/")
        // Validate the bytes as sent: characters, "//", trailing "/".
        var prevSlash = false
        for c in b {
            guard validChar(c) else { throw .EINVAL }
            let slash = c == UInt8(ascii: "/")
            if slash && prevSlash { throw .EINVAL }
            prevSlash = slash
        }
        if relative {
            if prevSlash { throw .EINVAL }
            let path = "/local/domain/\(domid)/" + String(xsBytes: b)
            try check(path, count: path.utf8.count, localLimit: localLimit)
            return (path, true)
        }
        if prevSlash && b.count > 1 { throw .EINVAL }
        let path = String(xsBytes: b)
        try check(path, count: b.count, localLimit: localLimit)
        return (path, false)
    }

    public static func canonicalize(_ s: String, domid: DomID, allowSpecial: Bool = false,
                                    localLimit: Int? = nil) throws(XSError) -> (path: String, relative: Bool) {
        let bytes = Array(s.utf8)
        let r: Result<(path: String, relative: Bool), XSError> = bytes.withUnsafeBytes { u in
            do throws(XSError) {
                return .success(try canonicalize(u, domid: domid, allowSpecial: allowSpecial, localLimit: localLimit))
            } catch { return .failure(error) }
        }
        return try r.get()
    }

    @inline(__always)
    static func check(_ path: String, count: Int, localLimit: Int?) throws(XSError) {
        if count > absMax { throw .EINVAL }
        guard let limit = localLimit else { return }
        // Mirrors is_valid_nodename: the quota covers what follows /local/domain/<n>/.
        var local = count
        let prefix = "/local/domain/"
        if path.utf8.starts(with: prefix.utf8) {
            var u = path.utf8.dropFirst(prefix.utf8.count)
            var digits = 0
            while let c = u.first, c >= UInt8(ascii: "0"), c <= UInt8(ascii: "9"), digits < 5 {
                u = u.dropFirst(); digits += 1
            }
            if digits > 0, u.first == UInt8(ascii: "/") {
                local = count - (prefix.utf8.count + digits + 1)
            }
        }
        if local > limit { throw .EINVAL }
    }

    /// Parent of an absolute path ("/a/b" -> "/a", "/a" -> "/"); nil for "/".
    @inline(__always)
    public static func parent(_ p: String) -> String? {
        if p == "/" { return nil }
        guard let i = p.utf8.lastIndex(of: UInt8(ascii: "/")) else { return nil }
        if i == p.utf8.startIndex { return "/" }
        return String(p[p.startIndex..<i])
    }

    /// Last component of an absolute path.
    @inline(__always)
    public static func basename(_ p: String) -> Substring {
        guard let i = p.utf8.lastIndex(of: UInt8(ascii: "/")) else { return p[...] }
        return p[p.index(after: i)...]
    }

    @inline(__always)
    public static func child(_ parent: String, _ name: some StringProtocol) -> String {
        parent == "/" ? "/" + name : parent + "/" + name
    }

    /// True if `p` equals `ancestor` or lies below it (component-wise).
    @inline(__always)
    public static func isSelfOrDescendant(_ p: String, of ancestor: String) -> Bool {
        if ancestor == "/" { return p.utf8.first == UInt8(ascii: "/") }
        guard p.utf8.starts(with: ancestor.utf8) else { return false }
        let n = ancestor.utf8.count
        if p.utf8.count == n { return true }
        return p.utf8[p.utf8.index(p.utf8.startIndex, offsetBy: n)] == UInt8(ascii: "/")
    }

    /// Strips "/local/domain/<domid>/" for events on watches registered relatively.
    public static func relativize(_ p: String, domid: DomID) -> String {
        let prefix = "/local/domain/\(domid)/"
        if p.hasPrefix(prefix) { return String(p.dropFirst(prefix.count)) }
        return p
    }
}
