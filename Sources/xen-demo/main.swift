// The README's main job, for now: start the hypervisor core, create a guest,
// and show the guest and a backend exchanging requests over a shared ring with
// grants and event channels. (The full dom0 demo grows from here.)
import ArgumentParser
import CXen
import Foundation
import Glibc
import XenHV
import XenRing

@main
struct XenDemo: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "xen-demo",
        abstract: "Start xenhv, create a guest, and exchange block requests over a ring.",
        subcommands: [Run.self, Guest.self], defaultSubcommand: Run.self)
}

/// Where the demo's ring and data pages sit in the guest's memory.
enum DemoLayout {
    static let ringFrame: UInt32 = 8
    static let ringRef: GrantRef = 8
    static let dataFrame: UInt32 = 16  // 11 data pages, one per segment
    static let dataRef: GrantRef = 16
    static let segments = 11
}


/// The byte a sector's data starts with: what the backend's "disk" holds.
func pattern(sector: UInt64, byte: Int) -> UInt8 { UInt8(truncatingIfNeeded: sector &* 31 &+ UInt64(byte)) }

struct Run: ParsableCommand {
    @Option(help: "Requests the guest sends.") var requests = 1000
    @Option(help: "Run directory (sockets); default: $XEN_RUN_DIR or /run/swiftxen-demo-PID.") var runDir: String?

    func run() throws {
        let dir = runDir ?? ProcessInfo.processInfo.environment["XEN_RUN_DIR"] ?? "/tmp/swiftxen-demo-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let socket = dir + "/xenhv.sock"
        var out: [CInt] = [-1, -1]
        guard pipe(&out) == 0 else { throw HypervisorError.system(call: "pipe", errno: errno) }
        _ = fcntl(out[0], F_SETFD, FD_CLOEXEC)
        let xenhv = try ProcessLauncher.spawn(ProcessLauncher.executableDirectory + "/xenhv", arguments: ["--socket", socket, "--log-level", "warning"],
                                              descriptors: [(out[1], 1)])
        close(out[1])
        defer {
            kill(xenhv, SIGTERM)
            var st: Int32 = 0
            waitpid(xenhv, &st, 0)
            if runDir == nil { try? FileManager.default.removeItem(atPath: dir) }
            print("xenhv stopped; nothing left behind")
        }
        guard ProcessLauncher.readLine(out[0]).hasPrefix("xenhv ready") else { throw ValidationError("xenhv did not start") }
        print("xenhv (hypervisor core) listening on \(socket), pid \(xenhv)")

        let hv = try Hypervisor.connect(socketPath: socket)
        let d = try hv.createDomain(pages: 4096, name: "demo-guest")
        print("created domain \(d.domid) 'demo-guest': 16 MiB, store mfn \(d.storeMFN) evtchn \(d.storePort)")

        var toGuest: [CInt] = [-1, -1], fromGuest: [CInt] = [-1, -1]
        guard pipe(&toGuest) == 0, pipe(&fromGuest) == 0 else { throw HypervisorError.system(call: "pipe", errno: errno) }
        for fd in toGuest + fromGuest { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        let guestPid = try ProcessLauncher.spawn(
            ProcessLauncher.executableDirectory + "/xen-demo", arguments: ["guest", "--requests", "\(requests)"],
            environment: ["XENHV_GUEST_FD": "3"],
            descriptors: [(toGuest[0], 0), (fromGuest[1], 1), (d.guestDescriptor, 3)])
        close(toGuest[0]); close(fromGuest[1]); close(d.guestDescriptor)
        try hv.attachProcess(guestPid, to: d.domid)
        print("guest process \(guestPid) runs domain \(d.domid)")

        // The guest tells us its ring-ref and event channel (XenStore's job, once xenstored runs).
        let hello = ProcessLauncher.readLine(fromGuest[0]).split(separator: " ")
        guard hello.count == 3, hello[0] == "ring", let ref = GrantRef(hello[1]), let port = EventPort(hello[2]) else {
            throw ValidationError("guest did not announce its ring")
        }
        print("backend: guest offers ring-ref \(ref), event-channel \(port)")
        let ringPage = try hv.mapGrant(domid: d.domid, ref: ref, writable: true).get()
        let ch = try hv.bindInterdomain(remote: d.domid, remotePort: port)
        _ = ch.consume()
        var back = BackRing(attaching: try ringPage.region.ring(BlkifRing.self, pages: 1))
        print("backend: mapped the ring (\(back.size) slots), bound local port \(ch.port)")
        ProcessLauncher.writeLine(toGuest[1], "connected")

        // Serve READ requests: fill each granted segment by grant copy.
        var served = 0, sectors = 0
        // One bounce page per segment: the copies run as one batch after the loop.
        let sector = UnsafeMutableRawPointer.allocate(byteCount: 4096 * DemoLayout.segments, alignment: 4096)
        defer { sector.deallocate() }
        var copies: [GrantCopy] = []
        copies.reserveCapacity(DemoLayout.segments)
        while served < requests {
            while let req = try back.nextRequest() {
                var status = Int16(BLKIF_RSP_OKAY)
                let n = Int(req.nr_segments)
                if req.operation != UInt8(BLKIF_OP_READ) || n == 0 || n > DemoLayout.segments {
                    status = Int16(BLKIF_RSP_ERROR)
                } else {
                    copies.removeAll(keepingCapacity: true)
                    var s = req.sector_number
                    withUnsafeBytes(of: req.seg) { raw in
                        let segs = raw.bindMemory(to: blkif_request_segment.self)
                        for i in 0..<n {
                            let seg = segs[i]
                            guard seg.first_sect <= seg.last_sect, seg.last_sect < 8 else { status = Int16(BLKIF_RSP_ERROR); return }
                            let count = Int(seg.last_sect - seg.first_sect) + 1
                            let page = sector + i * 4096 + Int(seg.first_sect) * 512
                            for b in 0..<(count * 512) {
                                page.storeBytes(of: pattern(sector: s + UInt64(b / 512), byte: b % 512), toByteOffset: b, as: UInt8.self)
                            }
                            copies.append(GrantCopy(source: .local(page),
                                                    dest: .grant(domid: d.domid, ref: seg.gref, offset: UInt16(seg.first_sect) * 512),
                                                    length: UInt16(count * 512)))
                            s += UInt64(count)
                            sectors += count
                        }
                    }
                    hv.copyGrants(&copies)
                    if copies.contains(where: { $0.status != .okay }) { status = Int16(BLKIF_RSP_ERROR) }
                }
                var rsp = blkif_response()
                rsp.id = req.id
                rsp.operation = req.operation
                rsp.status = status
                back.enqueue(rsp)
                served += 1
            }
            if back.pushResponsesAndCheckNotify() { try ch.notify() }
            if served < requests, try !back.finalCheckForRequests() { ch.wait() }
        }
        let verdict = ProcessLauncher.readLine(fromGuest[0])
        print("backend: served \(served) requests, \(sectors) sectors by grant copy")
        print("guest:   \(verdict)")
        hv.unmapGrant(ringPage)
        try ch.close()
        // Destroying the domain stops its process, as on Xen.
        try hv.destroyDomain(d.domid)
        var st: Int32 = 0
        waitpid(guestPid, &st, 0)
        print("destroyed domain \(d.domid); domains now: \(try hv.listDomains().map { "\($0.domid):\($0.name)" }.joined(separator: ", "))")
        guard verdict.hasPrefix("verified") else { throw ValidationError("guest saw wrong data") }
    }
}

/// The guest side: a tiny blkfront that reads sectors and checks them.
struct Guest: ParsableCommand {
    @Option var requests = 1000

    func run() throws {
        let hv = try Hypervisor.guestFromEnvironment()
        let gt = hv.grantTable!
        let mem = hv.memory!.region
        gt.grantAccess(DemoLayout.ringRef, to: 0, frame: DemoLayout.ringFrame, readOnly: false)
        for i in 0..<DemoLayout.segments {
            gt.grantAccess(DemoLayout.dataRef + GrantRef(i), to: 0, frame: DemoLayout.dataFrame + UInt32(i), readOnly: false)
        }
        var front = FrontRing(initializing: try mem.ring(BlkifRing.self, pages: 1, offset: Int(DemoLayout.ringFrame) * 4096))
        let port = try hv.allocUnbound(remote: 0)
        let ch = try hv.channel(port)
        ProcessLauncher.writeLine(1, "ring \(DemoLayout.ringRef) \(port)")
        guard ProcessLauncher.readLine(0) == "connected" else { throw ValidationError("backend did not connect") }

        var sent = 0, done = 0, bad = 0
        var inFlight: [UInt64: UInt64] = [:]  // id -> first sector
        while done < requests {
            // One request at a time per data area: keep it simple, verify each.
            if sent < requests && inFlight.isEmpty {
                var req = blkif_request()
                req.operation = UInt8(BLKIF_OP_READ)
                req.id = UInt64(sent)
                req.sector_number = UInt64(sent) * 88
                req.nr_segments = UInt8(DemoLayout.segments)
                withUnsafeMutableBytes(of: &req.seg) { raw in
                    let segs = raw.bindMemory(to: blkif_request_segment.self)
                    for i in 0..<DemoLayout.segments {
                        segs[i] = blkif_request_segment(gref: DemoLayout.dataRef + GrantRef(i), first_sect: 0, last_sect: 7)
                    }
                }
                front.enqueue(req)
                inFlight[req.id] = req.sector_number
                sent += 1
                if front.pushRequestsAndCheckNotify() { try ch.notify() }
            }
            while let rsp = try front.nextResponse() {
                guard let first = inFlight.removeValue(forKey: rsp.id) else { bad += 1; continue }
                if rsp.status != Int16(BLKIF_RSP_OKAY) { bad += 1 }
                let data = try mem.bytes(at: Int(DemoLayout.dataFrame) * 4096, count: DemoLayout.segments * 4096)
                for (i, b) in data.enumerated() where b != pattern(sector: first + UInt64(i / 512), byte: i % 512) {
                    bad += 1
                    break
                }
                done += 1
            }
            if !inFlight.isEmpty, try !front.finalCheckForResponses() { ch.wait() }
        }
        ProcessLauncher.writeLine(1, bad == 0 ? "verified \(done) responses, \(done * DemoLayout.segments * 8) sectors, all data correct"
                              : "\(bad) bad responses out of \(done)")
        for i in 0..<DemoLayout.segments { _ = gt.endAccess(DemoLayout.dataRef + GrantRef(i)) }
        _ = ProcessLauncher.readLine(0)  // run until the toolstack destroys the domain
    }
}
