/// A parsed xl.cfg file (xl.cfg(5)): `KEY = VALUE` settings, values being
/// strings ("..." or '...'), numbers, or lists `[ ... ]` that may span lines;
/// `#` starts a comment; `;` or a newline ends a setting; `+=` appends to a list.
public struct XLConfig: Sendable, Equatable {
    public indirect enum Value: Sendable, Equatable {
        case string(String)
        case number(String)
        case list([Value])

        public var string: String? {
            switch self { case .string(let s), .number(let s): s; case .list: nil }
        }
    }

    /// Settings in file order (later settings of the same key win, as in xl).
    public private(set) var settings: [(key: String, value: Value, line: Int)] = []
    public let file: String

    public static func == (a: XLConfig, b: XLConfig) -> Bool {
        a.file == b.file && a.settings.map(\.key) == b.settings.map(\.key) && a.settings.map(\.value) == b.settings.map(\.value)
    }

    public subscript(key: String) -> Value? { settings.last { $0.key == key }?.value }
    public func line(of key: String) -> Int? { settings.last { $0.key == key }?.line }

    /// Parses `text`; `file` names it in errors.
    public init(parsing text: String, file: String = "<config>") throws(ConfigError) {
        self.file = file
        var p = Parser(Array(text.unicodeScalars), file: file)
        while true {
            p.skipBlank(newlines: true)
            guard !p.atEnd else { break }
            let line = p.line
            let key = try p.identifier()
            p.skipBlank(newlines: false)
            var append = false
            if p.peek == "+" { p.advance(); append = true }
            guard p.peek == "=" else { throw p.error("expected '=' after '\(key)'") }
            p.advance()
            p.skipBlank(newlines: false)
            let value = try p.value()
            p.skipBlank(newlines: false)
            guard p.atEnd || p.peek == "\n" || p.peek == ";" else {
                throw p.error("unexpected '\(p.peek!)' after the value of '\(key)'")
            }
            if p.peek == ";" { p.advance() }
            if append, let i = settings.lastIndex(where: { $0.key == key }), case .list(let old) = settings[i].value,
               case .list(let more) = value {
                settings[i].value = .list(old + more)
            } else if append, settings.contains(where: { $0.key == key }) {
                throw ConfigError(file: file, line: line, message: "'+=' needs a list for '\(key)'")
            } else {
                settings.append((key, value, line))
            }
        }
    }

    struct Parser {
        let s: [Unicode.Scalar]
        let file: String
        var i = 0
        var line = 1
        init(_ s: [Unicode.Scalar], file: String) { self.s = s; self.file = file }

        var atEnd: Bool { i >= s.count }
        var peek: Unicode.Scalar? { atEnd ? nil : s[i] }
        mutating func advance() {
            if s[i] == "\n" { line += 1 }
            i += 1
        }
        func error(_ m: String) -> ConfigError { ConfigError(file: file, line: line, message: m) }

        mutating func skipBlank(newlines: Bool) {
            while let c = peek {
                if c == " " || c == "\t" || c == "\r" || (newlines && (c == "\n" || c == ";")) {
                    advance()
                } else if c == "#" {
                    while let d = peek, d != "\n" { _ = d; advance() }
                } else {
                    return
                }
            }
        }

        mutating func identifier() throws(ConfigError) -> String {
            var out = ""
            while let c = peek, c == "_" || c.properties.isAlphabetic && c.isASCII || (!out.isEmpty && ("0"..."9").contains(c)) {
                out.unicodeScalars.append(c)
                advance()
            }
            guard !out.isEmpty else { throw error(peek.map { "unexpected '\($0)' where a setting name was expected" } ?? "unexpected end of file") }
            return out
        }

        mutating func value() throws(ConfigError) -> Value {
            guard let c = peek else { throw error("missing value") }
            switch c {
            case "\"", "'": return .string(try quoted(c))
            case "[": return .list(try list())
            default:
                var out = ""
                while let d = peek, d.properties.isAlphabetic && d.isASCII || ("0"..."9").contains(d) || d == "." || d == "-" || d == "+" || d == "x" {
                    out.unicodeScalars.append(d)
                    advance()
                }
                guard !out.isEmpty, Double(out) != nil || UInt64(out.dropFirst(2), radix: 16) != nil && out.hasPrefix("0x") else {
                    throw error(out.isEmpty ? "unexpected '\(c)' where a value was expected" : "'\(out)' is not a number (strings need quotes)")
                }
                return .number(out)
            }
        }

        mutating func quoted(_ q: Unicode.Scalar) throws(ConfigError) -> String {
            let start = line
            advance()
            var out = ""
            while let c = peek {
                advance()
                if c == q { return out }
                if c == "\n" { break }
                if c == "\\" && q == "\"" {
                    guard let e = peek else { break }
                    advance()
                    switch e {
                    case "n": out += "\n"
                    case "t": out += "\t"
                    case "r": out += "\r"
                    case "\\", "\"", "'": out.unicodeScalars.append(e)
                    default: throw error("unknown escape '\\\(e)'")
                    }
                } else {
                    out.unicodeScalars.append(c)
                }
            }
            throw ConfigError(file: file, line: start, message: "unterminated string")
        }

        mutating func list() throws(ConfigError) -> [Value] {
            let start = line
            advance()
            var items: [Value] = []
            while true {
                skipBlank(newlines: true)
                guard let c = peek else { throw ConfigError(file: file, line: start, message: "unterminated list") }
                if c == "]" { advance(); return items }
                items.append(try value())
                skipBlank(newlines: true)
                if peek == "," { advance(); continue }
                if peek == "]" { continue }
                guard let c = peek else { throw ConfigError(file: file, line: start, message: "unterminated list") }
                throw error("expected ',' or ']' in list, found '\(c)'")
            }
        }
    }
}

/// A configuration error: one line naming the file, the line and the problem.
public struct ConfigError: Error, Equatable, CustomStringConvertible, Sendable {
    public let file: String
    public let line: Int
    public let message: String
    public init(file: String, line: Int, message: String) {
        self.file = file
        self.line = line
        self.message = message
    }
    public var description: String { "\(file):\(line): \(message)" }
}
