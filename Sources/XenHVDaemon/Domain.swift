import CXen
import Glibc
import XenHV

/// One event-channel port's state in xenhv (Xen's `struct evtchn`).
struct Port {
    enum State: Equatable {
        case free
        case unbound(remote: DomID)
        case interdomain(remote: DomID, remotePort: EventPort)
        case virq(UInt32)
    }
    var state: State = .free
    /// The owner's wake-up descriptor (-1 when free): an epoll set, readable
    /// when one of its eventfds is signalled (edge-triggered), that holds
    /// `kick` and the peer's `send`. The owner can poll and drain it but not
    /// write it, and no other domain holds anything the owner can write.
    var wake: CInt = -1
    /// xenhv's own eventfd in `wake` (raises: VIRQs, a peer's close,
    /// EVTCHNOP_unmask), made at the first raise. Held by xenhv alone.
    var kick: CInt = -1
    /// While interdomain: the eventfd this port's owner signals its peer
    /// through, registered in the peer port's `wake`. Held by xenhv and that
    /// owner alone, so no other domain can change its mode or fill it.
    var send: CInt = -1
    /// The client that holds the port; 0 when it belongs to the domain itself
    /// (a guest's ports, or ports the builder made).
    var owner: UInt32 = 0
}

/// A domain as xenhv keeps it (Xen's `struct domain`): its shared objects,
/// its 2-level event-channel table and the process that runs it.
final class Domain {
    let domid: DomID
    var name: String
    let pages: UInt32
    /// Guest pseudo-physical memory (not mapped by xenhv: only the start_info page is, once).
    let memory: SharedMemory?
    let sharedInfo: SharedMemory
    let grantTable: SharedMemory
    let privateArea: SharedMemory
    let portGenerations: SharedMemory
    var ports: [Port]
    /// The process that runs the domain, taken when the toolstack named it
    /// (attachProcess) and kept until destroy: pause, unpause and destroy
    /// signal that very process (one that hung up its connection but lives
    /// on included) or nobody once it has exited, never whatever process
    /// holds its pid later.
    private(set) var process: ProcessHandle?
    var guestClient: UInt32 = 0
    /// The uid the toolstack runs the domain's process as, when it said
    /// (createDomain's guest id base): the wake-up sets of the domain's ports
    /// are made with it as their real uid.
    var processUID: uid_t?
    var storePort: EventPort = 0
    var consolePort: EventPort = 0
    /// Xen's `shutdown_code`: set once, when the domain shuts down or crashes.
    var shutdownReason: ShutdownReason?

    var active: ActiveGrantTable { ActiveGrantTable(base: privateArea.base!) }
    var entries: SharedGrantEntries {
        SharedGrantEntries(base: grantTable.base!, capacity: HVLimits.maxGrantFrames * HVLimits.grantEntriesPerFrame)
    }
    var state: DomainState { active.state ?? .dying }

    init(domid: DomID, name: String, pages: UInt32) throws {
        self.domid = domid
        self.name = name
        self.pages = pages
        memory = pages > 0
            ? try SharedMemory(creating: "xen-\(getpid())-d\(domid)-memory", size: Int(pages) * HVLimits.pageSize, map: false) : nil
        sharedInfo = try SharedMemory(creating: "xen-\(getpid())-d\(domid)-shared-info", size: HVLimits.pageSize, map: false)
        // Mapped so xenhv can repair busy bits after a mapper dies; untouched pages cost nothing.
        grantTable = try SharedMemory(
            creating: "xen-\(getpid())-d\(domid)-grant-table", size: Int(HVLimits.maxGrantFrames) * HVLimits.pageSize)
        privateArea = try SharedMemory(creating: "xen-\(getpid())-d\(domid)-private", size: PrivateLayout.size)
        portGenerations = try SharedMemory(creating: "xen-\(getpid())-d\(domid)-ports", size: Int(HVLimits.eventChannelPorts) * 4)
        ports = Array(repeating: Port(), count: Int(HVLimits.eventChannelPorts))
        active.setPages(pages)
        active.setGrantFrames(HVLimits.initialGrantFrames)
        active.setState(.running)
    }

    /// Takes `pid` as the domain's process (replacing any earlier one).
    func attachProcess(_ pid: pid_t) throws(XenErrno) {
        guard let p = ProcessHandle(pid) else { throw XenErrno(errno) }
        process = p
    }

    /// Stops or continues everything the domain runs, as pausing a domain
    /// stops all its vCPUs: its process and, when that process is the init of
    /// a PID namespace of its own (a guest `xenctl create` confined), every
    /// process in that namespace. Passes repeat until one finds no process it
    /// had not signalled: a stopped process cannot fork, and one a SIGSTOP is
    /// pending for has its fork restarted after the stop, so a pass finds
    /// what forked during the one before (bounded, for a fork storm).
    func signalDomain(_ signal: Int32) {
        signalProcess(signal)
        guard let process, let ns = Self.pidNamespace(process.pid),
              process.signal(0),  // the namespace read was our process's
              ns != Self.ownPIDNamespace, Self.isNamespaceInit(process.pid) else { return }
        var signalled: Set<pid_t> = [process.pid]
        for _ in 0..<16 {
            var fresh = false
            // The guest's namespace and any it nested in it (it is root in its
            // user namespace, so it may make them).
            for pid in Self.processes() where !signalled.contains(pid) && cxen_pid_ns_within(pid, ns.device, ns.inode) == 1 {
                signalled.insert(pid)
                guard let member = ProcessHandle(pid) else { continue }
                // Still in it: the pid was not reused before the handle named it.
                if cxen_pid_ns_within(pid, ns.device, ns.inode) == 1 { member.signal(signal); fresh = true }
            }
            if !fresh { break }
        }
    }

    /// A namespace, as its /proc ns link names it.
    struct Namespace: Equatable {
        let device: UInt64
        let inode: UInt64
    }

    /// The PID namespace `pid` is in.
    static func pidNamespace(_ pid: pid_t) -> Namespace? {
        var st = stat()
        guard stat("/proc/\(pid)/ns/pid", &st) == 0 else { return nil }
        return Namespace(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
    }
    /// xenhv's own, which never changes.
    static let ownPIDNamespace = pidNamespace(getpid())

    /// Whether `pid` is pid 1 of its own innermost namespace (/proc's NSpid).
    static func isNamespaceInit(_ pid: pid_t) -> Bool {
        guard let f = fopen("/proc/\(pid)/status", "r") else { return false }
        defer { fclose(f) }
        var line = [CChar](repeating: 0, count: 256)
        while fgets(&line, Int32(line.count), f) != nil {
            let text = cString(line)
            guard text.hasPrefix("NSpid:") else { continue }
            let ids = text.dropFirst(6).split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" })
            return ids.count > 1 && ids.last == "1"
        }
        return false
    }

    /// Every process's pid (/proc's numeric entries).
    static func processes() -> [pid_t] {
        guard let dir = opendir("/proc") else { return [] }
        defer { closedir(dir) }
        var out: [pid_t] = []
        while let e = readdir(dir) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.baseAddress!.assumingMemoryBound(to: CChar.self)) }
            if let pid = pid_t(name) { out.append(pid) }
        }
        return out
    }

    /// Signals the domain's process, if it still has one; a process that has
    /// exited is not signalled (ESRCH), whoever has its pid now.
    func signalProcess(_ signal: Int32) {
        process?.signal(signal)
    }

    /// Forgets the domain's process (the domain was destroyed).
    func dropProcess() {
        process = nil
    }

    /// Bumps a port's binding generation so senders refresh their cached peer.
    func bumpGeneration(_ port: EventPort) {
        let p = (portGenerations.base! + Int(port) * 4).assumingMemoryBound(to: UInt32.self)
        cxen_store_release_u32(p, cxen_load_acquire_u32(p) &+ 1)
    }

    /// The highest port the domain may hold (`d->max_evtchn_port`, set by
    /// XEN_DOMCTL_set_max_evtchn); the whole 2-level ABI until then.
    var maxPort = HVLimits.eventChannelPorts - 1

    /// `get_free_port`: the lowest free port above 0 and at most ``maxPort``,
    /// or nil when all of them are taken.
    func freePort() -> EventPort? {
        guard maxPort > 0 else { return nil }
        for p in 1...Int(maxPort) where ports[p].state == .free { return EventPort(p) }
        return nil
    }

    /// Fills the start_info page as a PV domain builder does.
    func writeStartInfo() throws {
        guard let memory else { return }
        let offset = Int(pages - SpecialPages.startInfoFromEnd) * HVLimits.pageSize
        let page = try SharedMemory.mapShared(fd: memory.fd.rawValue, size: HVLimits.pageSize, writable: true, offset: offset)
        defer { munmap(page, HVLimits.pageSize) }
        var si = start_info()
        let magic = Array("xen-3.0-x86_64".utf8)
        withUnsafeMutableBytes(of: &si.magic) { $0.copyBytes(from: magic) }
        si.nr_pages = UInt(pages)
        // shared_info is a hypervisor page; we place it at the frame just past RAM.
        si.shared_info = UInt(pages) << 12
        si.store_mfn = xen_pfn_t(pages - SpecialPages.xenstoreFromEnd)
        si.store_evtchn = storePort
        si.console.domU.mfn = xen_pfn_t(pages - SpecialPages.consoleFromEnd)
        si.console.domU.evtchn = consolePort
        page.storeBytes(of: si, as: start_info.self)
    }
}
