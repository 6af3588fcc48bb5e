import Testing
import XenCtl

/// xl's disk specification as libxlu_disk_l.l lexes it (xl-disk-configuration.txt):
/// positionals fill the so-far-unspecified of target, format, vdev, access;
/// deprecated prefixes; respecified parameters; empty values as defaults; flags.
@Suite struct DiskSpecSyntaxTests {
    struct Want: Sendable, CustomStringConvertible {
        var target: String, vdev: String, access: DiskSpec.Access = .readWrite, cdrom = false, discard = true
        var description: String { "\(target) \(vdev) \(access) cdrom=\(cdrom)" }
    }

    @Test(arguments: [
        // The doc's equivalent forms.
        ("/dev/vg/guest-volume,,hda", Want(target: "/dev/vg/guest-volume", vdev: "hda")),
        ("/dev/vg/guest-volume,raw,hda,rw", Want(target: "/dev/vg/guest-volume", vdev: "hda")),
        ("format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume", Want(target: "/dev/vg/guest-volume", vdev: "hda")),
        ("raw:/dev/vg/guest-volume,hda,w", Want(target: "/dev/vg/guest-volume", vdev: "hda")),
        ("/root/image.iso,,hdc,cdrom", Want(target: "/root/image.iso", vdev: "hdc", access: .readOnly, cdrom: true)),
        ("/root/image.iso,,hdc,,cdrom", Want(target: "/root/image.iso", vdev: "hdc", access: .readOnly, cdrom: true)),
        ("/root/image.iso,raw,hdc,devtype=cdrom", Want(target: "/root/image.iso", vdev: "hdc", access: .readOnly, cdrom: true)),
        ("format=raw, vdev=hdc, access=ro, devtype=cdrom, target=/root/image.iso", Want(target: "/root/image.iso", vdev: "hdc", access: .readOnly, cdrom: true)),
        ("raw:/root/image.iso,hdc:cdrom,ro", Want(target: "/root/image.iso", vdev: "hdc", access: .readOnly, cdrom: true)),
        // xl makes every cdrom read-only, whatever access says (xlu_disk_parse).
        ("access=rw, devtype=cdrom, vdev=hdc, target=/i.iso", Want(target: "/i.iso", vdev: "hdc", access: .readOnly, cdrom: true)),
        // Deprecated prefixes are stripped; they skip the format positional.
        ("phy:/dev/vg/g,xvda,w", Want(target: "/dev/vg/g", vdev: "xvda")),
        ("file:/img,xvda,r", Want(target: "/img", vdev: "xvda", access: .readOnly)),
        ("tap:aio:/img,xvdb", Want(target: "/img", vdev: "xvdb")),
        ("tap2:/img,xvdb", Want(target: "/img", vdev: "xvdb")),
        ("tapdisk:/img,xvdb", Want(target: "/img", vdev: "xvdb")),
        ("ioemu:/img,xvdb", Want(target: "/img", vdev: "xvdb")),
        ("aio:/img,xvdb,ro", Want(target: "/img", vdev: "xvdb", access: .readOnly)),
        ("phy:/img,xvda:disk,w", Want(target: "/img", vdev: "xvda")),
        // Positionals fill the next unspecified parameter.
        ("format=raw,/img,xvda", Want(target: "/img", vdev: "xvda")),
        ("vdev=xvda,/img,raw,ro", Want(target: "/img", vdev: "xvda", access: .readOnly)),
        ("vdev=xvda,/img,,ro", Want(target: "/img", vdev: "xvda", access: .readOnly)),
        ("direct-io-safe,/x,raw,xvda", Want(target: "/x", vdev: "xvda")),
        ("/x,raw,xvda,rw,direct-io-safe", Want(target: "/x", vdev: "xvda")),
        ("no-discard, /x, raw, xvda", Want(target: "/x", vdev: "xvda", discard: false)),
        ("/x,raw,xvda,discard,trusted,no-colo,specification=xen", Want(target: "/x", vdev: "xvda")),
        ("/x,raw,xvda,backendtype=phy,backend=Domain-0", Want(target: "/x", vdev: "xvda")),
        // Empty values mean the defaults.
        ("format=,vdev=xvda,target=/x", Want(target: "/x", vdev: "xvda")),
        ("access=,vdev=xvda,target=/x", Want(target: "/x", vdev: "xvda")),
        ("/x,,xvda,", Want(target: "/x", vdev: "xvda")),
        // An empty positional target may be given by name later; target= takes the rest, commas too.
        (",,xvda,ro,target=/a,b.img", Want(target: "/a,b.img", vdev: "xvda", access: .readOnly)),
        // The same value twice is no respecification for enums (DSET).
        ("format=raw,format=raw,vdev=xvda,target=/x", Want(target: "/x", vdev: "xvda")),
        // A colon elsewhere than a known prefix belongs to the target.
        ("/srv/a:b.img,,xvda", Want(target: "/srv/a:b.img", vdev: "xvda")),
    ])
    func acceptedAsXl(spec: String, want: Want) throws {
        let d = try DiskSpec(parsing: spec)
        #expect(d.target == want.target && d.vdev == want.vdev && d.access == want.access && d.isCDROM == want.cdrom
                && d.discard == want.discard, "\(spec): \(d.target) \(d.vdev) \(d.access) cdrom=\(d.isCDROM)")
        #expect(d.format == "raw")
    }

    @Test(arguments: [
        ("vdev=xvda,vdev=xvdb,target=/x", "vdev respecified"),
        ("vdev=xvda,vdev=xvda,target=/x", "vdev respecified"),
        ("/a.img,raw,xvda,rw,target=/b.img", "target respecified"),
        ("format=raw,format=qcow2,vdev=xvda,target=/x", "format respecified"),
        ("backendtype=phy,backendtype=qdisk,/x,,xvda", "backendtype respecified"),
        ("backend=0,backend=Domain-0,/x,,xvda", "backend respecified"),
        ("/x,raw,xvda,rw,extra", "too many positional parameters"),
        ("/x,raw,xvda,rx", "access must be rw or ro"),
        ("/x,qcow2,xvda", "format 'qcow2' is not supported"),
        ("qcow2:/x,xvda", "format 'qcow2' is not supported"),
        ("vhd:/x,xvda", "format 'vhd' is not supported"),
        ("/x,zip,xvda", "unknown value for format 'zip'"),
        ("foo:/x,xvda", "unknown deprecated disk prefix 'foo:'"),
        ("nbd:host:1234,xvda", "script"),
        ("script=block-iscsi,/x,,xvda", "script"),
        ("colo,/x,,xvda", "COLO"),
        ("colo-host=h,/x,,xvda", "COLO"),
        ("untrusted,/x,,xvda", "untrusted"),
        ("backendtype=tap,/x,,xvda", "backendtype 'tap' is not supported"),
        ("backendtype=fast,/x,,xvda", "unknown value for backendtype 'fast'"),
        ("specification=virtio,/x,,xvda", "virtio"),
        ("devtype=floppy,/x,,xvda", "devtype must be cdrom or disk"),
        ("colour=blue,/x,,xvda", "unknown disk parameter 'colour'"),
        ("/x,,xvda:floppy", "unknown deprecated type 'floppy'"),
        (",hdc:cdrom,r", "empty cdrom"),
        ("vdev=,target=/x", "no vdev"),
        ("/x,raw", "no vdev"),
        ("vdev=xvda", "no target"),
        ("backend=dom1,/x,,xvda", "only dom0 backends"),
    ])
    func refusedInOneLine(spec: String, fragment: String) {
        do {
            let d = try DiskSpec(parsing: spec)
            Issue.record("accepted \(spec): \(d)")
        } catch {
            #expect(error.message.contains(fragment), "\(spec): \(error)")
            #expect(!error.message.contains("\n"))
        }
    }

    /// A config with a legacy spec, read as xl reads it.
    @Test func legacySpecInAConfig() throws {
        let d = try DomainConfig(try XLConfig(parsing: "name = 'x'\ndisk = [ 'phy:/dev/vg/g,xvda,w', 'file:/srv/b.img,xvdb,r' ]\n", file: "d.cfg"))
        #expect(d.disks.map(\.target) == ["/dev/vg/g", "/srv/b.img"])
        #expect(d.disks.map(\.access) == [.readWrite, .readOnly])
        do {
            _ = try DomainConfig(try XLConfig(parsing: "name = 'x'\n\ndisk = [ 'vdev=xvda,vdev=xvdb,target=/x' ]\n", file: "d.cfg"))
            Issue.record("accepted")
        } catch {
            #expect(error.description.hasPrefix("d.cfg:3: disk 'vdev=xvda,vdev=xvdb,target=/x': vdev respecified"), "\(error)")
        }
    }

    /// `xl block-attach DOMAIN SPEC...`: several strings are one disk, their
    /// positionals counted across them; a target= ends with its own string.
    @Test func oneDiskInSeveralStrings() throws {
        #expect(try DiskSpec(parsing: ["phy:/dev/sdb", "xvdb", "w"]) == DiskSpec(parsing: "phy:/dev/sdb,xvdb,w"))
        #expect(try DiskSpec(parsing: ["/img", "raw", "xvdc", "r"]) == DiskSpec(parsing: "/img,raw,xvdc,r"))
        #expect(try DiskSpec(parsing: ["format=raw", "vdev=xvdb", "target=/a,b"]) == DiskSpec(parsing: "format=raw,vdev=xvdb,target=/a,b"))
        let d = try DiskSpec(parsing: ["target=/srv/a,b.img", "vdev=xvdb"])
        #expect(d.target == "/srv/a,b.img" && d.vdev == "xvdb")
        let error = #expect(throws: SpecError.self) { try DiskSpec(parsing: ["vdev=xvdb", "vdev=xvdc", "target=/x"]) }
        #expect(error?.message.contains("vdev respecified") == true, "\(String(describing: error))")
    }
}
