import Foundation
import Glibc
import Testing
@testable import XenCtl

/// A guest owns its directory under `<run dir>/guests` and is hostile: the
/// toolstack (root) reads its `devices` list without following a link or
/// blocking on a FIFO, and removes the directory without following the
/// links it planted there.
@Suite struct GuestDirectoryTests {
    @Test func removingAGuestDirectoryNeverFollowsItsLinks() throws {
        let base = NSTemporaryDirectory() + "guestdir-\(UUID().uuidString.prefix(8))"
        let guest = base + "/guests/7", outside = base + "/outside"
        defer { try? FileManager.default.removeItem(atPath: base) }
        try FileManager.default.createDirectory(atPath: guest + "/deep/er", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: outside, withIntermediateDirectories: true)
        #expect(FileManager.default.createFile(atPath: outside + "/precious", contents: Data("keep".utf8)))
        #expect(FileManager.default.createFile(atPath: guest + "/deep/er/file", contents: Data("x".utf8)))
        #expect(symlink(outside, guest + "/link") == 0)  // a link to a directory
        #expect(symlink(outside + "/precious", guest + "/deep/filelink") == 0)
        #expect(mkfifo(guest + "/fifo", 0o600) == 0)

        Toolstack(runDir: base).removeGuestDirectory(guest)
        #expect(access(guest, F_OK) != 0, "the guest's directory is still there")
        #expect((try? String(contentsOfFile: outside + "/precious", encoding: .utf8)) == "keep")
    }

    /// A restarted guest continues its log, unless the log has reached half
    /// the guest's file-size limit: then it is kept as `.old` and a new one starts.
    @Test func aRestartedGuestsLogIsRotatedBeforeItsLimit() throws {
        let dir = NSTemporaryDirectory() + "guestlog-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let log = dir + "/guest-a.log"
        func write(_ s: String, append: Bool) {
            let fd = Toolstack.openGuestLog(log, append: append)
            #expect(fd >= 0)
            _ = s.withCString { Glibc.write(fd, $0, strlen($0)) }
            close(fd)
        }
        write("first\n", append: false)
        write("restarted\n", append: true)
        #expect((try? String(contentsOfFile: log, encoding: .utf8)) == "first\nrestarted\n")
        #expect(truncate(log, off_t(Toolstack.guestMaxFileSize / 2)) == 0)
        write("again\n", append: true)
        #expect((try? String(contentsOfFile: log, encoding: .utf8)) == "again\n")
        var st = stat()
        #expect(stat(log + ".old", &st) == 0 && UInt64(st.st_size) == Toolstack.guestMaxFileSize / 2)
        #expect(stat(log, &st) == 0 && st.st_mode & 0o777 == 0o640)
    }

    @Test func theDevicesListIsReadOnlyFromARegularFile() throws {
        let dir = NSTemporaryDirectory() + "guestfile-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(FileManager.default.createFile(atPath: dir + "/secret", contents: Data("vif/0 secret\n".utf8)))
        #expect(FileManager.default.createFile(atPath: dir + "/devices", contents: Data("vif/0 nic eth0\n".utf8)))
        #expect(Toolstack.readGuestFile(dir + "/devices") == "vif/0 nic eth0\n")
        #expect(symlink(dir + "/secret", dir + "/linked") == 0)
        #expect(Toolstack.readGuestFile(dir + "/linked") == nil)
        // A FIFO with no writer would block an open(2) without O_NONBLOCK forever.
        #expect(mkfifo(dir + "/fifo", 0o600) == 0)
        #expect(Toolstack.readGuestFile(dir + "/fifo") == nil)
        // A huge list is cut at the limit.
        #expect(FileManager.default.createFile(atPath: dir + "/big", contents: Data(repeating: 65, count: 1 << 20)))
        #expect(Toolstack.readGuestFile(dir + "/big")?.utf8.count == 64 << 10)
    }
}
