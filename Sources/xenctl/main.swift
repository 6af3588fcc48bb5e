// xenctl: the toolstack (xl's verbs) and the dom0 service launcher.
// Argument parsing only; the work is in the XenCtl library.
import ArgumentParser
import CXen
import Foundation
import Glibc
import Logging
import XenCtl
import XenHV

@main
struct XenCtlCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "xenctl",
        abstract: "The toolstack: dom0 services and xl's verbs.",
        subcommands: [Up.self, Down.self, Status.self, Create.self, List.self, Pause.self, Unpause.self, Destroy.self, BlockList.self,
                      BlockAttach.self, BlockDetach.self, NetworkList.self, NetworkAttach.self, NetworkDetach.self, Shutdown.self,
                      Reboot.self, Top.self, Metrics.self, Units.self, Supervise.self, Monitor.self])

    /// ArgumentParser's own errors (an unknown option, a missing argument, a
    /// value that does not parse) as one `xenctl:` line, as every other
    /// error; help and version as ArgumentParser prints them.
    static func main() {
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch {
            guard exitCode(for: error) != .success else { exit(withError: error) }
            let first = message(for: error).split(separator: "\n").first.map(String.init) ?? "\(error)"
            fail(first.trimmingCharacters(in: .whitespaces).replacingOccurrences(of: "Error: ", with: ""))
        }
    }
}

struct RunDirOption: ParsableArguments {
    @Option(name: .customLong("run-dir"), help: "Run directory: sockets, logs, state (default: $XEN_RUN_DIR or /run/swiftxen).")
    var runDir: String?
    var path: String { runDir ?? ProcessInfo.processInfo.environment["XEN_RUN_DIR"] ?? "/run/swiftxen" }
}

/// Fails with one clear line and a non-zero exit.
func fail(_ message: String) -> Never {
    FileHandle.standardError.write(("xenctl: " + message.escapingControlCharacters + "\n").data(using: .utf8)!)
    exit(1)
}

/// A wait or an interval in seconds from the command line: a finite number
/// in `range`, or one error line before anything is done.
func checkSeconds(_ value: Double, _ option: String, in range: ClosedRange<Double> = 0...86_400) {
    guard value.isFinite, range.contains(value) else {
        fail("--\(option) \(value): give a number of seconds from \(secondsText(range.lowerBound)) to \(secondsText(range.upperBound))")
    }
}

struct Up: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Start the dom0 services, supervised.")
    @OptionGroup var rd: RunDirOption
    @Option(help: "Seconds to wait for every service to be ready (a supervisor started here is then stopped again).")
    var timeout: Double = 60
    func validate() { checkSeconds(timeout, "timeout") }
    func run() throws {
        let toolstack = Toolstack(runDir: rd.path)
        do { try toolstack.up(seconds: timeout) } catch { fail("\(error)") }
        print(toolstack.statusTable())
    }
}

struct Down: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Destroy every guest and stop the dom0 services in order.")
    @OptionGroup var rd: RunDirOption
    func run() throws {
        do {
            if try !Toolstack(runDir: rd.path).down() { print("xenctl: dom0 services are not running") }
        } catch { fail("\(error)") }
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show the dom0 services.")
    @OptionGroup var rd: RunDirOption
    func run() throws {
        let t = Toolstack(runDir: rd.path)
        guard t.supervisorPID() != nil else { fail("dom0 services are not running (xenctl up starts them)") }
        print(t.statusTable())
    }
}

struct List: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List domains, as xl list does.")
    @OptionGroup var rd: RunDirOption
    func run() throws {
        do { print(try Toolstack(runDir: rd.path).listTable()) } catch { fail("\(error)") }
    }
}

struct Destroy: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Destroy a domain (by name or id).")
    @OptionGroup var rd: RunDirOption
    @Argument(help: "Domain name or id.") var domain: String
    func run() throws {
        do { try Toolstack(runDir: rd.path).destroy(domain) } catch { fail("\(error)") }
    }
}

/// `xl pause` and `xl unpause`: one verb each, the same work.
protocol PauseVerb: ParsableCommand {
    static var paused: Bool { get }
    var rd: RunDirOption { get }
    var domain: String { get }
}
extension PauseVerb {
    func run() throws {
        do { try Toolstack(runDir: rd.path).pause(domain, Self.paused) } catch { fail("\(error)") }
    }
}

struct Pause: PauseVerb {
    static let configuration = CommandConfiguration(abstract: "Pause a domain (xl pause): everything its guest runs stops.")
    static let paused = true
    @OptionGroup var rd: RunDirOption
    @Argument(help: "Domain name or id.") var domain: String
}

struct Unpause: PauseVerb {
    static let configuration = CommandConfiguration(abstract: "Unpause a domain (xl unpause).")
    static let paused = false
    @OptionGroup var rd: RunDirOption
    @Argument(help: "Domain name or id.") var domain: String
}

struct Create: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Create a domain from an xl.cfg file; its kernel is a pvguest.")
    @OptionGroup var rd: RunDirOption
    @Argument(help: "The domain's xl.cfg file.") var config: String
    func run() throws {
        _ = cxen_note_termination()  // Ctrl-C while the guest boots: undone, not left half-made
        do {
            let g = try Toolstack(runDir: rd.path).create(configPath: config)
            print("Created domain \(g.name) (id \(g.domid)), guest process \(g.pid)")
            for (vdev, uri) in g.disks { print("  disk \(vdev): \(uri)") }
            for n in g.nics { print("  " + n) }
        } catch { fail("\(error)") }
    }
}

struct BlockList: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "block-list", abstract: "List a domain's virtual disks, as xl block-list does.")
    @OptionGroup var rd: RunDirOption
    @Argument(help: "Domain name or id.") var domain: String
    func run() throws {
        do { print(try Toolstack(runDir: rd.path).blockList(domain)) } catch { fail("\(error)") }
    }
}

struct BlockAttach: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "block-attach", abstract: "Attach a virtual disk to a running domain, as xl block-attach does; prints its NBD URI.")
    @OptionGroup var rd: RunDirOption
    @Argument(help: "Domain name or id.") var domain: String
    @Argument(help: "The disk in xl's syntax, e.g. 'format=raw, vdev=xvdb, access=rw, target=/path/disk.img', in one argument or several ('phy:/dev/sdb' xvdb w).")
    var disk: [String]
    @Option(help: "Seconds to wait for the guest to connect the disk (then it is removed again).") var timeout: Double = 30
    func validate() { checkSeconds(timeout, "timeout") }
    func run() throws {
        _ = cxen_note_termination()  // Ctrl-C while the guest connects it: the device is removed again
        do {
            let (vdev, uri) = try Toolstack(runDir: rd.path).blockAttach(domain, specs: disk, seconds: timeout)
            print("disk \(vdev): \(uri)")
        } catch { fail("\(error)") }
    }
}

struct BlockDetach: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "block-detach", abstract: "Detach a virtual disk, as xl block-detach does.")
    @OptionGroup var rd: RunDirOption
    @Argument(help: "Domain name or id.") var domain: String
    @Argument(help: "The disk: vdev (xvda) or device number (51712).") var device: String
    func run() throws {
        do { try Toolstack(runDir: rd.path).detach(domain, type: "vbd", device: device) } catch { fail("\(error)") }
    }
}

struct NetworkList: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "network-list", abstract: "List a domain's NICs, as xl network-list does.")
    @OptionGroup var rd: RunDirOption
    @Argument(help: "Domain name or id.") var domain: String
    func run() throws {
        do { print(try Toolstack(runDir: rd.path).networkList(domain)) } catch { fail("\(error)") }
    }
}

struct NetworkAttach: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "network-attach", abstract: "Attach a NIC to a running domain, as xl network-attach does; prints the guest's NIC.")
    @OptionGroup var rd: RunDirOption
    @Argument(help: "Domain name or id.") var domain: String
    @Argument(help: "The NIC in xl's syntax: one setting per argument as xl takes them (mac=00:16:3e:01:02:03 bridge=xenbr0), or one comma-separated spec ('mac=00:16:3e:01:02:03, bridge=xenbr0').")
    var vif: [String] = []
    @Option(help: "Seconds to wait for the guest to connect the NIC (then it is removed again).") var timeout: Double = 30
    func validate() { checkSeconds(timeout, "timeout") }
    func run() throws {
        _ = cxen_note_termination()  // Ctrl-C while the guest connects it: the device is removed again
        do { print(try Toolstack(runDir: rd.path).networkAttach(domain, settings: vif, seconds: timeout)) } catch { fail("\(error)") }
    }
}

struct NetworkDetach: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "network-detach", abstract: "Detach a NIC, as xl network-detach does.")
    @OptionGroup var rd: RunDirOption
    @Argument(help: "Domain name or id.") var domain: String
    @Argument(help: "The NIC's device id (0, 1, ...) or MAC address.") var device: String
    func run() throws {
        do { try Toolstack(runDir: rd.path).detach(domain, type: "vif", device: device) } catch { fail("\(error)") }
    }
}

struct Shutdown: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Ask a domain to power off and wait until its on_poweroff action is done (xl shutdown -w).")
    @OptionGroup var rd: RunDirOption
    @Argument(help: "Domain name or id.") var domain: String
    @Option(help: "Seconds to wait for the guest.") var timeout: Double = 30
    func validate() { checkSeconds(timeout, "timeout") }
    func run() throws {
        do {
            if let d = try Toolstack(runDir: rd.path).shutdown(domain, seconds: timeout) {
                print("Domain \(domain) restarted as domain \(d)")
            }
        } catch { fail("\(error)") }
    }
}

struct Reboot: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Ask a domain to reboot and wait until its on_reboot action is done (xl reboot -w).")
    @OptionGroup var rd: RunDirOption
    @Argument(help: "Domain name or id.") var domain: String
    @Option(help: "Seconds to wait for the guest.") var timeout: Double = 30
    func validate() { checkSeconds(timeout, "timeout") }
    func run() throws {
        do {
            if let d = try Toolstack(runDir: rd.path).shutdown(domain, reboot: true, seconds: timeout) {
                print("Domain \(domain) restarted as domain \(d)")
            }
        } catch { fail("\(error)") }
    }
}

struct Top: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Live per-device statistics (requests, packets, bytes, errors).")
    @OptionGroup var rd: RunDirOption
    @Flag(help: "Print one table and exit.") var once = false
    @Option(help: "Seconds between refreshes.") var interval: Double = 1
    func validate() { checkSeconds(interval, "interval", in: 0.1...3600) }
    func run() throws {
        let t = Toolstack(runDir: rd.path)
        guard t.supervisorPID() != nil else { fail("dom0 services are not running (xenctl up starts them)") }
        var previous = t.statistics()
        if once { print(t.topTable(previous: [], seconds: 0)); return }
        while true {
            idle(milliseconds: Int32(interval * 1000))
            print("\u{1B}[H\u{1B}[2J" + t.topTable(previous: previous, seconds: interval))
            previous = t.statistics()
        }
    }
}

struct Metrics: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Per-device counters and service health in Prometheus text format.")
    @OptionGroup var rd: RunDirOption
    @Option(help: "Serve GET /metrics on 127.0.0.1:PORT instead of printing once.") var listen: UInt16?
    func validate() { if listen == 0 { fail("--listen 0: give the port to serve on (1-65535)") } }
    func run() throws {
        let t = Toolstack(runDir: rd.path)
        guard let port = listen else { print(t.metricsText(), terminator: ""); return }
        do { try MetricsServer.serve(port: port) { t.metricsText() } } catch { fail("\(error)") }
    }
}

struct Units: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Write the systemd unit files of the dom0 services.")
    @Option(help: "Directory to write the units to.") var output: String = "backends/systemd"
    @Option(help: "Where the executables are installed.") var bindir: String = "/usr/local/bin"
    func run() throws {
        try FileManager.default.createDirectory(atPath: output, withIntermediateDirectories: true)
        for (name, text) in Toolstack.systemdUnits(bindir: bindir) {
            try text.write(toFile: output + "/" + name, atomically: true, encoding: .utf8)
            print(output + "/" + name)
        }
    }
}

struct Supervise: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run the supervisor in the foreground (xenctl up starts it).", shouldDisplay: false)
    @OptionGroup var rd: RunDirOption
    func run() throws {
        var logger = Logger(label: "xenctl-supervisor")
        logger.logLevel = .info
        let t = Toolstack(runDir: rd.path)
        let s = try Supervisor(runDir: rd.path, services: t.services(bindir: ProcessLauncher.executableDirectory), logger: logger)
        s.beforeStop = {
            t.stopMonitors()
            t.destroyAllGuests()
        }
        s.run()
    }
}

struct Monitor: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Follow a domain and apply its on_poweroff / on_reboot / on_crash actions (xenctl create starts it).",
        shouldDisplay: false)
    @OptionGroup var rd: RunDirOption
    @Option(help: "The domain's name.") var name: String
    @Option(help: "The domain's id.") var domid: DomID
    @Option(help: "The config file the domain was created from (for error lines).") var configPath: String
    @Option(help: "Descriptor to write the ready line to, then close.") var readyFD: Int32?
    func run() throws {
        var logger = Logger(label: "xenctl-monitor")
        logger.logLevel = .info
        let status = Toolstack(runDir: rd.path).runMonitor(name: name, domid: domid, configPath: configPath,
                                                           readyFD: readyFD, logger: logger)
        throw ExitCode(status)
    }
}
