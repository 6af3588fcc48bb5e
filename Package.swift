// swift-tools-version: 6.0
// Xen's split-driver I/O model in userspace: hypervisor core, xenstored, backends, toolstack.
import PackageDescription

let package = Package(
    name: "SwiftXen",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "xenhv", targets: ["xenhv"]),
        .executable(name: "xenstored", targets: ["xenstored"]),
        .executable(name: "xen-demo", targets: ["xen-demo"]),
        .executable(name: "xenctl", targets: ["xenctl"]),
        .executable(name: "pvguest", targets: ["pvguest"]),
        .executable(name: "xen-bench", targets: ["xen-bench"]),
        .executable(name: "blkback", targets: ["blkback"]),
        .executable(name: "netback", targets: ["netback"]),
        .library(name: "XenHV", targets: ["XenHV"]),
        .library(name: "XenRing", targets: ["XenRing"]),
        .library(name: "XenStore", targets: ["XenStore"]),
        .library(name: "XenBus", targets: ["XenBus"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-system", from: "1.4.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.0.0"),
    ],
    targets: [
        // The thin C shim: libxen-dev headers, barriers, atomics, SCM_RIGHTS, memfd, eventfd.
        .target(name: "CXen"),

        // Shared rings with ring.h's exact semantics, generic over entry types.
        .target(name: "XenRing", dependencies: ["CXen"]),

        // Hypervisor core client library: domains, guest memory, grant tables, event channels.
        .target(
            name: "XenHV",
            dependencies: [
                "CXen", "XenRing",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
            ]),
        // The xenhv daemon's logic (lifecycle, descriptor hand-out, death clean-up).
        .target(
            name: "XenHVDaemon",
            dependencies: ["XenHV", "CXen", .product(name: "Logging", package: "swift-log")]),
        .executableTarget(
            name: "xenhv",
            dependencies: [
                "XenHVDaemon", "XenHV",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]),

        // xenstored: store core, xs_wire codec, socket and ring transports.
        .target(
            name: "XenStore",
            dependencies: ["CXen", "XenHV", .product(name: "Logging", package: "swift-log")]),
        // XenBus client library for backends, frontends and the toolstack.
        .target(
            name: "XenBus",
            dependencies: ["CXen", "XenStore", "XenHV", .product(name: "Logging", package: "swift-log")]),
        .executableTarget(
            name: "xenstored",
            dependencies: [
                "XenStore", "XenHV",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]),
        // Release-mode xenstored benchmarks against a bare Unix-socket baseline (scripts/bench-xenstore).
        .executableTarget(
            name: "xenstore-bench",
            dependencies: [
                "XenStore",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]),

        // The README's main job, for now: a guest and a backend exchanging requests over a ring.
        .executableTarget(
            name: "xen-demo",
            dependencies: [
                "XenHV", "XenRing", "CXen",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]),
        // Release-mode benchmarks; each measures its own baseline in the same run.
        .executableTarget(
            name: "xen-bench",
            dependencies: [
                "XenHV", "XenRing", "CXen",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]),
        // Test peer processes (guest, mapper, lying producer) driven by the integration tests.
        .executableTarget(
            name: "xen-testpeer",
            dependencies: [
                "XenHV", "XenRing", "CXen",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]),

        // C code for tests only: ring.h's own macros on shared memory, and offsetof/sizeof probes.
        .target(name: "CXenTestSupport", dependencies: ["CXen"]),

        // blkback: blkif rings served from raw images and block devices with libaio.
        .systemLibrary(name: "CLibAIO", path: "Sources/CLibAIO"),
        .target(
            name: "BlkBack",
            dependencies: [
                "CXen", "CLibAIO", "XenHV", "XenRing", "XenBus", "XenStore",
                .product(name: "Logging", package: "swift-log"),
            ]),
        // A simulated blkfront (guest side of the blkif rings) for tests and benchmarks.
        .target(name: "BlkFrontKit", dependencies: ["CXen", "XenHV", "XenRing", "BlkBack"]),
        // Release-mode blkback benchmarks: null mode, and the rings against fio on the same image.
        .executableTarget(
            name: "blkback-bench",
            dependencies: [
                "BlkBack", "BlkFrontKit", "XenHV", "XenRing", "CXen", "XenBus", "XenStore", "XenTestKit",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]),
        .executableTarget(
            name: "blkback",
            dependencies: [
                "BlkBack", "XenBus", "XenHV", "CXen",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]),

        // netback: netif rings bridged to Linux taps; links and bridges through libnl-route-3.
        .systemLibrary(name: "CNetlink", path: "Sources/CNetlink", pkgConfig: "libnl-route-3.0"),
        .target(name: "CNetShim", dependencies: ["CNetlink"]),
        .target(
            name: "NetBack",
            dependencies: [
                "CXen", "CNetShim", "CNetlink", "XenHV", "XenRing", "XenBus", "XenStore",
                .product(name: "Logging", package: "swift-log"),
            ]),
        // A simulated netfront (guest side of the netif rings) for tests and benchmarks.
        .target(name: "NetFrontKit", dependencies: ["CXen", "CNetShim", "XenHV", "XenRing", "NetBack"]),
        // Release-mode netback benchmarks against bare veth and bare tap baselines.
        .executableTarget(
            name: "netback-bench",
            dependencies: [
                "NetBack", "NetFrontKit", "XenHV", "XenRing", "CXen", "CNetShim", "XenBus", "XenStore", "XenTestKit",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]),
        .executableTarget(
            name: "netback",
            dependencies: [
                "NetBack", "XenBus", "XenHV", "CXen",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]),
        // Our link/bridge tool, called by the vif-bridge hotplug script.
        .executableTarget(
            name: "xen-netlink",
            dependencies: [
                "NetBack",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]),

        // ringtests: fuzz entry points over the real code, the libFuzzer driver, corpus replay.
        .target(name: "RingFuzz", dependencies: ["CXen", "XenRing", "XenStore", "BlkBack", "NetBack", "XenHVDaemon", "XenCtl", "NBD"],
                path: "ringtests/targets"),
        .executableTarget(
            name: "xen-fuzz", dependencies: ["RingFuzz"], path: "ringtests/driver",
            swiftSettings: [.unsafeFlags(["-parse-as-library"])]),
        .testTarget(name: "FuzzReplayTests", dependencies: ["RingFuzz"]),

        // The toolstack's library: xl.cfg, disk and vif specifications (xenctl).
        .target(
            name: "XenCtl",
            dependencies: [
                "CXen", "XenHV", "XenBus", "XenStore",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ]),
        .executableTarget(
            name: "xenctl",
            dependencies: [
                "XenCtl", "XenHV",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]),
        .testTarget(name: "XenCtlTests", dependencies: ["XenCtl", "XenTestKit", "XenHV"]),

        // pvguest: a PV guest process whose blkfront disks are exported over NBD.
        .target(
            name: "PVGuest",
            dependencies: [
                "CXen", "XenHV", "XenRing", "XenBus", "XenStore", "NBD", "NetBack", "CNetShim",
                .product(name: "Logging", package: "swift-log"),
            ]),
        .executableTarget(
            name: "pvguest",
            dependencies: [
                "PVGuest", "XenHV", "XenBus", "NBD",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]),
        // A guest running closed-loop loads on its blkfront's ring (scripts/bench-blkback).
        .executableTarget(
            name: "pvguest-load",
            dependencies: [
                "PVGuest", "XenHV", "XenBus",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]),

        // The network path end to end: pvguest's netfront NIC <-> netback process <-> bridge (root, namespaces).
        .testTarget(name: "PVGuestNetTests", dependencies: ["PVGuest", "XenHV", "XenBus", "XenStore", "XenTestKit"]),
        .testTarget(
            name: "PVGuestTests",
            dependencies: ["PVGuest", "BlkBack", "XenHV", "XenBus", "XenStore", "XenTestKit", "NBD"]),

        // Test kit shared by integration tests and benchmarks: a private dom0
        // (xenhv process, hypervisor-backed xenstored, toolstack connections).
        .target(
            name: "XenTestKit",
            dependencies: ["XenHV", "XenStore", "XenBus", "XenRing", "CXen", "BlkBack", "BlkFrontKit",
                           .product(name: "Logging", package: "swift-log")]),
        // Hostile frontends against the whole dom0 (issue 6): double fetch, grants, event
        // storms, XenBus and xenstore abuse, each with a second guest that must keep working.
        .testTarget(
            name: "HostileTests",
            dependencies: ["XenTestKit", "BlkBack", "BlkFrontKit", "NetBack", "NetFrontKit", "CNetShim", "XenHV", "XenRing",
                           "XenBus", "XenStore", "CXen", "NBD", "XenCtl", .product(name: "Logging", package: "swift-log")]),

        // NBD server (newstyle fixed): how pvguest exposes its disks to qemu-io, nbdinfo and fio.
        .target(name: "NBD", dependencies: ["XenHV", .product(name: "Logging", package: "swift-log")]),
        .testTarget(name: "NBDTests", dependencies: ["NBD", "XenTestKit"]),

        .testTarget(
            name: "BlkBackTests",
            dependencies: ["BlkBack", "BlkFrontKit", "XenHV", "XenRing", "CXen", "XenBus", "XenStore", "XenTestKit", .product(name: "Logging", package: "swift-log")]),
        .testTarget(name: "NetBackTests", dependencies: ["XenTestKit", "NetBack", "NetFrontKit", "XenHV", "XenRing", "CXen", "CNetShim"]),
        .testTarget(name: "XenABITests", dependencies: ["CXen", "CXenTestSupport", "XenRing"]),
        .testTarget(name: "XenRingTests", dependencies: ["XenRing", "CXen", "CXenTestSupport"]),
        .testTarget(
            name: "XenHVTests",
            dependencies: ["XenHV", "XenHVDaemon", "XenRing", "CXen", "XenTestKit",
                           .product(name: "Logging", package: "swift-log")]),
        .testTarget(name: "XenStoreTests", dependencies: ["XenStore", "XenBus", "XenHV", "CXen", "XenTestKit"]),
    ],
    swiftLanguageModes: [.v6]
)
