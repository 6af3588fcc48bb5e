import Foundation
import CXen
import Glibc
import Testing
@testable import XenHV
import XenStore
import XenTestKit

extension Hostile {
    /// A guest process holds the descriptors of its own shared objects (its
    /// memory, grant table, shared_info, port generations), read-write, as
    /// memfds always are. Dom0 maps them: blkback and netback its granted
    /// pages and grant table, xenstored its store page, xenhv its generations.
    /// Shrinking one would turn every such access into a SIGBUS in the daemon,
    /// so each object is sealed against resizing (and against new seals)
    /// before a guest ever sees it.
    @Suite struct MemoryObjectTests {
        @Test func aGuestCannotResizeTheObjectsDom0Maps() throws {
            let d = try HostileDom0()
            let g = try d.guest("bystander")
            let shrinker = try d.rawGuest("shrinker")
            let hv = shrinker.hypervisor
            let objects: [(String, SharedMemory)] = [
                ("memory", try #require(hv.memory)), ("grant table", try #require(hv.grantTableMemory)),
                ("shared_info", hv.sharedInfo.memory), ("port generations", hv.portGenerations),
            ]
            for (name, m) in objects {
                let fd = m.fd.rawValue
                var st = stat()
                #expect(fstat(fd, &st) == 0)
                let size = st.st_size
                for attempt in [off_t(0), size / 2, size + 4096] {
                    let r = ftruncate(fd, attempt)
                    let e = errno
                    // EPERM: sealed; EINVAL: a descriptor without write access.
                    #expect(r != 0 && (e == EPERM || e == EINVAL), "\(name): resized to \(attempt) (\(r), errno \(e))")
                    if r == 0 { _ = ftruncate(fd, size) }  // put it back, so the failing test does not crash dom0
                }
                #expect(cxen_memfd_size_sealed(fd) == 1, "\(name): not sealed against resizing and new seals")
            }
            // Dom0 still serves the guest and everyone else, through the very pages.
            _ = try shrinker.ring.send(RawXenStoreRing.message(.read, [shrinker.home + "/name"], reqID: 7))
            #expect(try eventually(seconds: 10, every: 1) { try shrinker.ring.unreadResponseBytes() > 0 }, "no reply")
            #expect(try shrinker.ring.drain().first?.reqID == 7)
            try g.xenstore.write("data/y", "1")
            #expect(try d.s.xenstore.read(g.home + "/data/y") == "1")
        }
    }
}
