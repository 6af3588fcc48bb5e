import Foundation
import Testing
import XenCtl

/// A relative disk target names a file in xenctl's current directory, made
/// absolute before it is checked and written for blkback (which runs elsewhere).
@Suite struct DiskTargetPathTests {
    @Test func relativeTargetsAreResolvedAgainstTheDirectory() throws {
        let d = try DiskSpec(parsing: "disk.img,,xvda")
        #expect(d.target == "disk.img", "parsing alone keeps the text")
        #expect(d.resolvingTarget(against: "/srv/vm").target == "/srv/vm/disk.img")
        #expect(d.resolvingTarget(against: "/").target == "/disk.img")
        #expect(d.resolvingTarget(against: "/srv/vm/").target == "/srv/vm/disk.img")
        #expect(try DiskSpec(parsing: "../x/d.img,,xvda").resolvingTarget(against: "/srv/vm").target == "/srv/vm/../x/d.img")
        #expect(try DiskSpec(parsing: "/abs.img,,xvda").resolvingTarget(against: "/srv/vm").target == "/abs.img")
        #expect(try DiskSpec(parsing: "phy:sub/d.img,xvda,w").resolvingTarget(against: "/srv").target == "/srv/sub/d.img")

        let cfg = try XLConfig(parsing: "name = 'x'\ndisk = [ 'x.img,raw,xvda,w', 'vdev=xvdb, target=/a.img' ]\n", file: "d.cfg")
        #expect(try DomainConfig(cfg, workingDirectory: "/srv/vm").disks.map(\.target) == ["/srv/vm/x.img", "/a.img"])
        // By default the process's current directory.
        let cwd = FileManager.default.currentDirectoryPath
        #expect(try DomainConfig(cfg).disks.first?.target == (cwd == "/" ? "" : cwd) + "/x.img")
    }
}
