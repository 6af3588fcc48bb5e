import Testing
import XenCtl

/// vdev names as libxl__device_disk_dev_number reads them, with the numbers
/// of docs/misc/vbd-interface.txt.
@Suite struct VdevNumberTests {
    static let xvd: UInt32 = 202 << 8, ext: UInt32 = 1 << 28

    @Test(arguments: [
        // d<N>p<M>: disk N partition M (the doc's examples); dN is partition 0.
        ("d0p0", xvd), ("d0", xvd), ("d1p2", xvd | 1 << 4 | 2), ("d536p37", ext | 536 << 8 | 37),
        ("d15p15", xvd | 15 << 4 | 15), ("d16p0", ext | 16 << 8), ("d1p16", ext | 1 << 8 | 16),
        ("d1048575p255", ext | 1_048_575 << 8 | 255), ("d0x10p0", ext | 16 << 8),
        // xvd with any number of letters (bijective base 26), partition without leading zeros.
        ("xvda", xvd), ("xvdb1", xvd | 1 << 4 | 1), ("xvdp15", xvd | 15 << 4 | 15), ("xvdq", ext | 16 << 8),
        ("xvda16", ext | 16), ("xvda255", ext | 255), ("xvdz", ext | 25 << 8), ("xvdaa", ext | 26 << 8),
        ("xvdtq37", ext | 536 << 8 | 37), ("xvdaaa", ext | 702 << 8), ("xvdbgqcv", ext | 1_048_575 << 8),
        // A number, hex, decimal or octal, written as given (after conversion to decimal).
        ("51712", 51712), ("0xca00", 51712), ("0XCA00", 51712), ("0145000", 51712), ("268439552", ext | 16 << 8),
        ("2147483647", 2_147_483_647), ("0", 0),
        // hd: disks 0..3, partitions 0..63; sd: disks 0..15, partitions 0..15.
        ("hda", 3 << 8), ("hdb", 3 << 8 | 64), ("hdc", 22 << 8), ("hdd63", 22 << 8 | 64 | 63), ("hda1", 3 << 8 | 1),
        ("sda", 8 << 8), ("sdb", 8 << 8 | 16), ("sdp15", 8 << 8 | 15 << 4 | 15),
    ] as [(String, UInt32)])
    func numbers(vdev: String, devid: UInt32) throws {
        #expect(try DiskSpec.devid(of: vdev) == devid, "\(vdev)")
    }

    @Test(arguments: [
        "d1048576p0", "d0p256", "dp1", "d1p", "d-1p0", "d1p2x", "d 1p2",
        "xvd", "xvd1", "xvda0", "xvda01", "xvda256", "xvdbgqcw", "xvdA", "xvda+1", "xvda-1", "xvdaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "2147483648", "0x80000000", "99999999999999999999999", "-1", "+5", " 5", "08", "0x", "",
        "hde", "hda64", "hdaa", "sdq", "sda16", "sdA", "xyz", "vda",
    ])
    func refused(vdev: String) {
        #expect(throws: SpecError.self, "\(vdev)") { try DiskSpec.devid(of: vdev) }
    }

    /// The forms work in a disk spec too, and detach takes the same names.
    @Test func inASpec() throws {
        #expect(try DiskSpec(parsing: "/x,raw,d1p2").devid == Self.xvd | 1 << 4 | 2)
        #expect(try DiskSpec(parsing: "vdev=0xca00, target=/x").devid == 51712)
        #expect(try DiskSpec(parsing: "/x,,xvdaaa").devid == Self.ext | 702 << 8)
        do {
            _ = try DiskSpec(parsing: "/x,,xvda256")
            Issue.record("accepted")
        } catch {
            #expect(error.message.contains("'xvda256' is not a virtual device"), "\(error)")
        }
    }
}
