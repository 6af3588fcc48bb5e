import Glibc

/// Integers as xl reads them: C's strtoul/strtol with base 0, which libxl and
/// libxlu use for device numbers, rates and numeric settings.
enum CNumber {
    /// All of `s` as strtoull(s, &end, 0) reads digits: "0x"/"0X" then hex, a
    /// leading "0" then octal, otherwise decimal. nil when `s` is not wholly
    /// such a number (no blanks, no sign: strtoull would take both);
    /// `overflow` when it is past UInt64 (strtoull's ERANGE).
    static func unsigned(_ s: Substring) -> (value: UInt64, overflow: Bool)? {
        guard let first = s.utf8.first, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(first),
              !s.utf8.contains(0) else { return nil }
        return String(s).withCString { p -> (UInt64, Bool)? in
            var end: UnsafeMutablePointer<CChar>? = nil
            errno = 0
            let v = strtoull(p, &end, 0)
            guard let end, end.pointee == 0 else { return nil }
            return (UInt64(v), errno == ERANGE)
        }
    }

    /// All of `s` as strtol(s, &end, 0) reads it: leading blanks, an optional
    /// sign, then `unsigned`'s digits. nil when anything else is left over,
    /// nothing was read, or the value is past Int64 (strtol's ERANGE).
    static func signed(_ s: Substring) -> Int64? {
        var rest = s.drop { $0 == " " || $0 == "\t" || $0 == "\n" || $0 == "\r" || $0 == "\u{0B}" || $0 == "\u{0C}" }
        var negative = false
        if rest.first == "+" || rest.first == "-" {
            negative = rest.first == "-"
            rest = rest.dropFirst()
        }
        guard let (magnitude, overflow) = unsigned(rest), !overflow else { return nil }
        if negative { return magnitude <= UInt64(Int64.max) + 1 ? Int64(truncatingIfNeeded: 0 &- magnitude) : nil }
        return magnitude <= UInt64(Int64.max) ? Int64(magnitude) : nil
    }
}
