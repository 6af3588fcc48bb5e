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
    /// unused range above systemd's container uids. Another run directory's
    /// toolstack numbers its domains from 1 too, so its guests take a block
    /// of 32768 ids (domids stop below 0x7FF0) of their own above that, one
    /// of 8191 chosen by a hash of the directory (``guestID(of:)``).
    public static let guestIDBase: UInt32 = 0x7000_0000

    /// The run directory through symlinks (/var/run is /run on Debian), so
    /// create and destroy agree however it was named; nil for the default.
    private var runDirectoryHash: UInt32? {
        let dir = realpath(runDir, nil).map { p in defer { free(p) }; return String(cString: p) } ?? runDir
        guard dir != "/run/swiftxen" else { return nil }
        var h: UInt32 = 2_166_136_261  // FNV-1a
        for b in dir.utf8 { h = (h ^ UInt32(b)) &* 16_777_619 }
        return h
    }

    /// The uid and gid of domain `domid`'s process.
    public func guestID(of domid: XenHV.DomID) -> UInt32 {
        let block = runDirectoryHash.map { $0 % 8191 + 1 } ?? 0
        return Self.guestIDBase + block << 15 + UInt32(domid)
    }

    /// The `ip netns` name of a domain's network namespace, which holds its
    /// NICs and the guest process itself: `xen-<domid>` for the default run
    /// directory; another run directory's toolstack numbers its domains from
    /// 1 too, so its names carry a hash of that directory.
    public func networkNamespace(of domid: XenHV.DomID) -> String {
        guard let h = runDirectoryHash else { return "xen-\(domid)" }
        return "xen-\(domid)-" + String(h, radix: 16)
    }

    /// A guest's log (its stdout and stderr, a file in the run directory,
    /// usually on a small tmpfs) grows to this at most, so a guest writing
    /// without end cannot fill /run under dom0's services.
    public static let guestMaxFileSize: UInt64 = 64 << 20
    /// Processes and threads of one guest's uid (pvguest runs a few dozen
    /// threads), so a guest that forks without end cannot exhaust the host's.
    public static let guestMaxProcesses: UInt64 = 1024

    /// A guest's log for its stdout and stderr. A restarted guest (`append`)
    /// continues the old one, unless that has reached half the file-size
    /// limit: then the old one becomes `<log>.old` (replacing an older one),
    /// so the new guest's output is never refused by the limit from the start.
    static func openGuestLog(_ path: String, append: Bool) -> CInt {
        var st = stat()
        if append, stat(path, &st) == 0, UInt64(st.st_size) >= guestMaxFileSize / 2 {
            rename(path, path + ".old")
        }
        return open(path, O_WRONLY | O_CREAT | (append ? O_APPEND : O_TRUNC) | O_CLOEXEC, 0o640)
    }

    func confinement(of domid: XenHV.DomID) -> ProcessLauncher.Confinement {
        let id = guestID(of: domid)
        return .init(uid: id, gid: id, networkNamespace: networkNamespace(of: domid),
                     maxFileSize: Self.guestMaxFileSize, maxProcesses: Self.guestMaxProcesses)
    }

    /// A directory of the run directory that guests have no business in
    /// (logs, monitors' configs): root's and its group's only, also when it
    /// existed before.
    static func makePrivateDirectory(_ path: String) {
        mkdir(path, 0o750)
        chmod(path, 0o750)
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

/// The guest owns its directory under `<run dir>/guests` and may put anything
/// there (symlinks, FIFOs, deep trees), swapping entries while root looks:
/// the toolstack reads and removes it only through descriptors, never
/// following a link.
extension Toolstack {
    /// The guest's `devices` list: a regular file read without following a
    /// link or blocking on a FIFO, at most 64 KiB; nil when it is anything else.
    static func readGuestFile(_ path: String, limit: Int = 64 << 10) -> String? {
        let fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_mode & S_IFMT == S_IFREG else { return nil }
        var bytes = [UInt8](repeating: 0, count: limit)
        var n = 0
        while n < limit {
            let r = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress! + n, limit - n) }
            if r < 0 && errno == EINTR { continue }
            guard r > 0 else { break }
            n += r
        }
        return String(decoding: bytes[..<n], as: UTF8.self)
    }

    /// Removes a guest's directory as `rm -rf` would, but relative to
    /// descriptors opened without following links, so a guest that swaps a
    /// subdirectory for a link to elsewhere makes root remove only its own
    /// files. Bounded in depth.
    func removeGuestDirectory(_ path: String) {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        if fd >= 0 { Self.emptyDirectory(fd, depth: 0) }  // takes fd
        _ = rmdir(path)
    }

    private static func emptyDirectory(_ fd: CInt, depth: Int) {
        guard let dir = fdopendir(fd) else {
            close(fd)
            return
        }
        defer { closedir(dir) }
        var names: [String] = []
        while let e = readdir(dir) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        for name in names {
            if unlinkat(fd, name, 0) == 0 || errno != EISDIR { continue }
            if depth < 16 {
                let sub = openat(fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
                if sub >= 0 { emptyDirectory(sub, depth: depth + 1) }
            }
            _ = unlinkat(fd, name, AT_REMOVEDIR)
        }
    }
}
