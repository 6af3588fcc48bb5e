/// Integers as xl reads them: C's strtoul/strtol with base 0, which libxl and
/// libxlu use for device numbers, rates and numeric settings.
enum CNumber {
    /// All of `s` as strtoull(s, &end, 0) reads digits: "0x"/"0X" then hex, a
    /// leading "0" then octal, otherwise decimal. nil when `s` is not wholly
    /// such a number (no blanks, no sign); `overflow` when it is past UInt64
    /// (strtoull's ERANGE).
    static func unsigned(_ s: Substring) -> (value: UInt64, overflow: Bool)? {
        var digits = s.utf8[...]
        var radix: UInt64 = 10
        if digits.starts(with: "0x".utf8) || digits.starts(with: "0X".utf8) {
            radix = 16
            digits = digits.dropFirst(2)
        } else if digits.first == UInt8(ascii: "0") && digits.count > 1 {
            radix = 8
            digits = digits.dropFirst()
        }
        guard !digits.isEmpty else { return nil }
        var value: UInt64 = 0
        var overflow = false
        for c in digits {
            let d: UInt64
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): d = UInt64(c - UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): d = UInt64(c - UInt8(ascii: "a") + 10)
            case UInt8(ascii: "A")...UInt8(ascii: "F"): d = UInt64(c - UInt8(ascii: "A") + 10)
            default: return nil
            }
            guard d < radix else { return nil }
            let (m, o1) = value.multipliedReportingOverflow(by: radix)
            let (a, o2) = m.addingReportingOverflow(d)
            overflow = overflow || o1 || o2
            value = a
        }
        return (value, overflow)
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
