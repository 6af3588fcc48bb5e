import XenHV

/// A parsed xl.cfg file (xl.cfg(5)): `KEY = VALUE` settings, values being
/// strings ("..." or '...', with xl's backslash escapes in both), numbers, or
/// lists `[ ... ]` that may span lines; `#` starts a comment; `;` or a newline
/// ends a setting; `+=` appends to a list or a string (xlu__cfg_set_store).
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
    /// `appended`: set with `+=` (its value already holds what it added to).
    public private(set) var settings: [(key: String, value: Value, line: Int, appended: Bool)] = []
    public let file: String

    public static func == (a: XLConfig, b: XLConfig) -> Bool {
        a.file == b.file && a.settings.map(\.key) == b.settings.map(\.key) && a.settings.map(\.value) == b.settings.map(\.value)
    }

    public subscript(key: String) -> Value? { settings.last { $0.key == key }?.value }
    public func line(of key: String) -> Int? { settings.last { $0.key == key }?.line }
    /// Whether the setting in force for `key` was made with `+=` (xl refuses
    /// such a setting where it reads a number).
    public func isAppended(_ key: String) -> Bool { settings.last { $0.key == key }?.appended ?? false }

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
            var stored = value
            // xlu__cfg_concat_vals: the earlier value and the added one joined,
            // lists to lists and strings (numbers are strings to xl) to strings.
            if append, let old = self[key] {
                switch (old, value) {
                case (.list(let a), .list(let b)): stored = .list(a + b)
                case (.string(let a), .string(let b)), (.string(let a), .number(let b)),
                     (.number(let a), .string(let b)), (.number(let a), .number(let b)):
                    stored = .string(a + b)
                default:
                    throw ConfigError(file: file, line: line, message: "'\(key) +=': can't add [list] to \"string\" or vice versa")
                }
            }
            settings.append((key, stored, line, append))
        }
    }

    struct Parser {
        let s: [Unicode.Scalar]
        let file: String
        var i = 0
        var line = 1
        /// Lists open around the parser's position.
        var depth = 0
        static let maxDepth = 32
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

        /// A setting name as xl lexes it (IDENT: `[a-z][_0-9a-z]*`): an upper-case
        /// letter anywhere is xl's syntax error, not a setting it ignores.
        mutating func identifier() throws(ConfigError) -> String {
            guard let c = peek, ("a"..."z").contains(c) else {
                let word = self.word()
                throw error(word.isEmpty ? peek.map { "unexpected '\($0)' where a setting name was expected" } ?? "unexpected end of file"
                            : "'\(word)' is not a setting name (lower-case letters, digits and '_', starting with a letter)")
            }
            var out = ""
            while let c = peek, ("a"..."z").contains(c) || ("0"..."9").contains(c) || c == "_" {
                out.unicodeScalars.append(c)
                advance()
            }
            if let c = peek, c.properties.isAlphabetic || c == "." || c == "-" {
                let rest = word()
                throw error("'\(out)\(rest)' is not a setting name (lower-case letters, digits and '_', starting with a letter)")
            }
            return out
        }

        /// What a bad token looked like, for its error: everything from here
        /// to a blank, a quote or one of `= , ; [ ] #` (or a `+=`).
        mutating func word() -> String {
            var out = ""
            while let c = peek, !" \t\r\n\"'=,;[]#".unicodeScalars.contains(c),
                  !(c == "+" && i + 1 < s.count && s[i + 1] == "=") {
                out.unicodeScalars.append(c)
                advance()
            }
            return out
        }

        /// A value: a quoted string, a list, or a number as xl lexes it
        /// (NUMBER: `[0-9][0-9a-fx]*`, kept as text and read with strtol
        /// where a number is wanted). `inf`, `-5`, `1.5` or a bare word are
        /// xl's syntax errors.
        mutating func value() throws(ConfigError) -> Value {
            guard let c = peek else { throw error("missing value") }
            switch c {
            case "\"", "'": return .string(try quoted(c))
            case "[": return .list(try list())
            case "0"..."9":
                var out = ""
                while let d = peek, ("0"..."9").contains(d) || ("a"..."f").contains(d) || d == "x" {
                    out.unicodeScalars.append(d)
                    advance()
                }
                if let d = peek, d.properties.isAlphabetic || d == "." || d == "-" || d == "+" {
                    let rest = word()
                    throw error("'\(out)\(rest)' is not a number (xl reads digits, or 0x and hex digits; strings need quotes)")
                }
                return .number(out)
            default:
                let word = self.word()
                throw error(word.isEmpty ? "unexpected '\(c)' where a value was expected"
                            : "'\(word)' is not a value (strings need quotes; numbers are digits, or 0x and hex digits)")
            }
        }

        /// A quoted string as xl lexes it (`'([^'\\\n]|\\.)*'`, the same with
        /// `"`) and xlu__cfgl_dequote unescapes it, in either quote style:
        /// \\ \' \" \a \b \f \n \r \t \v. xl's numeric escapes never yield
        /// their character (\xHH is always refused, \ooo is dropped), so both
        /// are refused here.
        mutating func quoted(_ q: Unicode.Scalar) throws(ConfigError) -> String {
            let start = line
            advance()
            var out = ""
            while let c = peek, c != "\n" {
                advance()
                if c == q { return out }
                guard c == "\\" else {
                    out.unicodeScalars.append(c)
                    continue
                }
                guard let e = peek, e != "\n" else { break }
                advance()
                switch e {
                case "\\", "\"", "'": out.unicodeScalars.append(e)
                case "a": out += "\u{07}"
                case "b": out += "\u{08}"
                case "f": out += "\u{0C}"
                case "n": out += "\n"
                case "r": out += "\r"
                case "t": out += "\t"
                case "v": out += "\u{0B}"
                case "x", "0"..."7":
                    throw error("numeric escape '\\\(e)...' in a quoted string is not supported (xl's own reading of it loses the character)")
                default: throw error("invalid character after backslash in quoted string: '\\\(e)'")
                }
            }
            throw ConfigError(file: file, line: start, message: "unterminated string")
        }

        mutating func list() throws(ConfigError) -> [Value] {
            let start = line
            // Lists nest (a value is an atom or a list), but not without end:
            // a deep enough one would overflow the stack of this recursion.
            guard depth < Self.maxDepth else { throw error("lists nested more than \(Self.maxDepth) deep") }
            depth += 1
            defer { depth -= 1 }
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
    /// Control characters of the file name and of the input the message
    /// quotes are escaped (``String/escapingControlCharacters``).
    public init(file: String, line: Int, message: String) {
        self.file = file.escapingControlCharacters
        self.line = line
        self.message = message.escapingControlCharacters
    }
    public var description: String { "\(file):\(line): \(message)" }
}
