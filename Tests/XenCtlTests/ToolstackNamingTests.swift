import Foundation
import Glibc
import Testing
@testable import XenCtl

/// Names the toolstack derives: the same run directory however it is spelt,
/// and domain names cut to Xen's 64 bytes, not 64 characters.
@Suite struct ToolstackNamingTests {
    /// Listings print what the guest wrote in its frontend directory (ports,
    /// grant refs) as the numbers they must be, as libxl's strtoul reads
    /// them: never its bytes (an escape sequence on the admin's terminal, a
    /// forged row).
    @Test func listingsPrintGuestValuesAsNumbersOnly() {
        #expect(Toolstack.guestNumber("17") == "17")
        #expect(Toolstack.guestNumber(nil) == "-1")
        #expect(Toolstack.guestNumber("\u{1B}]52;c;aGk=\u{07}") == "-1")
        #expect(Toolstack.guestNumber("1\nvbd 51712 forged") == "-1")
        #expect(Toolstack.guestNumber("99999999999") == "-1")
    }

    @Test func aRunDirectoryNamesTheSameNamespaceHoweverItIsSpelt() throws {
        let dir = NSTemporaryDirectory() + "naming-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir + "/run", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let link = dir + "/link"
        #expect(symlink(dir + "/run", link) == 0)
        let plain = Toolstack(runDir: dir + "/run")
        #expect(plain.runDir == dir + "/run")
        #expect(Toolstack(runDir: dir + "//run/./").runDir == dir + "/run")
        // Relative to the current directory (not changed here: the suites run in parallel in one process).
        let cwd = FileManager.default.currentDirectoryPath
        #expect(Toolstack(runDir: "a/./b/").runDir == (cwd == "/" ? "" : cwd) + "/a/b")
        let ns = plain.networkNamespace(of: 3)
        #expect(ns.hasPrefix("xen-3-"))
        for other in [Toolstack(runDir: dir + "/run/"), Toolstack(runDir: link)] {
            #expect(other.networkNamespace(of: 3) == ns, "\(other.runDir)")
        }
        #expect(Toolstack(runDir: "/run/swiftxen/").networkNamespace(of: 3) == "xen-3")
        // Guest uids: domain 3 of another run directory is not domain 3 of the
        // default one (both toolstacks number from 1), and its spelling does not matter.
        #expect(Toolstack(runDir: "/run/swiftxen").guestID(of: 3) == 0x7000_0003)
        let other = plain.guestID(of: 3)
        #expect(other != 0x7000_0003 && other & 0x7FFF == 3 && other >= 0x7000_8000 && other < 0x8000_0000)
        #expect(Toolstack(runDir: link).guestID(of: 3) == other)
        #expect(plain.guestID(of: 0x7FEF) < 0x8000_0000)
    }

    @Test func namesAreCutByUTF8Bytes() {
        let name = String(repeating: "é", count: 32)  // 64 bytes
        let cut = name.prefix(utf8: 64 - "-20261205T1200Z".utf8.count)
        #expect(cut.utf8.count == 48 && cut == String(repeating: "é", count: 24))
        #expect("abcé".prefix(utf8: 4) == "abc", "a character is never split")
        #expect("abc".prefix(utf8: 10) == "abc")
        #expect("abc".prefix(utf8: 0) == "")
    }
}
