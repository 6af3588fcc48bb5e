import Glibc
import XenHV

/// Guest processes run without dom0's powers, as libxl runs a device model
/// with `dm_restrict`: an unprivileged uid of their own (libxl takes
/// `xen-qemuuser-range-base` plus the domid), no capabilities, and, in place
/// of QEMU's chroot, a user namespace owning a network namespace of their own,
/// in which pvguest may make its NICs and nothing else, and a PID namespace
/// whose init it is, so whatever it starts dies with it. xenhv's and
/// xenstored's sockets are root's (mode 0600), so a guest reaches the
/// hypervisor only through the connection it inherits and xenstore only
/// through its ring.
extension Toolstack {
    /// Domain N's process runs as uid and gid `guestIDBase + N` (one per
    /// domain, so guests cannot signal or trace each other), an otherwise
    /// unused range above systemd's container uids.
    public static let guestIDBase: UInt32 = 0x7000_0000

    /// The `ip netns` name of a domain's network namespace, which holds its
    /// NICs and the guest process itself: `xen-<domid>` for the default run
    /// directory; another run directory's toolstack numbers its domains from
    /// 1 too, so its names carry a hash of that directory.
    public func networkNamespace(of domid: XenHV.DomID) -> String {
        guard runDir != "/run/swiftxen" else { return "xen-\(domid)" }
        var h: UInt32 = 2_166_136_261  // FNV-1a
        for b in runDir.utf8 { h = (h ^ UInt32(b)) &* 16_777_619 }
        return "xen-\(domid)-" + String(h, radix: 16)
    }

    func confinement(of domid: XenHV.DomID) -> ProcessLauncher.Confinement {
        let id = Self.guestIDBase + UInt32(domid)
        return .init(uid: id, gid: id, networkNamespace: networkNamespace(of: domid))
    }

    /// Why an unprivileged guest could not reach its directory under
    /// `<run dir>/guests` (its NBD sockets and devices list), or nil: that
    /// and every directory above it must be searchable by others, as /run's are.
    func guestsDirectoryUnreachable() -> String? {
        var path = runDir + "/guests"
        while true {
            var st = stat()
            if stat(path, &st) == 0, st.st_mode & 0o001 == 0 {
                return "\(path) is mode \(String(st.st_mode & 0o777, radix: 8)): guests run unprivileged and serve their disks from \(runDir)/guests, so it must be searchable by others (chmod o+x \(path))"
            }
            guard let slash = path.lastIndex(of: "/"), path != "/" else { return nil }
            path = slash == path.startIndex ? "/" : String(path[..<slash])
        }
    }

    /// Why an unprivileged guest could not open /dev/net/tun for its NICs, or
    /// nil. Debian's udev makes it 0666 (taps are guarded by CAP_NET_ADMIN in
    /// the namespace, not by the device's mode); without udev the kernel
    /// leaves it 0600.
    static func tunUnusableByGuests() -> String? {
        var st = stat()
        guard stat("/dev/net/tun", &st) == 0 else { return "/dev/net/tun is missing (modprobe tun)" }
        guard st.st_mode & 0o006 == 0o006 else {
            return "/dev/net/tun is mode \(String(st.st_mode & 0o777, radix: 8)): guests run unprivileged and open it for their NICs (Debian's udev makes it 0666: chmod 0666 /dev/net/tun)"
        }
        return nil
    }
}
