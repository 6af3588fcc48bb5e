import CXen
import Glibc

/// Named network namespaces as iproute2 keeps them (`/run/netns/NAME`, a bind
/// mount of a namespace's nsfs inode), entered with setns(2) for the calling
/// thread only — never by running `ip`.
public enum NetNamespace {
    public static let directory = "/run/netns"
    static let cloneNewNet: Int32 = 0x4000_0000  // CLONE_NEWNET
    static let msBind: UInt = 4096  // MS_BIND
    static let msRec: UInt = 16384  // MS_REC
    static let msShared: UInt = 1 << 20  // MS_SHARED
    static let mntDetach: Int32 = 2  // MNT_DETACH

    public static func path(_ name: String) -> String { directory + "/" + name }

    public static func isValidName(_ name: String) -> Bool {
        !name.isEmpty && name != "." && name != ".." && !name.contains("/") && name.utf8.count < 256
    }

    public static func exists(_ name: String) -> Bool { access(path(name), F_OK) == 0 }

    /// Runs `body` with the calling thread inside namespace `name`, creating
    /// the namespace first (what `ip netns add` does: unshare, then bind-mount
    /// the thread's nsfs file) when it is missing and `create` is set. The
    /// thread is back in its own namespace when this returns or throws.
    /// Descriptors and netlink sockets opened by `body` stay bound to `name`.
    public static func run<T>(in name: String, create: Bool, _ body: () throws -> T) throws -> (value: T, created: Bool) {
        guard isValidName(name) else { throw HypervisorError.protocolViolation("bad network namespace name '\(name)'") }
        let home = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC)
        guard home >= 0 else { throw HypervisorError.system(call: "open /proc/thread-self/ns/net", errno: errno) }
        defer {
            // A thread stuck in the guest's namespace would put every later
            // socket of this thread there: that is not recoverable.
            precondition(cxen_setns(home, cloneNewNet) == 0, "cannot return to the original network namespace")
            close(home)
        }
        var created = false
        let p = path(name)
        let fd = open(p, O_RDONLY | O_CLOEXEC)
        if fd >= 0 {
            let r = cxen_setns(fd, cloneNewNet)
            let e = errno
            close(fd)
            guard r == 0 else { throw HypervisorError.system(call: "setns \(p)", errno: e) }
        } else {
            guard create else { throw HypervisorError.system(call: "open \(p)", errno: errno) }
            try makeMountPoint(name)
            guard cxen_unshare(cloneNewNet) == 0 else {
                let e = errno
                unlink(p)
                throw HypervisorError.system(call: "unshare(CLONE_NEWNET)", errno: e)
            }
            guard mount("/proc/thread-self/ns/net", p, "none", msBind, nil) == 0 else {
                let e = errno
                unlink(p)
                throw HypervisorError.system(call: "bind-mount \(p)", errno: e)
            }
            created = true
        }
        return (try body(), created)
    }

    /// The empty file a namespace of that name is bind-mounted on (what
    /// `ip netns add` makes first); it must not exist yet. The directory is
    /// made a shared mount first, as `ip netns add` makes it, so a name
    /// mounted or removed here is mounted or removed in every mount
    /// namespace copied from this one (a confined guest's).
    public static func makeMountPoint(_ name: String) throws {
        guard isValidName(name) else { throw HypervisorError.protocolViolation("bad network namespace name '\(name)'") }
        if mkdir(directory, 0o755) != 0 && errno != EEXIST {
            throw HypervisorError.system(call: "mkdir \(directory)", errno: errno)
        }
        try shareDirectory()
        let p = path(name)
        let f = open(p, O_RDONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0)
        guard f >= 0 else { throw HypervisorError.system(call: "create \(p)", errno: errno) }
        close(f)
    }

    /// `mount --make-shared /run/netns`, upgrading the directory to a mount
    /// point of its own first when it is not one (iproute2's netns_add).
    static func shareDirectory() throws {
        var madeMountPoint = false
        while mount("", directory, "none", msShared | msRec, nil) != 0 {
            guard errno == EINVAL, !madeMountPoint else {
                throw HypervisorError.system(call: "mount --make-shared \(directory)", errno: errno)
            }
            guard mount(directory, directory, "none", msBind | msRec, nil) == 0 else {
                throw HypervisorError.system(call: "mount --bind \(directory) \(directory)", errno: errno)
            }
            madeMountPoint = true
        }
    }

    /// Removes a namespace made by ``run(in:create:_:)`` (`ip netns del`).
    public static func remove(_ name: String) {
        guard isValidName(name) else { return }
        let p = path(name)
        _ = umount2(p, mntDetach)
        unlink(p)
    }
}

/// Linux network interface names (dev_valid_name): 1-15 bytes, not `.` or
/// `..`, no `/`, `:` or white space, and no `%`, which the kernel would take
/// for a number of its own choosing.
public enum InterfaceName {
    public static func isValid(_ n: String) -> Bool {
        !n.isEmpty && n.utf8.count < 16 && n != "." && n != ".." && !n.contains { "/:%".contains($0) || $0.isWhitespace }
    }
}
