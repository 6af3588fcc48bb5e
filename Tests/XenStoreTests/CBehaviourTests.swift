// Behaviour where C xenstored (tools/xenstored/core.c, transaction.c, watch.c) is the
// reference and an audit found us different: each test names the C function it follows.
import CXen
import Glibc
import Testing
@testable import XenStore

private func home(_ core: XenStoreCore, _ d: DomID) -> CoreClient {
    let dom0 = CoreClient(core)
    dom0.mkdir("/local/domain/\(d)"); dom0.setPerms("/local/domain/\(d)", ["n\(d)"])
    return dom0
}

/// "<gen>\0\0": send_directory_part's answer for an offset at or past the end.
private func isEmptyPart(_ m: CoreClient.Msg) -> Bool {
    guard m.error == nil, m.payload.count >= 3, m.payload.suffix(2) == [0, 0] else { return false }
    return m.payload.dropLast(2).allSatisfy { $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }
}

@Suite struct DirectoryPartOffsetTests {
    /// A guest-chosen offset above Int.max used to trap the whole daemon.
    @Test func hugeOffsetsAnswerAnEmptyList() {
        let (core, _) = makeCore()
        _ = home(core, 5)
        let g = guest(core, 5)
        g.write("data/a", "")
        for off in ["9223372036854775808", "18446744073709551615", "99999999999999999999999999"] {
            #expect(isEmptyPart(g.send(.directoryPart, g.fields(["data", off]))), "offset \(off)")
        }
        // The same for a path that does not exist is its lookup error, not a crash.
        #expect(g.send(.directoryPart, g.fields(["nothere", "9223372036854775808"])).error == "ENOENT")
    }

    /// C reads the offset with atoi: past the end is an empty list, not an error;
    /// junk reads as 0; the request needs exactly two strings.
    @Test func offsetsAsCReadsThem() {
        let (core, _) = makeCore()
        let c = CoreClient(core)
        c.write("/d/a", ""); c.write("/d/bb", "")
        #expect(isEmptyPart(c.send(.directoryPart, c.fields(["/d", "5"]))))     // == childlen
        #expect(isEmptyPart(c.send(.directoryPart, c.fields(["/d", "5000"]))))
        #expect(isEmptyPart(c.send(.directoryPart, c.fields(["/d", "-1"]))))
        let whole = c.send(.directoryPart, c.fields(["/d", "x"]))
        #expect(whole.fields.dropFirst() == ["a", "bb", ""])
        #expect(c.send(.directoryPart, Array("/d\u{0}0".utf8)).error == "EINVAL")
        #expect(c.send(.directoryPart, c.fields(["/d"])).error == "EINVAL")
    }
}
