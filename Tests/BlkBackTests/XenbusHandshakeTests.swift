import BlkBack
import BlkFrontKit
import Foundation
import Glibc
import Testing
@testable import XenBus
import XenHV
import XenRing
import XenStore
import XenTestKit

/// blkback's XenBus handshake with a frontend playing by blkif.h, over a real
/// xenstored and real rings: toolstack keys -> InitWait -> the frontend's ring
/// keys -> Connected -> I/O landing in the image -> Closing/Closed -> reconnect
/// -> detach.
@Suite struct XenbusHandshakeTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path

    /// An in-process blkback on a private dom0, a guest called `name`, and
    /// its vbd 51712 on `image` (made in the dom0's directory; default an
    /// empty 8 MiB file) with the toolstack's keys, offered (InitWait).
    final class OfferedDisk {
        let s: Dom0Harness
        let service: BlkbackService
        let g: Dom0Harness.Guest
        let dev: XenBusDevice
        let image: String

        init(_ name: String, image make: (String) -> String = { dir in
            let image = dir + "/disk.img"
            #expect(FileManager.default.createFile(atPath: image, contents: nil) && truncate(image, 8 << 20) == 0)
            return image
        }) throws {
            s = try Dom0Harness(buildDirectory: Dom0Harness.buildDirectory(packageRoot: XenbusHandshakeTests.root))
            image = make(s.dir)
            service = BlkbackService(hypervisor: try s.dom0Hypervisor(), xenbus: try s.dom0XenStore(), logger: .init(label: "blkback"))
            try service.start()
            g = try s.createGuest(name: name)
            dev = XenBusDevice(type: "vbd", frontendDomid: XenStore.DomID(g.domid), devid: 51712)
            try s.xenstore.createDevice(dev, backend: ["params": image, "mode": "w", "type": "file", "device-type": "disk"],
                                        frontend: ["virtual-device": "51712", "device-type": "disk"])
            #expect(Dom0Harness.wait(s.xenstore, state: dev.backendPath) { $0 == .initWait } == .initWait)
        }

        /// A one-queue, one-page frontend published and Connected.
        func connectOneRing() throws -> BlkFront<BlkifRing> {
            let front = try publishOneRing()
            #expect(Dom0Harness.wait(g.xenstore, state: dev.backendPath) { $0 == .connected } == .connected)
            return front
        }

        /// A one-queue, one-page frontend for `device` (default: this one's),
        /// on the guest frames and grant refs from `firstFrame` and
        /// `firstRef` (fronts of one guest stay apart), published and
        /// Initialised.
        func publishOneRing(_ device: XenBusDevice? = nil, firstFrame: UInt32 = 16, firstRef: GrantRef = 8) throws -> BlkFront<BlkifRing> {
            let fe = (device ?? dev).frontendPath
            let front = try BlkFront<BlkifRing>(guest: g.hypervisor, queues: 1, ringPageOrder: 0, firstFrame: firstFrame, firstRef: firstRef)
            let q = front.queues[0]
            try g.xenstore.transaction { t in
                try t.write(fe + "/ring-ref", "\(q.ringRefs[0])")
                try t.write(fe + "/event-channel", "\(q.port)")
                try t.write(fe + "/protocol", "x86_64-abi")
            }
            try g.xenstore.switchState(at: fe, to: .initialised)
            return front
        }

        deinit {
            g.xenstore.close()
            service.stop()
        }
    }

    /// The toolstack removes a device and makes another in its place, and
    /// blkback first sees the new directory in a state that is not
    /// Initialising (one transaction here; in life, a write the old device's
    /// handler made after the re-creation, behind a guest's event storm).
    /// The old device's probe marker is gone, so blkback probes the new one:
    /// its image, read-only. Before, the old entry stayed in charge, and a
    /// frontend connecting got the old image, writable.
    @Test func aDeviceReplacedInOneStepIsProbedAnew() throws {
        let d = try OfferedDisk("replaced") { dir in
            let images = ["a", "b"].map { dir + "/\($0).img" }
            for (img, byte) in zip(images, [UInt8(0xAA), 0xBB]) {
                #expect(FileManager.default.createFile(atPath: img, contents: Data(repeating: byte, count: 8 << 20)))
            }
            return images[0]
        }
        let (s, g, dev) = (d.s, d.g, d.dev)
        let images = ["a", "b"].map { s.dir + "/\($0).img" }
        let probedA = try s.xenstore.readIfExists(dev.backendPath + "/" + BlkbackService.markerKey)
        #expect(probedA != nil)

        try s.xenstore.transaction { t in
            try t.rmIfPresent(dev.backendPath)
            try t.rmIfPresent(dev.frontendPath)
            try t.mkdir(dev.backendPath)
            try t.setPermissions(dev.backendPath, [XSPerm(0, .none), XSPerm(XenStore.DomID(g.domid), .read)])
            try t.mkdir(dev.frontendPath)
            try t.setPermissions(dev.frontendPath, [XSPerm(XenStore.DomID(g.domid), .none), XSPerm(0, .read)])
            for (k, v) in ["params": images[1], "mode": "r", "type": "file", "device-type": "disk", "online": "1",
                           "frontend": dev.frontendPath, "frontend-id": "\(g.domid)", "state": "6"] {
                try t.write(dev.backendPath + "/" + k, v)
            }
            for (k, v) in ["backend": dev.backendPath, "backend-id": "0", "state": "1", "virtual-device": "51712"] {
                try t.write(dev.frontendPath + "/" + k, v)
            }
        }
        #expect(Dom0Harness.wait(s.xenstore, state: dev.backendPath) { $0 == .initWait } == .initWait,
                "the new device was never probed")
        #expect(try s.xenstore.readIfExists(dev.backendPath + "/" + BlkbackService.markerKey) != probedA)

        let front = try d.connectOneRing()
        #expect(try front.read(sector: 0, bytes: 512).data == [UInt8](repeating: 0xBB, count: 512), "served the old image")
        #expect(try front.write(sector: 0, [UInt8](repeating: 1, count: 512)) != 0, "the new disk is read-only")
    }

    /// Online resize, as Linux's xen_vbd_resize: an image grown under a
    /// connected disk shows up in `sectors` (blkback looks once a second),
    /// the state is written again for the frontend to look, and the new
    /// sectors are served.
    @Test func aGrownImageIsSeenByTheConnectedFrontend() throws {
        let d = try OfferedDisk("growing")
        let (s, g, dev, image) = (d.s, d.g, d.dev, d.image)
        let front = try d.connectOneRing()
        #expect(try g.xenstore.read(dev.backendPath + "/sectors") == "16384")
        #expect(try front.read(sector: 20000, bytes: 512).status != 0, "past the end")

        #expect(truncate(image, 16 << 20) == 0)
        #expect(eventually(seconds: 10, every: 50) { (try? g.xenstore.read(dev.backendPath + "/sectors")) == "32768" },
                "the new size never reached the store")
        #expect(try s.xenstore.state(at: dev.backendPath) == .connected)
        #expect(try front.read(sector: 20000, bytes: 512) == (0, [UInt8](repeating: 0, count: 512)))
    }

    /// An image whose reads can be held in flight for as long as a test
    /// wants: a loop device over a file on a FUSE mount (bindfs), whose
    /// server is stopped (SIGSTOP) to freeze and continued to thaw. Needs
    /// root. ``remove()`` thaws it and takes the loop device and the mount away.
    final class FreezableDisk {
        let dir: String
        let mountPoint: String
        let loop: String
        let server: Process
        struct SetupFailed: Error { let what: String }

        init(bytes: Int) throws {
            dir = FileManager.default.temporaryDirectory.appendingPathComponent("freezable-\(UUID().uuidString)").path
            mountPoint = dir + "/mnt"
            try FileManager.default.createDirectory(atPath: dir + "/src", withIntermediateDirectories: true)
            try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
            server = Process()
            server.executableURL = URL(fileURLWithPath: "/usr/bin/bindfs")
            server.arguments = ["-f", dir + "/src", mountPoint]
            try server.run()
            let mountPoint = mountPoint
            let mounted = eventually(seconds: 10) {
                ((try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? "").contains(" \(mountPoint) ")
            }
            let image = mountPoint + "/disk.img"
            guard mounted, FileManager.default.createFile(atPath: image, contents: nil), truncate(image, off_t(bytes)) == 0 else {
                loop = ""
                remove()
                throw SetupFailed(what: "bindfs did not mount \(mountPoint)")
            }
            let attach = CommandResult.run("losetup", ["-f", "--show", image])
            guard attach.ok, attach.out.hasPrefix("/dev/loop") else {
                loop = ""
                remove()
                throw SetupFailed(what: "losetup: \(attach)")
            }
            loop = attach.out.trimmingCharacters(in: .whitespacesAndNewlines)
        }

        func freeze() { kill(server.processIdentifier, SIGSTOP) }
        func thaw() { kill(server.processIdentifier, SIGCONT) }

        func remove() {
            thaw()
            if !loop.isEmpty { _ = CommandResult.run("losetup", ["-d", loop]) }
            _ = CommandResult.run("fusermount3", ["-u", "-z", mountPoint])
            server.terminate()
            server.waitUntilExit()
            try? FileManager.default.removeItem(atPath: dir)
        }
    }

    /// A frontend that closes with reads in flight on storage that does not
    /// answer holds nobody but itself: blkback reports Closed at once (as
    /// Linux's xen_blkif_disconnect leaves the ring to its last completion)
    /// and another device is offered meanwhile, on the queue all devices
    /// share. Once Closed, the frontend may give its pages to others, so the
    /// reads are answered with errors and none of their data reaches the
    /// guest. The frontend starting over, and a new device of the same
    /// image, are connected only once the reads are done (no old I/O lands
    /// after new). Before, the disconnect waited for the I/O on the shared
    /// queue: no Closed, no other device, until the storage answered.
    @Test(.enabled(if: getuid() == 0, "needs root: a loop device and a FUSE mount"))
    func aDisconnectWithIOInFlightHoldsNoOtherDevice() throws {
        let slow = try FreezableDisk(bytes: 16 << 20)
        defer { slow.remove() }
        let d = try OfferedDisk("slow") { _ in slow.loop }
        defer { d.service.stop() }  // before the disk is removed (the deferred run last first)
        let (s, g, dev, service) = (d.s, d.g, d.dev, d.service)
        let front = try d.connectOneRing()

        slow.freeze()
        defer { slow.thaw() }
        let reads = 8
        let buffers = try (0..<reads).map { _ in try front.makeBuffer(pages: 1) }
        for b in buffers { try front.fill(b, with: [UInt8](repeating: 0x5A, count: 4096)) }
        // A mebibyte apart: never in the page cache, not even by read-ahead.
        try front.pushBatch(try buffers.enumerated().map { i, b in
            try front.rwRequest(BlkifOp.read, sector: UInt64(i + 1) * 2048, buffer: b, bytes: 4096)
        })
        #expect(eventually { service.withDevices { $0[dev.backendPath]?.stats.readRequests ?? 0 } == UInt64(reads) },
                "the reads never reached the disk")

        try g.xenstore.switchState(at: dev.frontendPath, to: .closed)
        // Required: a backend stuck in the disconnect would hold the calls below.
        try #require(Dom0Harness.wait(s.xenstore, state: dev.backendPath, seconds: 10) { $0 == .closed } == .closed,
                     "blkback waited for the frontend's I/O before reporting Closed")
        let other = XenBusDevice(type: "vbd", frontendDomid: XenStore.DomID(g.domid), devid: 51728)
        #expect(FileManager.default.createFile(atPath: s.dir + "/other.img", contents: nil) && truncate(s.dir + "/other.img", 1 << 20) == 0)
        try s.xenstore.createDevice(other, backend: ["params": s.dir + "/other.img", "mode": "w", "type": "file", "device-type": "disk"],
                                    frontend: ["virtual-device": "51728", "device-type": "disk"])
        #expect(Dom0Harness.wait(s.xenstore, state: other.backendPath, seconds: 10) { $0 == .initWait } == .initWait,
                "another device waited for this one's I/O")

        // The frontend starts over on a new ring while the old one's reads
        // still wait; a second device of the same image comes up too.
        try g.xenstore.switchState(at: dev.frontendPath, to: .initialising)
        #expect(Dom0Harness.wait(s.xenstore, state: dev.backendPath, seconds: 10) { $0 == .initWait } == .initWait)
        let again = try d.publishOneRing(firstFrame: 512, firstRef: 512)
        let same = XenBusDevice(type: "vbd", frontendDomid: XenStore.DomID(g.domid), devid: 51744)
        try s.xenstore.createDevice(same, backend: ["params": slow.loop, "mode": "w", "type": "phy", "device-type": "disk"],
                                    frontend: ["virtual-device": "51744", "device-type": "disk"])
        #expect(Dom0Harness.wait(s.xenstore, state: same.backendPath, seconds: 10) { $0 == .initWait } == .initWait)
        let sameFront = try d.publishOneRing(same, firstFrame: 640, firstRef: 1024)
        service.settle()
        #expect(try s.xenstore.state(at: dev.backendPath) == .initWait, "connected beside rings still in use")
        #expect(try s.xenstore.state(at: same.backendPath) == .initWait, "a device of the same image connected beside its old I/O")
        #expect(service.withDevices { $0[dev.backendPath]?.isStopping } == true)

        slow.thaw()
        for p in [dev.backendPath, same.backendPath] {
            #expect(Dom0Harness.wait(s.xenstore, state: p, seconds: 10) { $0 == .connected } == .connected,
                    "\(p) never connected once the old reads were done")
        }
        var answered = 0
        while answered < reads, let r = try? front.waitResponse(timeoutMs: 10_000) {
            #expect(r.status != 0, "a read answered after Closed claims data it did not give")
            answered += 1
        }
        #expect(answered == reads, "the old ring's reads were not all answered")
        for b in buffers {
            #expect(try front.contents(b, count: 4096) == [UInt8](repeating: 0x5A, count: 4096), "a read after Closed wrote into a guest page")
        }
        #expect(try again.read(sector: 0, bytes: 4096).status == 0)
        #expect(try sameFront.read(sector: 2048, bytes: 4096).status == 0)
        #expect(service.withDevices { $0[dev.backendPath]?.isStopping } == false)
    }

    /// A guest writing its state in a loop costs blkback one handler per
    /// turn of its queue, not one per write (XSA-349: Linux drops a watch's
    /// events while one is pending): the queue every guest's devices share
    /// never holds a backlog of them. Here the queue is held while the guest
    /// writes 500 times.
    @Test func aFrontendStateStormIsCoalesced() throws {
        let d = try OfferedDisk("stormy")
        let (s, g, dev, service) = (d.s, d.g, d.dev, d.service)
        service.settle()
        let before = service.withDevices { _ in service.frontendEventsHandled }
        let writes = 500
        service.withDevices { _ in
            for _ in 0..<writes { try? g.xenstore.write(dev.frontendPath + "/state", "1") }
            // Every event is at blkback's client once this reply is (events precede it on the wire).
            _ = try? service.xs.exists("/")
        }
        service.settle()
        let handled = service.withDevices { _ in service.frontendEventsHandled } - before
        #expect(handled >= 1 && handled <= 2, "\(handled) handlers for \(writes) writes")
        #expect(try s.xenstore.state(at: dev.backendPath) == .initWait)
    }

    /// `restartedBackend`: blkback is restarted just as the toolstack takes
    /// the device offline, so the new one finds a removal under way.
    @Test(arguments: [false, true])
    func handshakeConnectsServesAndReconnects(restartedBackend: Bool) throws {
        let s = try Dom0Harness(buildDirectory: Dom0Harness.buildDirectory(packageRoot: Self.root))
        let image = s.dir + "/disk.img"
        #expect(FileManager.default.createFile(atPath: image, contents: nil))
        #expect(truncate(image, 8 << 20) == 0)

        var service = BlkbackService(hypervisor: try s.dom0Hypervisor(), xenbus: try s.dom0XenStore(),
                                     logger: .init(label: "blkback"))
        try service.start()
        defer { service.stop() }

        let g = try s.createGuest(name: "disky")
        defer { g.xenstore.close() }
        let dev = XenBusDevice(type: "vbd", frontendDomid: XenStore.DomID(g.domid), devid: 51712)
        try s.xenstore.createDevice(dev, backend: ["params": image, "mode": "w", "type": "file",
                                                   "device-type": "disk", "discard-enable": "1"],
                                    frontend: ["virtual-device": "51712", "device-type": "disk"])
        #expect(Dom0Harness.wait(s.xenstore, state: dev.backendPath) { $0 == .initWait } == .initWait)
        // What the backend offers, as the frontend reads it.
        #expect(try g.xenstore.read(dev.backendPath + "/max-ring-page-order") == "4")
        #expect(try g.xenstore.read(dev.backendPath + "/feature-max-indirect-segments") == "256")

        /// A ring-page-order written, even 0 (as the Windows PV drivers do),
        /// names the refs ring-ref0..N (Linux's connect_ring, multi_ref).
        func connect(order: Int = 1) throws -> BlkFront<BlkifRing> {
            let front = try BlkFront<BlkifRing>(guest: g.hypervisor, queues: 1, ringPageOrder: order)
            let q = front.queues[0]
            try g.xenstore.transaction { t in
                try t.write(dev.frontendPath + "/ring-page-order", "\(order)")
                for (i, r) in q.ringRefs.enumerated() { try t.write(dev.frontendPath + "/ring-ref\(i)", "\(r)") }
                try t.write(dev.frontendPath + "/event-channel", "\(q.port)")
                try t.write(dev.frontendPath + "/protocol", "x86_64-abi")
                try t.write(dev.frontendPath + "/feature-persistent", "1")
            }
            try g.xenstore.switchState(at: dev.frontendPath, to: .initialised)
            #expect(Dom0Harness.wait(g.xenstore, state: dev.backendPath) { $0 == .connected } == .connected)
            return front
        }

        let front = try connect()
        #expect(try g.xenstore.read(dev.backendPath + "/sectors") == "\((8 << 20) / 512)")
        #expect(try g.xenstore.read(dev.backendPath + "/feature-flush-cache") == "1")
        #expect(try g.xenstore.read(dev.backendPath + "/feature-discard") == "1")
        let data = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        #expect(try front.write(sector: 16, data) == 0)
        #expect(try front.flush() == 0)
        let onDisk = try FileHandle(forReadingFrom: URL(fileURLWithPath: image))
        try onDisk.seek(toOffset: 16 * 512)
        #expect([UInt8](try onDisk.read(upToCount: 8192) ?? Data()) == data)
        #expect(try front.read(sector: 16, bytes: 8192).data == data)

        // Frontend closes: the backend follows; a new Initialising is a reconnect.
        try g.xenstore.switchState(at: dev.frontendPath, to: .closing)
        #expect(Dom0Harness.wait(g.xenstore, state: dev.backendPath) { $0 == .closing } == .closing)
        try g.xenstore.switchState(at: dev.frontendPath, to: .closed)
        #expect(Dom0Harness.wait(g.xenstore, state: dev.backendPath) { $0 == .closed } == .closed)
        try g.xenstore.switchState(at: dev.frontendPath, to: .initialising)
        #expect(Dom0Harness.wait(g.xenstore, state: dev.backendPath) { $0 == .initWait } == .initWait)
        let again = try connect(order: 0)
        #expect(try again.read(sector: 16, bytes: 8192).data == data)

        // The toolstack takes the device offline as libxl does (online=0, state
        // Closing): the backend reports Closed only once the frontend has
        // closed, which is what `xl block-detach` waits for.
        #expect(service.deviceNames == [dev.backendPath])
        if restartedBackend { service.stop() }
        try s.xenstore.transaction { t in
            try t.write(dev.backendPath + "/online", "0")
            try t.write(dev.backendPath + "/state", "\(XenbusState.closing.rawValue)")
        }
        if restartedBackend {
            service = BlkbackService(hypervisor: try s.dom0Hypervisor(), xenbus: try s.dom0XenStore(),
                                     logger: .init(label: "blkback"))
            try service.start()
        }
        service.settle()
        #expect(try s.xenstore.state(at: dev.backendPath) == .closing, "Closed while the frontend is still connected")
        try g.xenstore.switchState(at: dev.frontendPath, to: .closed)
        #expect(Dom0Harness.wait(g.xenstore, state: dev.backendPath) { $0 == .closed } == .closed)
        // Then it removes the directories: the backend lets go of the device.
        try s.xenstore.destroyDevice(dev)
        service.settle()
        #expect(service.deviceNames.isEmpty)
    }

    /// Keys as Linux's xen-blkback reads them: the backend waits for the
    /// toolstack's `mode` (a disk is never opened writable for want of it);
    /// an empty `protocol` means the native ABI (xenbus_scanf finds nothing);
    /// `feature-persistent` is any non-zero number (xenbus_read_unsigned).
    @Test func modeIsAwaitedEmptyProtocolIsNativeAnyNonZeroPersistent() throws {
        let s = try Dom0Harness(buildDirectory: Dom0Harness.buildDirectory(packageRoot: Self.root))
        let image = s.dir + "/disk.img"
        #expect(FileManager.default.createFile(atPath: image, contents: nil))
        #expect(truncate(image, 8 << 20) == 0)
        let service = BlkbackService(hypervisor: try s.dom0Hypervisor(), xenbus: try s.dom0XenStore(),
                                     logger: .init(label: "blkback"))
        try service.start()
        defer { service.stop() }
        let g = try s.createGuest(name: "keys")
        defer { g.xenstore.close() }
        let dev = XenBusDevice(type: "vbd", frontendDomid: XenStore.DomID(g.domid), devid: 51712)
        // A toolstack writing its keys one by one: params first, no mode yet.
        try s.xenstore.createDevice(dev, backend: ["params": image, "type": "file", "device-type": "disk"],
                                    frontend: ["virtual-device": "51712", "device-type": "disk"])
        service.settle()
        #expect(service.deviceNames.isEmpty, "the disk was opened before its mode was known")
        #expect(try s.xenstore.state(at: dev.backendPath) == .initialising)
        try s.xenstore.write(dev.backendPath + "/mode", "r")
        #expect(Dom0Harness.wait(s.xenstore, state: dev.backendPath) { $0 == .initWait } == .initWait)

        let front = try BlkFront<BlkifRing>(guest: g.hypervisor, queues: 1, ringPageOrder: 0)
        let q = front.queues[0]
        try g.xenstore.transaction { t in
            try t.write(dev.frontendPath + "/ring-ref", "\(q.ringRefs[0])")
            try t.write(dev.frontendPath + "/event-channel", "\(q.port)")
            try t.write(dev.frontendPath + "/protocol", "")
            try t.write(dev.frontendPath + "/feature-persistent", "2")
        }
        try g.xenstore.switchState(at: dev.frontendPath, to: .initialised)
        #expect(Dom0Harness.wait(g.xenstore, state: dev.backendPath) { $0 == .connected } == .connected)
        // Read-only, as the mode that came second said.
        #expect(try front.write(sector: 0, [UInt8](repeating: 1, count: 4096)) == BlkifStatus.error.rawValue)
        #expect(try front.read(sector: 0, bytes: 4096).status == 0)
        let persistent = service.withDevices { $0[dev.backendPath]?.persistentGrants ?? -1 }
        #expect(persistent > 0, "feature-persistent=2 was not taken as on")
    }
}
