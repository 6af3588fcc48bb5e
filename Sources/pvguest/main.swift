// pvguest: a PV guest process. Its "kernel" connects to xenstore over its ring,
// brings up a blkfront for each vbd the toolstack gave it, and exports every
// disk over NBD so real tools drive it. Argument parsing only; see PVGuest.
import ArgumentParser
import Foundation
import Glibc
import Logging
import NBD
import PVGuest
import XenBus
import XenHV

@main
struct PVGuestCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pvguest",
        abstract: "A PV guest: blkfront disks exported over NBD (run by the toolstack with XENHV_GUEST_FD).")

    @Option(help: "Directory for the NBD sockets (default: $XEN_RUN_DIR/guests/<domid>).")
    var nbdDir: String?

    @Option(help: "Descriptor to write the disk lines and the ready line to, then close (the toolstack's pipe).")
    var readyFD: Int32?

    @Option(help: "Ring page order to ask the backends for (0-4).")
    var ringPageOrder = 1

    func validate() throws {
        guard (0...4).contains(ringPageOrder) else { throw ValidationError("--ring-page-order must be 0..4") }
    }

    func run() throws {
        var logger = Logger(label: "pvguest")
        logger.logLevel = .info
        var term: [CInt] = [SIGTERM, SIGINT, SIGHUP]
        var set = sigset_t()
        sigemptyset(&set)
        for s in term { sigaddset(&set, s) }
        pthread_sigmask(SIG_BLOCK, &set, nil)

        let hv = try Hypervisor.guestFromEnvironment()
        let xs = try XenBusClient.guest(hypervisor: hv)
        let home = try xs.getDomainPath(UInt32(hv.domid))
        let runDir = ProcessInfo.processInfo.environment["XEN_RUN_DIR"] ?? "/run/swiftxen"
        let dir = nbdDir ?? "\(runDir)/guests/\(hv.domid)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let pages = try GuestPages(hypervisor: hv)
        let grants = try GrantRefs(hypervisor: hv)

        var lines: [String] = []
        var servers: [NBDServer] = []
        for devid in ((try? xs.directory(home + "/device/vbd")) ?? []).sorted() {
            let fe = home + "/device/vbd/" + devid
            let device = try BlkFrontDevice(hypervisor: hv, xenstore: xs, frontendPath: fe, pages: pages, grants: grants,
                                            ringPageOrder: ringPageOrder, logger: logger)
            let be = try xs.read(fe + "/backend")
            let name = (try? xs.readIfExists(be + "/dev")) ?? nil ?? "d\(devid)"
            let server = NBDServer(exportName: name, device: device, logger: logger)
            let socket = "\(dir)/\(name).sock"
            try server.listen(unixPath: socket)
            servers.append(server)
            lines.append("disk \(name) \(device.size / 512) sectors\(device.isReadOnly ? " ro" : "") nbd+unix:///\(name)?socket=\(socket)")
        }
        lines.append("pvguest ready domain \(hv.domid)")
        for l in lines { print(l) }
        fflush(nil)
        if let fd = readyFD {
            for l in lines { ProcessLauncher.writeLine(fd, l) }
            close(fd)
        }
        _ = term.count
        var sig: Int32 = 0
        sigwait(&set, &sig)
        for s in servers { s.stop() }
        xs.close()
    }
}
