import CXen
import Foundation
import Glibc
import Testing
@testable import XenHV

/// A confined guest process (``ProcessLauncher/Confinement``) runs as its own
/// unprivileged uid in a user and network namespace of its own: it cannot
/// open root's sockets or files (xenhv's and xenstored's are 0600), cannot
/// enter the host's network namespace, and can make a tap in its own;
/// whatever it starts dies with it. Root:
/// it changes uid and names a namespace under /run/netns, which it removes.
@Suite(.serialized) struct ConfinementTests {
    static let uid = uid_t(0x7000_0000 + 30_000 + getpid() % 1000)

    /// What the confined probe printed (stdout, unless `stdout` takes it,
    /// and stderr), and how it exited.
    /// `inherit` becomes its descriptor 3.
    func runConfined(_ script: String, networkNamespace: String? = nil, stdout: CInt? = nil, inherit: CInt? = nil,
                     maxFileSize: UInt64? = nil, maxProcesses: UInt64? = nil) throws -> (status: Int32, out: String, pid: pid_t) {
        var p: [CInt] = [-1, -1]
        #expect(pipe(&p) == 0)
        let null = open("/dev/null", O_RDONLY | O_CLOEXEC)
        defer { close(null); close(p[0]) }
        let pid: pid_t
        do {
            pid = try ProcessLauncher.spawn(
                "/usr/bin/python3", arguments: ["-I", "-c", script],
                descriptors: [(null, 0), (stdout ?? p[1], 1), (p[1], 2)] + (inherit.map { [($0, CInt(3))] } ?? []),
                confinement: .init(uid: Self.uid, gid: Self.uid, networkNamespace: networkNamespace,
                                   maxFileSize: maxFileSize, maxProcesses: maxProcesses))
        } catch {
            close(p[1])
            throw error
        }
        close(p[1])
        var out = Data()
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(p[0], &buf, buf.count)
            if n <= 0 { break }
            out.append(contentsOf: buf[0..<n])
        }
        var st: Int32 = 0
        waitpid(pid, &st, 0)
        return ((st >> 8) & 0xff, String(decoding: out, as: UTF8.self), pid)
    }

    @Test func aConfinedProcessHasNoneOfRootsPowers() throws {
        let dir = NSTemporaryDirectory() + "confined-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        chmod(dir, 0o755)
        // A root-only socket, as xenhv's and xenstored's are, and a root-only file.
        let sockPath = dir + "/dom0.sock"
        let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        defer { close(s) }
        var addr = try UnixSocketAddress.make(sockPath)
        let bound = UnixSocketAddress.with(&addr) { bind(s, $0, $1) }
        #expect(bound == 0 && chmod(sockPath, 0o600) == 0 && listen(s, 4) == 0)
        let secret = dir + "/secret"
        #expect(FileManager.default.createFile(atPath: secret, contents: Data("x".utf8), attributes: [.posixPermissions: 0o600]))

        let probe = """
            import ctypes, fcntl, os, socket, struct
            def attempt(what, f):
                try:
                    f(); print(what, "ok")
                except OSError as e:
                    print(what, "denied" if e.errno in (1, 13) else "errno %d" % e.errno)
            print("uid", os.getuid(), open("/proc/self/uid_map").read().split())
            attempt("dom0 socket", lambda: socket.socket(socket.AF_UNIX).connect("\(sockPath)"))
            attempt("root file", lambda: open("\(secret)").read())
            def host_netns():
                if ctypes.CDLL(None, use_errno=True).setns(3, 0x40000000) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            attempt("host netns", host_netns)
            print("links", sorted(n for _, n in socket.if_nameindex()))
            def tap():
                fd = os.open("/dev/net/tun", os.O_RDWR)
                fcntl.ioctl(fd, 0x400454ca, struct.pack("16sH", b"ct0", 0x0002 | 0x1000))
                print("made", sorted(n for _, n in socket.if_nameindex()))
            attempt("tap", tap)
            """
        // The host's network namespace, handed over (its /proc no longer names it).
        let hostNet = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC)
        defer { close(hostNet) }
        let r = try runConfined(probe, inherit: hostNet)
        #expect(r.status == 0, "\(r.out)")
        let lines = r.out.split(separator: "\n").map(String.init)
        #expect(lines.contains("uid 0 ['0', '\(Self.uid)', '1']"), "\(r.out)")  // root only inside, as uid 0x7...
        #expect(lines.contains("dom0 socket denied"), "\(r.out)")
        #expect(lines.contains("root file denied"), "\(r.out)")
        #expect(lines.contains("host netns denied"), "\(r.out)")
        #expect(lines.contains("links ['lo']"), "\(r.out)")  // a namespace of its own
        #expect(lines.contains("made ['ct0', 'lo']") && lines.contains("tap ok"), "\(r.out)")
        // The same probe unconfined reaches both (the denials above are the confinement's).
        #expect(access(sockPath, W_OK) == 0 && access(secret, R_OK) == 0)
    }

    /// The program is executed through a descriptor the launcher opened, so
    /// a build tree the guest's uid cannot search (a 0700 home or mktemp
    /// directory) still starts it.
    @Test func aProgramInADirectoryClosedToTheGuestStillRuns() throws {
        let dir = NSTemporaryDirectory() + "closed-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(chmod(dir, 0o700) == 0)
        try FileManager.default.copyItem(atPath: "/bin/echo", toPath: dir + "/echo")
        var p: [CInt] = [-1, -1]
        #expect(pipe(&p) == 0)
        defer { close(p[0]) }
        let pid = try ProcessLauncher.spawn(dir + "/echo", arguments: ["started"], descriptors: [(p[1], 1)],
                                            confinement: .init(uid: Self.uid, gid: Self.uid))
        close(p[1])
        var buf = [UInt8](repeating: 0, count: 64)
        let n = read(p[0], &buf, buf.count)
        var st: Int32 = 0
        waitpid(pid, &st, 0)
        #expect(n > 0 && String(decoding: buf[0..<max(n, 0)], as: UTF8.self) == "started\n")
        #expect(st == 0)
    }

    /// Its log cannot grow past the file-size limit (a write past it fails,
    /// the guest lives on) and its uid cannot have more processes than the
    /// process limit: a guest cannot fill /run or the process table.
    @Test func limitsHoldItsLogAndItsProcesses() throws {
        let dir = NSTemporaryDirectory() + "limits-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let log = open(dir + "/log", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        #expect(log >= 0)
        defer { close(log) }
        let probe = """
            import os, subprocess, sys
            try:
                os.write(1, b"x" * (2 << 20)); os.write(1, b"x" * 4096); print("fsize ok", file=sys.stderr)
            except OSError as e:
                print("fsize errno", e.errno, file=sys.stderr)
            children, refused = [], 0
            for _ in range(20):
                try:
                    children.append(subprocess.Popen(["/bin/sleep", "100"]))
                except OSError as e:
                    refused += 1
            print("nproc started", len(children), "refused", refused, file=sys.stderr, flush=True)
            for c in children: c.kill(); c.wait()
            """
        let r = try runConfined(probe, stdout: log, maxFileSize: 1 << 20, maxProcesses: 8)
        let text = r.out
        #expect(text.contains("fsize errno \(EFBIG)"), "\(text)")
        var info = stat()
        #expect(stat(dir + "/log", &info) == 0 && info.st_size == 1 << 20)
        // Python itself is one of the 8; a few sleeps start, the rest are refused (EAGAIN).
        let counts = text.split(separator: "\n").first { $0.hasPrefix("nproc") }?.split(separator: " ").compactMap { Int($0) } ?? []
        #expect(counts.count == 2 && counts[0] > 0 && counts[0] < 8 && counts[1] == 20 - counts[0], "\(text)")
        #expect(r.status == 0, "\(text)")
    }

    /// Whatever a confined process starts dies with it (it is init of a PID
    /// namespace of its own): a destroyed guest leaves no process behind to
    /// hold its memory.
    @Test func whatAConfinedProcessStartsDiesWithIt() throws {
        var p: [CInt] = [-1, -1]
        #expect(pipe(&p) == 0)
        let null = open("/dev/null", O_RDONLY | O_CLOEXEC)
        defer { close(null); close(p[0]) }
        let probe = """
            import os, subprocess, sys, time
            child = subprocess.Popen(["/bin/sleep", "1000"], stdout=subprocess.DEVNULL)
            print(os.getpid(), child.pid, flush=True)
            time.sleep(1000)
            """
        let pid = try ProcessLauncher.spawn("/usr/bin/python3", arguments: ["-I", "-c", probe],
                                            descriptors: [(null, 0), (p[1], 1), (p[1], 2)],
                                            confinement: .init(uid: Self.uid, gid: Self.uid))
        close(p[1])
        var line = [UInt8]()
        var b: UInt8 = 0
        while read(p[0], &b, 1) == 1 && b != 10 { line.append(b) }
        // Its own view: it is 1 and the sleep 2; ours: the sleep is its child.
        #expect(String(decoding: line, as: UTF8.self) == "1 2")
        let children = (try? String(contentsOfFile: "/proc/\(pid)/task/\(pid)/children", encoding: .utf8)) ?? ""
        let sleeper = pid_t(children.split(separator: " ").first ?? "") ?? 0
        #expect(sleeper > 0, "no child in \(children)")
        kill(pid, SIGKILL)
        var st: Int32 = 0
        waitpid(pid, &st, 0)
        // The kernel killed and reaped the namespace's processes before its init's exit completed.
        #expect(sleeper > 0 && kill(sleeper, 0) == -1 && errno == ESRCH, "the guest's child outlived it")
        if sleeper > 0 { kill(sleeper, SIGKILL) }
    }

    /// Pausing a confined guest's domain stops everything in its PID
    /// namespace, not its init alone (as pausing a domain stops all its
    /// vCPUs); unpausing continues it all; destroying it kills it all.
    @Test func pauseStopsTheWholeGuest() throws {
        let f = try HypervisorFixture()
        var p: [CInt] = [-1, -1]
        #expect(pipe(&p) == 0)
        let null = open("/dev/null", O_RDONLY | O_CLOEXEC)
        defer { close(null); close(p[0]) }
        // Two children, and a third in a PID namespace it nests in its own
        // (it is root in its user namespace, so it may).
        let probe = """
            import ctypes, os, subprocess, time
            subprocess.Popen(["/bin/sleep", "1000"], stdout=subprocess.DEVNULL)
            subprocess.Popen(["/bin/sleep", "1001"], stdout=subprocess.DEVNULL)
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(0x20000000) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWPID)")
            if os.fork() == 0:
                os.execv("/bin/sleep", ["sleep", "1002"])
            print("ready", flush=True)
            time.sleep(1000)
            """
        let pid = try ProcessLauncher.spawn("/usr/bin/python3", arguments: ["-I", "-c", probe],
                                            descriptors: [(null, 0), (p[1], 1), (p[1], 2)],
                                            confinement: .init(uid: Self.uid, gid: Self.uid))
        close(p[1])
        var children: [pid_t] = []
        defer {
            kill(pid, SIGKILL)
            var st: Int32 = 0
            waitpid(pid, &st, 0)
            for c in children { kill(c, SIGKILL) }
        }
        #expect(ProcessLauncher.readLine(p[0], deadline: monotonicSeconds() + 30) == "ready")
        children = ((try? String(contentsOfFile: "/proc/\(pid)/task/\(pid)/children", encoding: .utf8)) ?? "")
            .split(separator: " ").compactMap { pid_t($0) }
        #expect(children.count == 3)
        let d = try f.dom0.createDomain(pages: 64, name: "paused")
        close(d.guestDescriptor)
        try f.dom0.attachProcess(pid, to: d.domid)
        /// Waits (bounded) until every process is in `state` ("T" stopped) or not.
        func all(_ stopped: Bool) -> Bool {
            let deadline = monotonicSeconds() + 10
            while monotonicSeconds() < deadline {
                let states = ([pid] + children).map { q -> Bool in
                    let stat = (try? String(contentsOfFile: "/proc/\(q)/stat", encoding: .utf8)) ?? ""
                    return stat.split(separator: ")").last?.split(separator: " ").first == "T"
                }
                if states.allSatisfy({ $0 == stopped }) { return true }
                sched_yield()
            }
            return false
        }
        try f.dom0.pauseDomain(d.domid)
        #expect(all(true), "a process of the paused guest still runs")
        try f.dom0.unpauseDomain(d.domid)
        #expect(all(false), "a process of the unpaused guest is still stopped")
        try f.dom0.destroyDomain(d.domid)
        var st: Int32 = 0
        #expect(waitpid(pid, &st, 0) == pid)
        #expect(children.allSatisfy { kill($0, 0) == -1 && errno == ESRCH }, "a process outlived the destroyed guest")
    }

    /// Its /proc is its PID namespace's: its own tid is its own there, and
    /// no host process shows (libdispatch's worker monitor opens
    /// /proc/<gettid()>/stat and traps when that is missing).
    @Test func aConfinedProcessSeesAProcOfItsOwn() throws {
        let r = try runConfined("""
            import os, threading
            print("pid", os.getpid(), open("/proc/self/stat").read().split()[0])
            def own_stat():
                tid = threading.get_native_id()
                print("thread", open("/proc/%d/stat" % tid).read().split()[0] == str(tid))
            t = threading.Thread(target=own_stat)
            t.start(); t.join()
            print("processes", sorted(int(d) for d in os.listdir("/proc") if d.isdigit()))
            """)
        #expect(r.status == 0, "\(r.out)")
        let lines = r.out.split(separator: "\n").map(String.init)
        #expect(lines.contains("pid 1 1"), "\(r.out)")
        #expect(lines.contains("thread True"), "\(r.out)")
        #expect(lines.contains("processes [1]"), "\(r.out)")
        // The host's /proc is untouched: it still shows the host's processes.
        #expect(access("/proc/\(getpid())/stat", R_OK) == 0)
    }

    /// The namespace is named before the child runs, and a child that
    /// cannot start leaves no name and no process behind.
    @Test func theNamespaceIsNamedBeforeTheChildRuns() throws {
        let name = "xcf\(getpid())"
        defer { NetNamespace.remove(name) }
        try NetNamespace.makeMountPoint(name)
        // The child finds its own namespace under the name at once.
        let r = try runConfined("""
            import os
            print("same", os.stat("/proc/self/ns/net").st_ino == os.stat("/run/netns/\(name)").st_ino)
            """, networkNamespace: name)
        #expect(r.out == "same True\n", "\(r.out)")
        // Mounted: the name is on nsfs, not on /run's file system, and it
        // keeps the namespace after the child exited.
        func mounted() -> Bool {
            var dir = stat(), file = stat()
            return stat(NetNamespace.directory, &dir) == 0 && stat(NetNamespace.path(name), &file) == 0 && file.st_dev != dir.st_dev
        }
        #expect(mounted(), "no namespace mounted")
        NetNamespace.remove(name)

        try NetNamespace.makeMountPoint(name)
        let failure = #expect(throws: HypervisorError.self) {
            _ = try ProcessLauncher.spawn("/nonexistent/guest", arguments: [],
                                          confinement: .init(uid: Self.uid, gid: Self.uid, networkNamespace: name))
        }
        #expect("\(failure.map { "\($0)" } ?? "")".contains("executing the program"), "\(String(describing: failure))")
        // A host without unprivileged user namespaces is named as the cause.
        #expect(ProcessLauncher.Confinement.describe(step: CInt(CXEN_CONFINE_NAMESPACES), errno: EPERM).contains("user.max_user_namespaces"))
        #expect(NetNamespace.exists(name) && !mounted(), "a failed start left its namespace mounted")
        var status: Int32 = 0
        #expect(waitpid(-1, &status, WNOHANG) <= 0, "a failed start left a child to reap")
    }
}

/// The toolstack reads a guest's ready pipe with a deadline and a line limit:
/// a guest that never answers, or answers without end, cannot hold it.
@Suite struct BoundedReadLineTests {
    @Test func aSilentWriterTimesOutAndALongLineIsCut() throws {
        var p: [CInt] = [-1, -1]
        #expect(pipe(&p) == 0)
        defer { close(p[0]) }
        // Nothing written, the writer still open: nil once the deadline passed.
        #expect(ProcessLauncher.readLine(p[0], deadline: monotonicSeconds() + 0.05) == nil)
        let long = [UInt8](repeating: 66, count: 100) + [10] + Array("ok\n".utf8)
        #expect(write(p[1], long, long.count) == long.count)
        let far = monotonicSeconds() + 30
        #expect(ProcessLauncher.readLine(p[0], deadline: far, limit: 64) == String(repeating: "B", count: 64))
        #expect(ProcessLauncher.readLine(p[0], deadline: far, limit: 64) == String(repeating: "B", count: 36))
        #expect(ProcessLauncher.readLine(p[0], deadline: far) == "ok")
        close(p[1])
        #expect(ProcessLauncher.readLine(p[0], deadline: far) == "")  // EOF
    }
}
