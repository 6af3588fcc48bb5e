import Foundation

/// Where `swift build` put the executables tests start: XEN_BUILD_DIR (set by
/// scripts/test), else the package's .build/debug, found from the calling
/// test file (Tests/<Target>/<File>.swift).
public enum BuildProducts {
    public static func directory(testFile: String = #filePath) -> String {
        if let d = ProcessInfo.processInfo.environment["XEN_BUILD_DIR"] { return d }
        let root = URL(fileURLWithPath: testFile).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        return root.appendingPathComponent(".build/debug").path
    }

    public static func path(_ name: String, testFile: String = #filePath) -> String {
        directory(testFile: testFile) + "/" + name
    }
}
