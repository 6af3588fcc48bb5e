import Testing
import XenCtl

/// xl.cfg lexing as libxlu_cfg_l.l and libxlu_cfg.c do it: escapes in both
/// quote styles (xlu__cfgl_dequote), `+=` on strings (xlu__cfg_concat_vals),
/// numbers read with strtol(..., 0) from any atom (xlu_cfg_get_bounded_long).
@Suite struct XLConfigLexTests {
    func value(_ text: String) throws -> XLConfig.Value? { try XLConfig(parsing: text, file: "l.cfg")["v"] }

    @Test func escapesInBothQuoteStyles() throws {
        #expect(try value("v = 'a\\'b'\n") == .string("a'b"))
        #expect(try value("v = 'x\\\\y'\n") == .string("x\\y"))
        #expect(try value("v = 'say \\\"hi\\\"'\n") == .string("say \"hi\""))
        #expect(try value("v = \"it\\'s\"\n") == .string("it's"))
        #expect(try value("v = \"\\a\\b\\f\\n\\r\\t\\v\"\n") == .string("\u{07}\u{08}\u{0C}\n\r\t\u{0B}"))
        #expect(try value("v = 'tab\\there'\n") == .string("tab\there"))
        #expect(try value("v = [ 'a\\'b', \"c\\\\d\" ]\n") == .list([.string("a'b"), .string("c\\d")]))
    }

    @Test(arguments: [
        ("v = 'a\\qb'\n", "invalid character after backslash"),
        ("v = \"\\x41\"\n", "numeric escape"),
        ("v = \"\\101\"\n", "numeric escape"),
        ("v = 'a\\\nb'\n", "unterminated string"),
        ("v = 'abc\\'\n", "unterminated string"),
    ])
    func badEscapes(text: String, fragment: String) {
        do {
            _ = try XLConfig(parsing: text, file: "l.cfg")
            Issue.record("accepted \(text)")
        } catch {
            #expect(error.line == 1 && error.description.hasPrefix("l.cfg:1: ") && error.message.contains(fragment), "\(error)")
        }
    }

    /// Tokens xl's lexer does not have are its syntax errors, not settings
    /// to ignore or values to guess at: names are `[a-z][_0-9a-z]*`, numbers
    /// `[0-9][0-9a-fx]*`. Before, `Memory = 512` was taken and ignored (the
    /// guest got the default), and `inf`, `nan`, `1.5`, `-5`, `+5` lexed.
    @Test(arguments: [
        ("Memory = 512\n", "'Memory' is not a setting name"),
        ("memoRy = 512\n", "'memoRy' is not a setting name"),
        ("on-crash = 'destroy'\n", "'on-crash' is not a setting name"),
        ("_x = 1\n", "'_x' is not a setting name"),
        ("v = inf\n", "'inf' is not a value"),
        ("v = nan\n", "'nan' is not a value"),
        ("v = destroy\n", "'destroy' is not a value"),
        ("v = -5\n", "'-5' is not a value"),
        ("v = +5\n", "'+5' is not a value"),
        ("v = 1.5\n", "'1.5' is not a number"),
        ("v = 0x1F\n", "'0x1F' is not a number"),
        ("v = [ 1, 2.0 ]\n", "'2.0' is not a number"),
        ("namé = 1\n", "'namé' is not a setting name"),
        ("Memory+=1\n", "'Memory' is not a setting name"),
        ("v = 5é\n", "'5é' is not a number"),
    ])
    func tokensXlDoesNotHave(text: String, fragment: String) {
        let error = #expect(throws: ConfigError.self) { try XLConfig(parsing: text, file: "l.cfg") }
        #expect(error?.line == 1 && error?.description.hasPrefix("l.cfg:1: ") == true && error?.message.contains(fragment) == true,
                "\(String(describing: error))")
    }

    @Test func numbersAreKeptAsXlLexesThem() throws {
        #expect(try value("v = 0x1f\n") == .number("0x1f"))
        #expect(try value("v = 010\n") == .number("010"))
        #expect(try value("v = 1e5\n") == .number("1e5"), "a NUMBER token; strtol refuses it where a number is read")
        #expect(try XLConfig(parsing: "on_crash_2 = 'x'\n")["on_crash_2"] == .string("x"))
    }

    @Test func plusEqualsConcatenatesStrings() throws {
        let c = try XLConfig(parsing: "extra = \"console=hvc0\"\nextra += \" quiet\"\nextra += ' x=1'\n", file: "l.cfg")
        #expect(c["extra"] == .string("console=hvc0 quiet x=1"))
        #expect(c.line(of: "extra") == 3)
        #expect(try XLConfig(parsing: "extra += 'alone'\n")["extra"] == .string("alone"))
        #expect(try XLConfig(parsing: "vif = [ 'a' ]\nvif += [ 'b' ]\n")["vif"] == .list([.string("a"), .string("b")]))
        for text in ["disk = [ 'a' ]\ndisk += 'b'\n", "extra = 'a'\nextra += [ 'b' ]\n"] {
            do {
                _ = try XLConfig(parsing: text, file: "l.cfg")
                Issue.record("accepted \(text)")
            } catch {
                #expect(error.line == 2 && error.message.contains("can't add"), "\(error)")
            }
        }
    }

    /// `memory = "512"` and `memory = 0x200` are memory = 512 in xl.
    @Test func numbersAsStrtol() throws {
        func memory(_ v: String) throws -> UInt32 { try DomainConfig(try XLConfig(parsing: "name = 'x'\nmemory = \(v)\n", file: "m.cfg")).memory }
        #expect(try memory("512") == 512)
        #expect(try memory("0x200") == 512)
        #expect(try memory("\"512\"") == 512)
        #expect(try memory("'0x100'") == 256)
        #expect(try memory("010") == 8, "a leading 0 is octal, as strtol(..., 0) reads it")
        #expect(try memory("' 64'") == 64, "strtol skips leading blanks")
        let d = try DomainConfig(try XLConfig(parsing: "name = 'x'\nvcpus = '2'\nmax_event_channels = 0x40\n", file: "m.cfg"))
        #expect(d.vcpus == 2 && d.maxEventChannels == 64)
        for (v, fragment) in [("08", "memory must be"), ("'512MB'", "memory must be"), ("''", "memory must be"), ("'0x'", "memory must be"),
                              ("99999999999999999999", "memory must be")] {
            do {
                _ = try memory(v)
                Issue.record("accepted memory = \(v)")
            } catch {
                #expect("\(error)".hasPrefix("m.cfg:2: ") && "\(error)".contains(fragment), "\(error)")
            }
        }
        do {
            _ = try DomainConfig(try XLConfig(parsing: "name = 'x'\nmemory = 256\nmemory += 0\n", file: "m.cfg"))
            Issue.record("accepted memory +=")
        } catch {
            #expect(error.description.hasPrefix("m.cfg:3: ") && error.description.contains("can't use += with numbers"), "\(error)")
        }
    }
}
