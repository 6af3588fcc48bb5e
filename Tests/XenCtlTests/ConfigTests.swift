import Glibc
import Foundation
import Testing
import XenCtl
import XenHV

@Suite struct XLConfigTests {
    let sample = """
        # a PV guest
        name = "demo"   # trailing comment
        memory = 256; vcpus = 2
        disk = [ 'format=raw, vdev=xvda, access=rw, target=/var/lib/xen/demo,1.img',
                 "/srv/data.img,raw,xvdb,ro", ]
        vif = [ 'mac=00:16:3e:01:02:03, bridge=xenbr0, rate=100Mb/s' ]
        vif += [ 'bridge=xenbr1' ]
        on_crash = 'preserve'
        extra = "console=hvc0 \\"quoted\\""
        """

    @Test func parsesEveryValueKind() throws {
        let c = try XLConfig(parsing: sample, file: "demo.cfg")
        #expect(c["name"] == .string("demo"))
        #expect(c["memory"] == .number("256"))
        #expect(c["vcpus"] == .number("2"))
        #expect(c["extra"] == .string("console=hvc0 \"quoted\""))
        guard case .list(let disks) = c["disk"], case .list(let vifs) = c["vif"] else {
            Issue.record("lists not parsed")
            return
        }
        #expect(disks.count == 2)
        #expect(vifs == [.string("mac=00:16:3e:01:02:03, bridge=xenbr0, rate=100Mb/s"), .string("bridge=xenbr1")])
        #expect(c.line(of: "on_crash") == 8)
    }

    @Test func domainConfigFromTheFile() throws {
        let d = try DomainConfig(try XLConfig(parsing: sample, file: "demo.cfg"))
        #expect(d.name == "demo")
        #expect(d.memory == 256)
        #expect(d.vcpus == 2)
        #expect(d.onCrash == .preserve)
        #expect(d.disks.map(\.target) == ["/var/lib/xen/demo,1.img", "/srv/data.img"])
        #expect(d.disks.map(\.access) == [.readWrite, .readOnly])
        #expect(d.disks.map(\.devid) == [51712, 51728])
        #expect(d.vifs.map(\.bridge) == ["xenbr0", "xenbr1"])
        #expect(d.vifs[0].mac?.description == "00:16:3e:01:02:03")
        #expect(d.vifs[0].rate == VifSpec.Rate(bytesPerInterval: 625_000, intervalMicroseconds: 50_000))
        #expect(d.maxEventChannels == 1023, "libxl's default")
        #expect(try DomainConfig(try XLConfig(parsing: "name = 'x'\nmax_event_channels = 64\n", file: "d.cfg")).maxEventChannels == 64)
        #expect(d.cpus == nil, "no cpus: any CPU")
    }

    /// Input that used to trap or to fail late: lists nested without end
    /// (the parser's recursion), and a name xl's verbs would take for an option.
    @Test func badInputIsOneConfigError() throws {
        let deep = "x = " + String(repeating: "[", count: 100_000)
        #expect(throws: ConfigError(file: "d.cfg", line: 1, message: "lists nested more than 32 deep")) {
            try XLConfig(parsing: deep, file: "d.cfg")
        }
        let nested = "x = " + String(repeating: "[", count: 32) + "'a'" + String(repeating: "]", count: 32) + "\n"
        #expect(throws: Never.self) { try XLConfig(parsing: nested, file: "d.cfg") }
        #expect(throws: ConfigError(file: "d.cfg", line: 2, message: "name '-web' must not start with '-'")) {
            try DomainConfig(try XLConfig(parsing: "memory = 32\nname = '-web'\n", file: "d.cfg"))
        }
    }

    /// xl.cfg(5)'s `cpus` CPULISTs, read left to right as xl's parse_cpurange does.
    @Test func cpuLists() throws {
        #expect(try DomainConfig.cpuList("0-3,^1").cpus == [0, 2, 3])
        #expect(try DomainConfig.cpuList("3-8,^5").cpus == [3, 4, 6, 7, 8])
        #expect(try DomainConfig.cpuList("0-3,^1,1").cpus == [0, 1, 2, 3], "a later token adds back")
        #expect(try DomainConfig.cpuList("all,^0").cpus.count == CPUSet.capacity - 1)
        #expect(try DomainConfig.cpuList(" 2 , 5 ").cpus == [2, 5])
        #expect(try DomainConfig.cpuList("0-3,^1").description == "0,2-3")
        let online = CPUSet([0, 1])
        let d = try DomainConfig(try XLConfig(parsing: "name = 'x'\ncpus = \"1\"\n", file: "d.cfg"), online: online)
        #expect(d.cpus == CPUSet([1]))
        #expect(try DomainConfig(try XLConfig(parsing: "name = 'x'\ncpus = '1-7'\n", file: "d.cfg"), online: online).cpus?.cpus == Array(1...7),
                "CPUs past the online ones are kept, as Xen keeps them in a hard affinity")
        do {
            _ = try DomainConfig(try XLConfig(parsing: "name = 'x'\n\ncpus = '2-3'\n", file: "d.cfg"), online: online)
            Issue.record("accepted CPUs none of which is online")
        } catch {
            #expect("\(error)" == "d.cfg:3: cpus = '2-3': none of these CPUs is online (online: 0-1)", "\(error)")
        }
    }

    @Test(arguments: [
        ("name = \"x\"\nmemory = \n", 2, "where a value was expected"),
        ("name = \"x\nmemory = 3\n", 1, "unterminated string"),
        ("name = \"x\"\ndisk = [ 'a'\n", 2, "unterminated list"),
        ("name = \"x\"\n= 3\n", 2, "where a setting name was expected"),
        ("name = \"x\"\nmemory = lots\n", 2, "'lots' is not a value"),
        ("name = \"x\" junk\n", 1, "unexpected"),
        ("name = \"x\"\nkernel = 'a' 'b'\n", 2, "unexpected"),
    ])
    func syntaxErrorsNameTheLine(text: String, line: Int, fragment: String) {
        do {
            _ = try XLConfig(parsing: text, file: "bad.cfg")
            Issue.record("accepted: \(text)")
        } catch {
            #expect(error.file == "bad.cfg")
            #expect(error.line == line, "\(error)")
            #expect(error.description.contains(fragment), "\(error)")
        }
    }

    /// xl.cfg(5)'s defaults and every supported value, and the action for each shutdown reason.
    @Test func shutdownActions() throws {
        let d = try DomainConfig(try XLConfig(parsing: "name = 'x'\n", file: "d.cfg"))
        #expect(d.onPoweroff == .destroy && d.onReboot == .restart && d.onCrash == .destroy && d.onWatchdog == .destroy)
        for a in DomainConfig.Action.supported {
            let c = try DomainConfig(try XLConfig(parsing: "name = 'x'\non_poweroff = '\(a.rawValue)'\non_reboot = \"\(a.rawValue)\"\non_crash = '\(a.rawValue)'\n", file: "d.cfg"))
            #expect(c.onPoweroff == a && c.onReboot == a && c.onCrash == a)
        }
        let c = try DomainConfig(try XLConfig(parsing: "name = 'x'\non_poweroff = 'preserve'\non_reboot = 'rename-restart'\non_crash = 'coredump-restart'\n", file: "d.cfg"))
        #expect(c.action(for: .poweroff) == .preserve && c.action(for: .reboot) == .renameRestart)
        #expect(c.action(for: .crash) == .coredumpRestart && c.action(for: .watchdog) == .destroy && c.action(for: .suspend) == nil)
    }

    @Test(arguments: [
        ("memory = 5\n", "needs a name"),
        ("name = 'a b'\n", "must be 1-64 characters"),
        ("name = 'a\\x1b[31m'\n", "numeric escape"),
        ("name = 'a\\bb'\n", "name 'a\\u{8}b' must be 1-64 characters without '/', spaces or control characters"),
        // What a message quotes stays on its line: a newline or an escape sequence is written out.
        ("name = 'x'\ndisk = [ 'vdev=xvda, bogus\\n\u{1B}[2J, target=/a' ]\n", "disk 'vdev=xvda, bogus\\n\\u{1B}[2J, target=/a': target respecified"),
        ("name = 'x'\nmemory = 0\n", "memory must be"),
        ("name = 'x'\non_crash = 'explode'\n", "on_crash = 'explode': must be one of destroy, restart, rename-restart, preserve, coredump-destroy, coredump-restart"),
        ("name = 'x'\n\non_reboot = 3\n", "d.cfg:3: on_reboot = '3': must be one of"),
        ("name = 'x'\non_poweroff = [ 'destroy' ]\n", "d.cfg:2: on_poweroff = a list: must be one of"),
        ("name = 'x'\non_crash = 'soft-reset'\n", "d.cfg:2: on_crash = 'soft-reset' is not supported"),
        ("name = 'x'\ndisk = 'vdev=xvda,target=/a'\n", "disk must be a list"),
        ("name = 'x'\ndisk = [ 'vdev=xvda, target=/a', 'vdev=xvda, target=/b' ]\n", "duplicate vdev 'xvda'"),
        ("name = 'x'\ndisk = [ 'format=qcow2, vdev=xvda, target=/a' ]\n", "format 'qcow2' is not supported"),
        ("name = 'x'\ndisk = [ 'vdev=xyz, target=/a' ]\n", "not a virtual device name"),
        ("name = 'x'\nvif = [ 'bridge=this-name-is-far-too-long' ]\n", "not a valid bridge name"),
        ("name = 'x'\nvif = [ 'mac=01:16:3e:00:00:01' ]\n", "multicast"),
        ("name = 'x'\nvif = [ 'rate=fast' ]\n", "rate 'fast'"),
        ("name = 'x'\nvif = [ 'colour=blue' ]\n", "unknown vif keyword 'colour'"),
        ("name = 'x'\nmax_event_channels = 0\n", "d.cfg:2: max_event_channels must be 1..4095"),
        ("name = 'x'\nmax_event_channels = 4096\n", "max_event_channels must be 1..4095"),
        ("name = 'x'\nmax_event_channels = 'many'\n", "max_event_channels must be 1..4095"),
        ("name = 'x'\ncpus = [ '0', '1' ]\n", "d.cfg:2: cpus as a list of per-vCPU CPULISTs is not supported"),
        ("name = 'x'\ncpus = 'nodes:0'\n", "cpus = 'nodes:0': NUMA node ranges ('nodes:0') are not supported"),
        ("name = 'x'\ncpus = '0,x'\n", "cpus = '0,x': 'x' is not a CPU, a range N-M or 'all'"),
        ("name = 'x'\ncpus = '3-1'\n", "'3-1' is not a CPU, a range N-M or 'all'"),
        ("name = 'x'\ncpus = '0,,1'\n", "'' is not a CPU"),
        ("name = 'x'\ncpus = '^all'\n", "'^all' takes every CPU away"),
        ("name = 'x'\ncpus = '0,^0'\n", "cpus = '0,^0': no CPU is left"),
        ("name = 'x'\ncpus = '5000'\n", "CPU 5000 is past the 1024 CPUs an affinity can name"),
    ])
    func semanticErrorsNameTheProblem(text: String, fragment: String) {
        do {
            _ = try DomainConfig(try XLConfig(parsing: text, file: "d.cfg"))
            Issue.record("accepted: \(text)")
        } catch {
            #expect(error.description.hasPrefix("d.cfg:"), "\(error)")
            #expect(error.description.contains(fragment), "\(error)")
        }
    }
}

@Suite struct DeviceSpecTests {
    @Test func diskSpecs() throws {
        let a = try DiskSpec(parsing: "format=raw, vdev=xvda, access=rw, target=/path/disk.img")
        #expect(a.target == "/path/disk.img" && a.vdev == "xvda" && a.access == .readWrite && a.devid == 51712)
        let b = try DiskSpec(parsing: "/dev/vg/lv,raw,xvdb1,ro")
        #expect(b.target == "/dev/vg/lv" && b.access == .readOnly && b.devid == (202 << 8 | 1 << 4 | 1))
        let c = try DiskSpec(parsing: "vdev=hdc, devtype=cdrom, target=/iso/a.iso")
        #expect(c.isCDROM && c.access == .readOnly && c.devid == 22 << 8)
        #expect(try DiskSpec.devid(of: "xvdq") == 1 << 28 | 16 << 8)
        #expect(try DiskSpec.devid(of: "sdb") == 8 << 8 | 16)
        #expect(throws: SpecError.self) { try DiskSpec(parsing: "vdev=xvda") }
        #expect(throws: SpecError.self) { try DiskSpec(parsing: "target=/a") }
        #expect(throws: SpecError.self) { try DiskSpec(parsing: "vdev=xvda, access=rx, target=/a") }
        #expect(throws: SpecError.self) { try DiskSpec.devid(of: "xvd0") }
    }

    @Test func vifSpecs() throws {
        let v = try VifSpec(parsing: "mac=00:16:3e:01:02:03, bridge=xenbr0, rate=100Mb/s")
        #expect(v.mac == MACAddress(bytes: [0, 0x16, 0x3E, 1, 2, 3]))
        #expect(v.rate?.xenstoreValue == "625000,50000")
        #expect(try VifSpec(parsing: "rate=10MB/s@20ms").rate == .init(bytesPerInterval: 200_000, intervalMicroseconds: 20_000))
        #expect(try VifSpec(parsing: "rate=1Gb/s@1s").rate == .init(bytesPerInterval: 125_000_000, intervalMicroseconds: 1_000_000))
        #expect(try VifSpec(parsing: "").bridge == "xenbr0")
        #expect(try VifSpec(parsing: "mtu=9000").mtu == 9000)
        #expect(throws: SpecError.self) { try VifSpec(parsing: "mtu=12") }
        #expect(throws: SpecError.self) { try VifSpec(parsing: "mac=00:16:3e:01:02") }
        // Two hex digits a byte: a sign is no digit (UInt8(_:radix:) would take "-0" and "+e").
        #expect(throws: SpecError.self) { try VifSpec(parsing: "mac=-0:16:3e:01:02:03") }
        #expect(throws: SpecError.self) { try VifSpec(parsing: "mac=+e:16:3e:01:02:03") }
        let r = MACAddress.randomXen()
        #expect(r.bytes.prefix(3) == [0, 0x16, 0x3E] && r.bytes[0] & 1 == 0)
    }
}

/// `xenctl metrics` from the backends' statistics files, no daemon needed.
@Suite struct MetricsTextTests {
    @Test func perQueueCountersBecomeOneMetricWithAQueueLabel() throws {
        let run = FileManager.default.temporaryDirectory.appendingPathComponent("xenctl-metrics-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: run) }
        try FileManager.default.createDirectory(atPath: run + "/stats", withIntermediateDirectories: true)
        try "vif 7 0 tx_packets 30\nvif 7 0 queue0_tx_packets 10\nvif 7 0 queue1_tx_packets 20\nvif 7 0 queue1_rx_packets 5\n"
            .write(toFile: run + "/stats/netback.stats", atomically: true, encoding: .utf8)
        let text = Toolstack(runDir: run).metricsText()
        #expect(text.contains("swiftxen_vif_tx_packets_total{domain=\"d7\",domid=\"7\",devid=\"0\"} 30"), "\(text)")
        #expect(text.contains("swiftxen_vif_queue_tx_packets_total{domain=\"d7\",domid=\"7\",devid=\"0\",queue=\"0\"} 10"), "\(text)")
        #expect(text.contains("swiftxen_vif_queue_tx_packets_total{domain=\"d7\",domid=\"7\",devid=\"0\",queue=\"1\"} 20"), "\(text)")
        #expect(text.contains("swiftxen_vif_queue_rx_packets_total{domain=\"d7\",domid=\"7\",devid=\"0\",queue=\"1\"} 5"), "\(text)")
        #expect(!text.contains("queue0_"), "\(text)")
    }

    /// `xenctl metrics --listen`: a local client that connects and sends
    /// nothing does not keep the next scrape from its answer.
    @Test func anIdleClientDoesNotHoldTheEndpoint() throws {
        let run = FileManager.default.temporaryDirectory.appendingPathComponent("xenctl-metrics-listen-\(getpid())").path
        try FileManager.default.createDirectory(atPath: run + "/stats", withIntermediateDirectories: true)
        try "vbd 3 51712 rd_req 42\n".write(toFile: run + "/stats/blkback.stats", atomically: true, encoding: .utf8)
        var out: [CInt] = [-1, -1]
        #expect(pipe(&out) == 0)
        _ = fcntl(out[0], F_SETFD, FD_CLOEXEC)
        var sockets: [CInt] = []
        var server: pid_t = -1
        defer {
            if server > 0 { kill(server, SIGKILL); var st: Int32 = 0; waitpid(server, &st, 0) }
            for fd in sockets + [out[0]] { close(fd) }
            try? FileManager.default.removeItem(atPath: run)
        }
        func loopback(_ port: UInt16) -> sockaddr_in {
            var a = sockaddr_in()
            a.sin_family = sa_family_t(AF_INET)
            a.sin_port = port.bigEndian
            a.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
            return a
        }
        func connected(_ port: UInt16) -> CInt {
            let c = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            sockets.append(c)
            var a = loopback(port)
            let r = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(c, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            #expect(r == 0, "connect: \(errno)")
            return c
        }
        // A port nothing listens on: one the kernel picks, released.
        let probe = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var a = loopback(0)
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(probe, $0, len) == 0 && getsockname(probe, $0, &len) == 0 } }
        close(probe)
        let port = UInt16(bigEndian: a.sin_port)
        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        server = try ProcessLauncher.spawn(XenctlCLITests.bin, arguments: ["metrics", "--listen", "\(port)", "--run-dir", run],
                                           descriptors: [(null, 0), (out[1], 1), (null, 2)])
        close(out[1]); close(null)
        let ready = ProcessLauncher.readLine(out[0], deadline: monotonicSeconds() + 30)
        try #require(ready?.hasPrefix("serving metrics on http://127.0.0.1:\(port)") == true, "\(ready ?? "no output")")

        _ = connected(port)  // and sends nothing
        let scrape = connected(port)
        let request = Array("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".utf8)
        #expect(send(scrape, request, request.count, Int32(MSG_NOSIGNAL)) == request.count)
        var answer: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        let end = monotonicSeconds() + 15
        while monotonicSeconds() < end {
            var p = pollfd(fd: scrape, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 500) >= 0 else { break }
            guard p.revents != 0 else { continue }
            let n = read(scrape, &buf, buf.count)
            if n <= 0 { break }
            answer += buf[0..<n]
        }
        let text = String(decoding: answer, as: UTF8.self)
        #expect(text.hasPrefix("HTTP/1.1 200 OK\r\n"), "\(text)")
        #expect(text.contains("swiftxen_vbd_rd_req_total{domain=\"d3\",domid=\"3\",devid=\"51712\"} 42"), "\(text)")
    }
}
