import Glibc
import Logging
import XenHV

/// A guest lives no longer than its hypervisor: when xenhv goes away (its
/// connection hangs up, as when the host's Xen crashes), the guest process
/// ends at once. Otherwise a guest left over from a crashed xenhv would
/// run on, unseen by the restarted one, under a uid a new domain with its
/// domid would be given.
public enum HypervisorWatch {
    public static func exitWhenGone(_ hv: Hypervisor, logger: Logger) {
        let fd = hv.connectionDescriptor
        let rdhup: Int16 = 0x2000  // POLLRDHUP (a _GNU_SOURCE name Glibc's module does not carry)
        // A guest that could not be watched would outlive xenhv: it does not run.
        let watching = DetachedThread.start(name: "xenhv-watch") {
            // No events asked for: poll reports only the hang-up (never a reply's bytes).
            var p = pollfd(fd: fd, events: rdhup, revents: 0)
            while true {
                let n = poll(&p, 1, -1)
                if n < 0 && errno == EINTR { continue }
                if n > 0 && p.revents & (rdhup | Int16(POLLHUP | POLLERR | POLLNVAL)) != 0 { break }
            }
            logger.critical("xenhv went away: this domain is gone with it")
            _exit(3)
        }
        if !watching {
            logger.critical("no thread to watch xenhv with (pthread_create failed): not running unwatched")
            _exit(3)
        }
    }
}
