import Dispatch
import Glibc
import Logging
import Synchronization
import XenHV

extension XenStoreCore {
    /// Plugs in the hypervisor core: XS_INTRODUCE maps the guest's xenstore
    /// page (start_info.store_mfn, a privileged foreign mapping, as C xenstored
    /// maps it) and binds the guest's store event channel. Both are released
    /// when the domain is.
    public func useHypervisor(_ hv: Hypervisor) {
        ringProvider = { domid, mfn, port in
            guard domid < UInt32(HVLimits.firstReservedDomID), domid != 0 else { throw XenErrno.EINVAL }
            let d = XenHV.DomID(domid)
            let mapping = try hv.mapForeignFrames(domid: d, frame: mfn)
            let channel = try hv.bindInterdomain(remote: d, remotePort: port)
            return XenstoreRingPort(
                page: mapping.region.unsafeBaseAddress, eventFD: channel.descriptor,
                notify: { try? channel.notify() },
                release: {
                    try? channel.close()
                    withExtendedLifetime(mapping) {}
                })
        }
    }
}

/// Follows VIRQ_DOM_EXC as C xenstored's check_domains does: every introduced
/// domain the hypervisor no longer has (or has dying) is released (its nodes'
/// watches fire @releaseDomain), and a domain seen shut down for the first time
/// fires @releaseDomain while staying introduced.
public final class DomainDeathWatcher: @unchecked Sendable {
    // Sound: started once; the thread owns `virq` after start.
    let hv: Hypervisor
    let handle: XenStoreDaemonHandle
    let virq: EventChannel
    let logger: Logger

    public init(hypervisor hv: Hypervisor, daemon handle: XenStoreDaemonHandle, logger: Logger) throws {
        self.hv = hv
        self.handle = handle
        self.logger = logger
        virq = try hv.bindVirq(3 /* VIRQ_DOM_EXC */)
    }

    /// Starts the watcher thread.
    public func start() {
        DetachedThread.start(name: "virq-dom-exc") { [self] in
            while true {
                virq.wait()
                // The domains introduced before we ask: one introduced after the
                // listing is absent from it but alive, and must not be taken for
                // dead (xenhv never reuses a domid).
                let known = Mutex<[DomID]>([])
                let ready = DispatchSemaphore(value: 0)
                handle.perform { core in
                    known.withLock { $0 = Array(core.domains.keys) }
                    ready.signal()
                }
                ready.wait()
                guard let list = try? hv.listDomains() else {
                    logger.error("lost the hypervisor; domain deaths are no longer followed")
                    return
                }
                let living = list.filter { DomainState(rawValue: $0.state) != .dying }
                let alive = Set(living.map { UInt32($0.domid) })
                let shutDown = living.filter(\.isShutdown).map { UInt32($0.domid) }
                let dead = known.withLock { $0 }.filter { !alive.contains($0) }
                guard !dead.isEmpty || !shutDown.isEmpty else { continue }
                handle.perform { core in
                    core.domainsShutDown(shutDown)
                    for d in dead { try? core.releaseDomain(d) }
                }
            }
        }
    }
}
