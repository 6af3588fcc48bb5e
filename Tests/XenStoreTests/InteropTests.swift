// Integration: the real xenstored executable driven by Debian's xenstore-utils
// (libxenstore) and python3-pyxs over its Unix socket, plus raw-protocol abuse.
import Foundation
import Glibc
import Testing
import XenHV
import XenTestKit
@testable import XenStore

@Suite(.serialized) struct XenstoreUtilsInteropTests {
    @Test func writeReadLsListExistsRm() throws {
        let d = try DaemonProcess()
        var r = d.run("xenstore-write", ["/vm/a", "hello", "/vm/b/c", "nested", "/vm/e", ""])
        #expect(r.status == 0, "\(r.err)")
        r = d.run("xenstore-read", ["/vm/a", "/vm/b/c"])
        #expect(r.status == 0 && r.out == "hello\nnested\n")
        r = d.run("xenstore-read", ["/vm/missing"])
        #expect(r.status == 1)
        #expect(r.err == "xenstore-read: couldn't read path /vm/missing\n")
        r = d.run("xenstore-ls", ["/vm"])
        #expect(r.out == "a = \"hello\"\nb = \"\"\n c = \"nested\"\ne = \"\"\n")
        r = d.run("xenstore-ls", ["-f", "/vm"])
        #expect(r.out == "/vm/a = \"hello\"\n/vm/b = \"\"\n/vm/b/c = \"nested\"\n/vm/e = \"\"\n")
        r = d.run("xenstore-list", ["/vm"])
        #expect(r.out == "a\nb\ne\n")
        r = d.run("xenstore-list", ["/nope"])
        #expect(r.status == 1 && r.err == "xenstore-list: could not list path /nope\n")
        #expect(d.run("xenstore-exists", ["/vm/b/c"]).status == 0)
        #expect(d.run("xenstore-exists", ["/vm/b/x"]).status == 1)
        #expect(d.run("xenstore-rm", ["/vm/b"]).status == 0)
        #expect(d.run("xenstore-exists", ["/vm/b/c"]).status == 1)
        #expect(d.run("xenstore-rm", ["/vm/x/y"]).status == 1)  // parent missing: ENOENT
        #expect(d.run("xenstore-rm", ["/vm/x"]).status == 0)    // missing, parent exists: fine
        r = d.run("xenstore-ls", ["/nope"])
        #expect(r.status == 1 && r.err.contains("No such file or directory"))
        #expect(d.run("xenstore-ls", ["/"]).out == "tool = \"\"\n xenstored = \"\"\nvm = \"\"\n a = \"hello\"\n e = \"\"\n")
    }

    @Test func escapesAndBinaryValues() throws {
        let d = try DaemonProcess()
        // xenstore-write expands C escapes; xenstore-ls shows non-printables escaped.
        #expect(d.run("xenstore-write", ["/esc", "x\\ny\\t\\001"]).status == 0)
        let r = d.run("xenstore-ls", ["/"])
        #expect(r.out.contains("esc = \"x\\ny\\t\\001\""), "\(r.out)")
        let raw = d.run("xenstore-read", ["-R", "/esc"])
        #expect(raw.out == "x\ny\t\u{01}")  // -R: raw bytes, no newline
    }

    @Test func chmodAndPermissionListing() throws {
        let d = try DaemonProcess()
        #expect(d.run("xenstore-write", ["/p/a", "1", "/p/a/b", "2"]).status == 0)
        #expect(d.run("xenstore-chmod", ["/p/a", "r5", "w6", "b7"]).status == 0)
        var r = d.run("xenstore-ls", ["-p", "/p"])
        #expect(r.out.hasPrefix("a = \"1\""))
        #expect(r.out.contains("(r5,w6,b7)"))
        #expect(r.out.contains("b = \"2\""))
        #expect(r.out.split(separator: "\n").last!.hasSuffix("(n0)"))
        #expect(d.run("xenstore-chmod", ["-r", "/p", "n3"]).status == 0)
        r = d.run("xenstore-ls", ["-p", "/p"])
        #expect(r.out.split(separator: "\n").allSatisfy { $0.hasSuffix("(n3)") }, "\(r.out)")
        #expect(d.run("xenstore-chmod", ["/p/a", "z9"]).status != 0)
        #expect(d.run("xenstore-chmod", ["/p/missing", "r0"]).status != 0)
    }

    @Test func watchSeesRegistrationAndChanges() throws {
        let d = try DaemonProcess()
        #expect(d.run("xenstore-write", ["/w/seed", "0"]).status == 0)
        // xenstore-watch exits after -n events; writes happen once it is registered,
        // which we observe through the registration event on its stdout.
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/xenstore-watch")
        p.arguments = ["-n", "4", "/w"]
        p.environment = ["XENSTORED_PATH": d.socketPath]
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        defer { if p.isRunning { p.terminate() } }
        let fd = out.fileHandleForReading.fileDescriptor
        var text = ""
        let deadline = Date().addingTimeInterval(15)
        var wrote = false
        while Date() < deadline {
            var pf = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            if poll(&pf, 1, 100) > 0 {
                var b = [UInt8](repeating: 0, count: 4096)
                let n = read(fd, &b, b.count)
                if n <= 0 { break }
                text += String(decoding: b[0..<n], as: UTF8.self)
            }
            if !wrote && text.contains("/w\n") {
                wrote = true
                #expect(d.run("xenstore-write", ["/w/x", "1", "/other", "2"]).status == 0)
                #expect(d.run("xenstore-rm", ["/w/seed"]).status == 0)
                #expect(d.run("xenstore-chmod", ["/w", "r0"]).status == 0)
            }
            if !p.isRunning && wrote { break }
        }
        p.waitUntilExit()
        text += String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(text == "/w\n/w/x\n/w/seed\n/w\n", "\(text)")
    }

    @Test func manyNodesUseDirectoryPart() throws {
        let d = try DaemonProcess()
        var args: [String] = []
        for i in 0..<400 { args += ["/many/a-fairly-long-node-name-\(i)", "\(i)"] }
        #expect(d.run("xenstore-write", args).status == 0)
        let r = d.run("xenstore-list", ["/many"])
        let names = r.out.split(separator: "\n").map(String.init)
        #expect(names == (0..<400).map { "a-fairly-long-node-name-\($0)" })
    }
}

@Suite(.serialized) struct PyxsInteropTests {
    @Test func pyxsOperations() throws {
        let d = try DaemonProcess()
        let script = """
        import errno, pyxs, sys
        from pyxs import Client, PyXSError
        out = []
        with Client() as c:
            c.write(b"/py/a", b"1")
            c.mkdir(b"/py/dir")
            out.append(c.read(b"/py/a"))
            out.append(sorted(c.list(b"/py")))
            out.append(c.exists(b"/py/a"))
            out.append(c.exists(b"/py/zz"))
            c.set_perms(b"/py/a", [b"r4", b"w5"])
            out.append(c.get_perms(b"/py/a"))
            out.append(c.get_domain_path(3))
            out.append(c.is_domain_introduced(3))
            try:
                c.read(b"/py/missing")
            except PyXSError as e:
                out.append(("err", e.args[0] == errno.ENOENT))
            out.append(c.read(b"/py/missing", b"dflt"))
            out.append(sorted(x[0] for x in c.walk(b"/py")))
            c.delete(b"/py/dir")
            out.append(sorted(c.list(b"/py")))
            # transaction: commit
            c.transaction()
            c.write(b"/py/tx", b"committed")
            out.append(c.commit())
            out.append(c.read(b"/py/tx"))
            # transaction: rollback leaves no trace
            c.transaction()
            c.write(b"/py/rolled", b"x")
            c.rollback()
            out.append(c.exists(b"/py/rolled"))
            # conflict: EAGAIN -> commit() returns False, outside write survives
            with Client() as other:
                c.transaction()
                c.read(b"/py/a")
                c.write(b"/py/a", b"tx")
                other.write(b"/py/a", b"outside")
                out.append(c.commit())
                out.append(c.read(b"/py/a"))
            # watches through the monitor
            m = c.monitor()
            m.watch(b"/py/w", b"tok")
            events = m.wait()
            first = next(events)
            c.write(b"/py/w/x", b"1")
            second = next(events)
            out.append((first, second))
            m.unwatch(b"/py/w", b"tok")
        for o in out:
            print(repr(o))
        """
        let r = d.python(script)
        #expect(r.status == 0, "\(r.err)")
        let expected = """
        b'1'
        [b'a', b'dir']
        True
        False
        [b'r4', b'w5']
        b'/local/domain/3'
        False
        ('err', True)
        b'dflt'
        [b'/py', b'/py/a', b'/py/dir']
        [b'a']
        True
        b'committed'
        False
        False
        b'outside'
        (Event(path=b'/py/w', token=b'tok'), Event(path=b'/py/w/x', token=b'tok'))

        """
        #expect(r.out == expected, "\(r.out)\n\(r.err)")
    }
}

@Suite(.serialized) struct SocketProtocolTests {
    @Test func pipelinedRequestsAnsweredInOrderWithIDs() throws {
        let d = try DaemonProcess()
        let c = try RawSocketClient(path: d.socketPath)
        var batch: [UInt8] = []
        for i in 0..<200 {
            let payload = Array("/pipe/n\(i % 10)".utf8) + [0] + Array("v\(i)".utf8)
            batch += RawSocketClient.message(.write, payload, reqID: UInt32(1000 + i))
        }
        batch += RawSocketClient.message(.read, Array("/pipe/n9".utf8) + [0], reqID: 7)
        batch += RawSocketClient.message(.read, Array("/pipe/none".utf8) + [0], reqID: 8, tx: 0)
        c.sendRaw(batch)
        for i in 0..<200 {
            let m = try #require(c.receive())
            #expect(m.reqID == UInt32(1000 + i) && m.type == XSType.write.rawValue && m.string == "OK\0")
        }
        let r = try #require(c.receive())
        #expect(r.reqID == 7 && r.string == "v199")
        let e = try #require(c.receive())
        #expect(e.reqID == 8 && e.type == XSType.error.rawValue && e.string == "ENOENT\0")
    }

    /// With no descriptor left, accept(2) fails and the connection stays
    /// queued, the listening socket readable: xenstored leaves it out of its
    /// poll for a moment instead of spinning on it (as xenhv does), and
    /// takes the connection once descriptors are back.
    @Test func noDescriptorForAConnectionIsNoSpin() throws {
        let d = try DaemonProcess()
        let pid = d.process.processIdentifier
        let original = OtherProcess.openFileLimit(pid)
        #expect(OtherProcess.allowDescriptors(0, in: pid))
        defer { OtherProcess.setOpenFileLimit(pid, to: original) }
        let c = try RawSocketClient(path: d.socketPath)  // queued in the backlog
        c.sendRaw(RawSocketClient.message(.read, Array("/tool/xenstored".utf8) + [0], reqID: 1))
        // A measuring window, not synchronisation: xenstored's CPU over one second.
        let before = OtherProcess.cpuSeconds(pid)
        idle(milliseconds: 1000)
        let used = OtherProcess.cpuSeconds(pid) - before
        #expect(used < 0.2, "xenstored used \(used) s of CPU in 1 s on a connection it could not accept")
        OtherProcess.setOpenFileLimit(pid, to: original)
        // The queued connection is taken and its request answered now.
        let r = c.receive()
        #expect(r?.reqID == 1 && r?.type == XSType.read.rawValue, "the waiting connection was not served")
        #expect(d.stderrText().contains("no descriptor left"))
    }

    /// A dom0 client that sends requests and stops reading the replies: once
    /// its output is past the high-water mark xenstored stops reading it
    /// (backpressure), and must then stop polling it for input too, or the
    /// requests waiting in the socket wake it at once, for ever. Here the
    /// flush was already blocked when the pause began (replies below the mark
    /// filled the socket first), the case where the poll set kept POLLIN.
    @Test func aClientThatStopsReadingCostsNoCPU() throws {
        let d = try DaemonProcess()
        let pid = d.process.processIdentifier
        let c = try RawSocketClient(path: d.socketPath)
        var tv = timeval(tv_sec: 1, tv_usec: 0)  // a send that cannot go on returns
        setsockopt(c.fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        c.sendRaw(RawSocketClient.message(.write, Array("/big".utf8) + [0] + [UInt8](repeating: 0x62, count: 4000), reqID: 1))
        #expect(c.receive()?.string == "OK\0")
        func reads(_ n: Int, from first: Int) -> [UInt8] {
            (first..<first + n).flatMap { RawSocketClient.message(.read, Array("/big".utf8) + [0], reqID: UInt32($0)) }
        }
        // Replies below the mark (60 of 4 KiB: 241 KB of 256 KiB), more than
        // the socket holds (212,992 bytes here): the flush blocks. They are all
        // made before the first is sent, so once one arrives all are made.
        c.sendRaw(reads(60, from: 2))
        var ready = pollfd(fd: c.fd, events: Int16(POLLIN), revents: 0)
        #expect(poll(&ready, 1, 10_000) == 1)
        // Then requests without end: the output passes the mark, reading pauses.
        c.sendRaw(reads(20000, from: 100))
        // A measuring window, not synchronisation: xenstored's CPU over one second.
        let before = OtherProcess.cpuSeconds(pid)
        idle(milliseconds: 1000)
        let used = OtherProcess.cpuSeconds(pid) - before
        #expect(used < 0.2, "xenstored used \(used) s of CPU in 1 s on a client that does not read")
        // Others are served meanwhile, and so is the client once it reads.
        #expect(d.run("xenstore-read", ["/big"]).out.count == 4001)
        var got = 0
        while got < 100, let m = c.receive() { if m.type == XSType.read.rawValue { got += 1 } }
        #expect(got == 100)
    }

    @Test func oversizedPayloadClosesOnlyThatConnection() throws {
        let d = try DaemonProcess()
        let good = try RawSocketClient(path: d.socketPath)
        let bad = try RawSocketClient(path: d.socketPath)
        good.sendRaw(RawSocketClient.message(.write, Array("/ok".utf8) + [0] + Array("1".utf8), reqID: 1))
        #expect(good.receive()?.string == "OK\0")
        var hdr: [UInt8] = []
        XSHeader(.write, reqID: 2, txID: 0, len: 4097).append(to: &hdr)
        bad.sendRaw(hdr + [UInt8](repeating: 0x41, count: 4097))
        #expect(bad.receive() == nil)  // closed, no reply
        good.sendRaw(RawSocketClient.message(.read, Array("/ok".utf8) + [0], reqID: 3))
        #expect(good.receive()?.string == "1")
        let tool = d.run("xenstore-read", ["/ok"])
        #expect(tool.out == "1\n", "\(tool.status) \(tool.err) \(d.stderrText())")
        #expect(d.isRunning)
    }

    @Test func commandLineQuotas() throws {
        let d = try DaemonProcess(extraArgs: ["--quota-payload", "64", "--domain-quota", "5:nodes=3"])
        let c = try RawSocketClient(path: d.socketPath)
        c.sendRaw(RawSocketClient.message(.write, Array("/q".utf8) + [0] + [UInt8](repeating: 0x61, count: 40), reqID: 1))
        #expect(c.receive()?.string == "OK\0")
        c.sendRaw(RawSocketClient.message(.write, Array("/q".utf8) + [0] + [UInt8](repeating: 0x61, count: 100), reqID: 2))
        #expect(c.receive() == nil)  // over the payload quota: connection closed
        #expect(d.run("xenstore-read", ["/q"]).out == String(repeating: "a", count: 40) + "\n")
        #expect(throws: (any Error).self) { _ = try DaemonProcess(extraArgs: ["--domain-quota", "bogus"]) }
        #expect(throws: (any Error).self) { _ = try DaemonProcess(extraArgs: ["--quota-payload", "5000"]) }
    }

    @Test func unreadWatchEventsDoNotGrowMemory() throws {
        let d = try DaemonProcess(extraArgs: ["--quota-output-bytes", "65536"])
        let lazy = try RawSocketClient(path: d.socketPath)
        lazy.sendRaw(RawSocketClient.message(.watch, XSPayload.strings(["/flood", "t"]), reqID: 1))
        let busy = try RawSocketClient(path: d.socketPath)
        // Far more event bytes than the limit, while `lazy` never reads. `busy` reads
        // its replies batch by batch (a client that never reads is itself throttled).
        var n = 0
        for batchStart in stride(from: 0, to: 20000, by: 1000) {
            var batch: [UInt8] = []
            for i in batchStart..<(batchStart + 1000) {
                batch += RawSocketClient.message(.write, Array("/flood/node-with-a-long-name-\(i % 50)".utf8) + [0, 0x31], reqID: UInt32(i))
            }
            busy.sendRaw(batch)
            for _ in 0..<1000 {
                guard let m = busy.receive() else { break }
                if m.string == "OK\0" { n += 1 }
            }
        }
        #expect(n == 20000)
        // The lazy client was dropped: after its buffered bytes, EOF.
        var got = 0
        while let _ = lazy.receive() { got += 1; if got > 100_000 { break } }
        #expect(got < 20000)
        #expect(d.run("xenstore-read", ["/flood/node-with-a-long-name-1"]).out == "1\n")
    }
}

/// Deterministic pseudo-random generator (SplitMix64) so failures reproduce.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

@Suite(.serialized) struct RobustnessTests {
    /// Thousands of random, mostly-malformed requests of every type: every one gets
    /// exactly one reply with its request id, and the daemon keeps serving others.
    @Test func randomRequestsNeverBreakTheDaemon() throws {
        let d = try DaemonProcess()
        let c = try RawSocketClient(path: d.socketPath)
        var rng = SplitMix(state: 0x5eed)
        let vocab = ["/", "/a", "/a/b", "a/b", "//", "/a/", "@introduceDomain", "@releaseDomain", "@x",
                     "/local/domain/3", "r0", "w5", "b7", "n1", "q9", "0", "1", "3", "99999", "T", "F",
                     "tok", "", "print", "quota", "-1", "18446744073709551616", "/tool/xenstored"]
        var expected = 0
        var nextID: UInt32 = 1
        var batch: [UInt8] = []
        for i in 0..<3000 {
            let type = UInt32.random(in: 0...24, using: &rng)
            var payload: [UInt8] = []
            let nfields = Int.random(in: 0...4, using: &rng)
            for _ in 0..<nfields {
                if Int.random(in: 0..<8, using: &rng) == 0 {
                    payload += (0..<Int.random(in: 0...40, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
                } else {
                    payload += Array(vocab.randomElement(using: &rng)!.utf8)
                }
                payload.append(0)
            }
            let tx = Int.random(in: 0..<10, using: &rng) == 0 ? UInt32.random(in: 0...5, using: &rng) : 0
            var m: [UInt8] = []
            XSHeader(type: type, reqID: UInt32(i + 1), txID: tx, len: UInt32(payload.count)).append(to: &m)
            batch += m + payload
            expected += 1
            if batch.count > 8192 || i == 2999 {
                c.sendRaw(batch)
                batch.removeAll()
                // Read replies (and any watch events) for what was sent.
                while expected > 0 {
                    guard let r = c.receive() else { Issue.record("connection dropped"); return }
                    if r.type == XSType.watchEvent.rawValue { continue }
                    #expect(r.reqID == nextID, "replies in request order")
                    nextID += 1
                    expected -= 1
                }
            }
        }
        #expect(d.isRunning)
        #expect(d.run("xenstore-write", ["/after", "fuzz"]).status == 0)
        #expect(d.run("xenstore-read", ["/after"]).out == "fuzz\n")
    }
}
