import Glibc
import CXen

/// A domain id (`domid_t`).
public typealias DomID = UInt16
/// An event-channel port (`evtchn_port_t`).
public typealias EventPort = UInt32
/// A grant reference (`grant_ref_t`).
public typealias GrantRef = UInt32
/// A handle returned by a grant map (`grant_handle_t`).
public typealias GrantHandle = UInt32

/// Fixed numbers of the hypervisor core, Xen's defaults where Xen has one.
public enum HVLimits {
    public static let pageSize = 4096
    /// The online CPUs (at least 1): what Linux's drivers default their
    /// queue counts to (blkback, blkfront, xen-netback and xen-netfront's
    /// max_queues).
    public static var onlineCPUs: Int { max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))) }
    /// 2-level ABI on 64-bit: `EVTCHN_2L_NR_CHANNELS` = 64 * 64; port 0 is never valid.
    public static let eventChannelPorts: UInt32 = 4096
    /// Xen's default `max_grant_frames`.
    public static let maxGrantFrames: UInt32 = 64
    /// v1 entries per 4 KiB grant frame.
    public static let grantEntriesPerFrame: UInt32 = 512
    /// Frames a new domain's table starts with (Linux guests ask for more with setup_table).
    public static let initialGrantFrames: UInt32 = 4
    /// Xen's default `max_maptrack_frames` (1024); xenhv's --max-maptrack-frames changes it.
    public static let maptrackFrames: UInt32 = 1024
    /// `MAPTRACK_PER_PAGE`: 4096 / 16-byte `struct grant_mapping`.
    public static let maptrackEntriesPerFrame: UInt32 = 256
    /// Handles one mapper can hold at once, by default.
    public static let maptrackEntries: UInt32 = maptrackFrames * maptrackEntriesPerFrame
    /// `DOMID_FIRST_RESERVED`: domain ids from here up are special.
    public static let firstReservedDomID: DomID = 0x7FF0
    /// `DOMID_SELF`.
    public static let domidSelf: DomID = 0x7FF0
    /// Largest guest accepted at creation (64 GiB of 4 KiB pages).
    public static let maxGuestPages: UInt32 = 16 << 20
}

/// Where the domain builder puts the special pages, counted back from the end of
/// the guest's pseudo-physical memory (as a PV builder places them after the kernel).
/// Frame numbers are guest PFNs; in this core the P2M is the identity, so an MFN
/// handed to the guest (store_mfn, console mfn) is the same number.
public enum SpecialPages {
    public static let startInfoFromEnd: UInt32 = 1
    public static let xenstoreFromEnd: UInt32 = 2
    public static let consoleFromEnd: UInt32 = 3
    /// Pages reserved at the top of guest memory.
    public static let reserved: UInt32 = 3
}

/// The hypervisor-private per-domain area shared by xenhv and dom0 processes
/// (never handed to the guest): a control page, then one `ActiveGrant` per
/// possible grant entry — Xen's `struct active_grant_entry`.
package enum PrivateLayout {
    package static let controlSize = 4096
    /// Control page words (u32): state, nr_grant_frames, nr_pages, generation.
    package static let stateOffset = 0
    package static let grantFramesOffset = 4
    package static let pagesOffset = 8
    package static let maxEntries = Int(HVLimits.maxGrantFrames * HVLimits.grantEntriesPerFrame)
    /// u64 pin/lock word + u32 frame + u32 spare.
    package static let activeStride = 16
    package static var size: Int { controlSize + maxEntries * activeStride }
}

/// Domain states as seen in the control page.
public enum DomainState: UInt32, Sendable, CustomStringConvertible {
    case running = 1
    case paused = 2
    case dying = 3
    /// Shut down with reason SHUTDOWN_crash: the guest process went away
    /// without the toolstack destroying the domain (Xen's domain_crash), or it
    /// reported SHUTDOWN_crash itself.
    case crashed = 4
    /// The guest shut itself down (SCHEDOP_shutdown) with another reason; the
    /// toolstack applies on_poweroff / on_reboot.
    case shutdown = 5

    /// xl list's state column ("rbpscd": running, blocked, paused, shutdown,
    /// crashed, dying). As in xl, a crashed domain is also shut down: "---sc-".
    public var description: String {
        switch self {
        case .running: "r-----"
        case .paused: "--p---"
        case .crashed: "---sc-"
        case .shutdown: "---s--"
        case .dying: "-----d"
        }
    }

    /// Xen's XEN_DOMINF_shutdown: the shutdown reason is valid.
    public var isShutdown: Bool { self == .shutdown || self == .crashed }
}

/// `enum sched_shutdown_reason` (sched.h): why a domain shut down, carried by
/// SCHEDOP_shutdown and reported in the domain info (xc_domaininfo's
/// shutdown_reason, libxl_shutdown_reason).
public enum ShutdownReason: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    case poweroff = 0
    case reboot = 1
    case suspend = 2
    case crash = 3
    case watchdog = 4
    case softReset = 5

    /// libxl's names (libxl_shutdown_reason_to_string).
    public var description: String {
        switch self {
        case .poweroff: "poweroff"
        case .reboot: "reboot"
        case .suspend: "suspend"
        case .crash: "crash"
        case .watchdog: "watchdog"
        case .softReset: "soft_reset"
        }
    }
}

/// A mapper's maptrack table (Xen's `struct grant_mapping` array), shared with
/// xenhv so it can release a dead mapper's pins: a header page with the high-water
/// mark, then one u64 per handle: ref (bits 0-31), domid (32-47), flags (48-63).
package enum MaptrackLayout {
    package static let headerSize = 4096
    package static let entryStride = 8
    package static let inUse: UInt64 = 1 << 48
    package static let writable: UInt64 = 1 << 49
    package static func size(entries: UInt32) -> Int { headerSize + Int(entries) * entryStride }

    @inline(__always) package static func pack(domid: DomID, ref: GrantRef, writable w: Bool) -> UInt64 {
        UInt64(ref) | UInt64(domid) << 32 | inUse | (w ? writable : 0)
    }
}
