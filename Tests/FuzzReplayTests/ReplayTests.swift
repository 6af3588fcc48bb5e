import Foundation
import RingFuzz
import Testing

/// Every corpus input and every crash ever found, replayed through the real
/// code as a regression test (the fuzz targets' invariants are preconditions,
/// so a regression crashes this test).
@Suite struct FuzzReplayTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("ringtests")

    static func inputs(_ t: FuzzTarget) -> [URL] {
        ["corpus", "crashes"].flatMap { kind -> [URL] in
            let dir = root.appendingPathComponent(kind).appendingPathComponent(t.rawValue)
            return ((try? FileManager.default.contentsOfDirectory(at: dir, includingPropertiesForKeys: nil)) ?? [])
                .filter { !$0.lastPathComponent.hasPrefix(".") }
        }
    }

    @Test(arguments: FuzzTarget.allCases)
    func replayCorpusAndCrashes(target: FuzzTarget) throws {
        let files = Self.inputs(target)
        #expect(!files.isEmpty, "no seed corpus for \(target.rawValue)")
        for f in files {
            let data = try Data(contentsOf: f)
            data.withUnsafeBytes { target.run($0) }
        }
    }
}
