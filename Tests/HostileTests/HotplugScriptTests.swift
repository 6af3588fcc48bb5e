import Foundation
import Glibc
import NetBack
import Testing
import XenBus
import XenHV
import XenStore
import XenTestKit

extension Hostile {
    /// netback's hotplug scripts as libxl runs them: a relative `script` is
    /// one of the scripts directory, `offline` runs the script the device went
    /// online with, and a script that never finishes is killed with what it
    /// started and fails only its own device. Needs root (taps, a bridge).
    @Suite struct HotplugScriptTests {
        @Test func scriptsResolveGoOfflineTheSameWayAndAreBoundInTime() throws {
            // The scripts directory: vif-bridge (the default), a recorder that
            // notes each action and then does vif-bridge's work, and a script
            // that hangs with a child of its own.
            let recorder = "#!/bin/bash\necho \"$1\" >> \"$(dirname \"$0\")/actions\"\nexec \"$(dirname \"$0\")/vif-bridge\" \"$@\"\n"
            let scripts = try ScriptsDirectory(["recorder": recorder, "hang": ScriptsDirectory.hang])
            let dir = scripts.path
            let d = try HostileDom0()
            let net = try HostileNetback(d, defaultScript: dir + "/vif-bridge", hotplugSeconds: 2)
            defer { net.stop() }
            let g = try d.guest("hotplug", pages: XenBusVif.pages(slots: 1))
            let h = try d.guest("hung", pages: XenBusVif.pages(slots: 1))

            // A relative name: the scripts directory's recorder, not a file of netback's directory.
            let dev = try XenBusVif.add(d, net, guest: g, backend: ["script": "recorder"])
            #expect(Dom0Harness.wait(d.s.xenstore, state: dev.backendPath, seconds: 10) { $0 == .initWait || $0 == .closing } == .initWait,
                    "\((try? d.s.xenstore.readIfExists(dev.backendPath + "/error")) ?? nil ?? "")")
            let actions = { (try? String(contentsOfFile: dir + "/actions", encoding: .utf8)) ?? "" }
            #expect(eventually(every: 1) { (try? d.s.xenstore.readIfExists(dev.backendPath + "/hotplug-status")) == "connected" })
            #expect(actions() == "online\n")
            // Removed by the toolstack: the recorder runs offline, not the default script.
            try d.s.xenstore.destroyDevice(dev)
            #expect(eventually(seconds: 10, every: 1) { actions() == "online\noffline\n" }, "\(actions())")
            // A script's write that lands after the removal (xenstore-write
            // creates what is missing) re-creates the directory: removed again.
            #expect(eventually { !net.service.deviceNames.contains(dev.backendPath) })
            try d.s.xenstore.write(dev.backendPath + "/hotplug-status", "connected")
            #expect(eventually { (try? d.s.xenstore.exists(dev.backendPath)) == false }, "the re-created directory stayed")

            // A script that never finishes fails its device after hotplugSeconds, killed with its child.
            let stuck = try XenBusVif.add(d, net, guest: h, backend: ["script": dir + "/hang"])
            #expect(Dom0Harness.wait(d.s.xenstore, state: stuck.backendPath, seconds: 20) { $0 == .closing } == .closing)
            #expect((try d.s.xenstore.readIfExists(stuck.backendPath + "/hotplug-status")) == "error")
            let error = (try d.s.xenstore.readIfExists(stuck.backendPath + "/error")) ?? ""
            #expect(error.contains("did not finish within 2 s"), "\(error)")
            let child = scripts.hungChild
            #expect(child != nil)
            if let child { #expect(eventually { !ScriptsDirectory.running(child) }, "the hung script's child \(child) still runs") }
            try d.s.xenstore.destroyDevice(stuck)

            // netback goes on: another vif connects and carries frames.
            let fine = try XenBusVif(d, net, guest: g, devid: 1)
            #expect(try vifCarriesFrames(fine.queue, tap: fine.tapName))
        }

        /// vif-bridge for a device the toolstack already removed (its online
        /// run raced the removal) leaves it alone: it reads no default bridge
        /// (it used to fall back to xenbr0 and make it on the host), makes
        /// nothing, and writes nothing back into the store.
        @Test func vifBridgeLeavesARemovedDeviceAlone() throws {
            let d = try HostileDom0()
            let path = "backend/vif/4242/0"
            let tap = try Tap(name: "hpgone\(getpid() % 10000)")
            func links() -> Set<String> { Set((try? FileManager.default.contentsOfDirectory(atPath: "/sys/class/net")) ?? []) }
            let before = links()
            defer { for l in links().subtracting(before) { _ = try? Netlink().deleteLink(l) } }
            let r = CommandResult.run("/bin/bash", [HostileDom0.root + "/scripts/vif-bridge", "online"], environment: [
                "vif": tap.name, "XENBUS_PATH": path, "XENSTORED_PATH": d.s.xenstoreSocket,
                "XEN_NETLINK": Dom0Harness.buildDirectory(packageRoot: HostileDom0.root) + "/xen-netlink",
                "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"])
            #expect(r.status == 1 && r.err.contains("is gone"), "\(r.err)")
            #expect(links() == before, "vif-bridge made a link")
            #expect((try d.s.xenstore.exists("/local/domain/0/" + path)) == false)
        }

        /// A script that hangs holds back its own vif only (its script runs
        /// on a thread of its own, as libxl runs each device's): another
        /// guest's vif connects and carries frames meanwhile, and the hung
        /// vif connects to nobody. Removed by the toolstack, it has its
        /// script killed at once, with what the script started.
        @Test func aHungScriptHoldsBackOnlyItsOwnVif() throws {
            let scripts = try ScriptsDirectory(["hang": ScriptsDirectory.hang(going: "online")])
            let dir = scripts.path
            let (d, net, h, g) = try scripts.twoGuests(hotplugSeconds: 300)
            defer { net.stop() }

            let stuck = try XenBusVif.add(d, net, guest: h, backend: ["script": "hang"])
            #expect(eventually { FileManager.default.fileExists(atPath: dir + "/hang.pid") }, "the hung script never started")
            // The other guest's vif, meanwhile: connected and carrying frames.
            let fine = try XenBusVif(d, net, guest: g)
            #expect(try vifCarriesFrames(fine.queue, tap: fine.tapName))
            // The hung one offered itself (InitWait) and waits for its script:
            // a frontend that connects is not connected to.
            #expect((try d.s.xenstore.state(at: stuck.backendPath)) == .initWait)
            try h.xenstore.switchState(at: stuck.frontendPath, to: .initialised)
            net.service.settle()
            #expect((try d.s.xenstore.state(at: stuck.backendPath)) == .initWait)
            #expect((try d.s.xenstore.readIfExists(stuck.backendPath + "/hotplug-status")) == nil)

            // Removed: its script is killed (not left for 300 s), with its child.
            let child = scripts.hungChild
            #expect(child != nil)
            try d.s.xenstore.destroyDevice(stuck)
            if let child { #expect(eventually { !ScriptsDirectory.running(child) }, "the hung script's child \(child) still runs") }
            #expect(eventually { !net.service.deviceNames.contains(stuck.backendPath) })
            // Nothing of the removed device came back (no late hotplug-status).
            net.service.settle()
            #expect((try d.s.xenstore.exists(stuck.backendPath)) == false)
            #expect(try vifCarriesFrames(fine.queue, tap: fine.tapName, tag: 0x7100))
        }

        /// A removed vif's `offline` script runs on a thread of its own, as
        /// libxl runs each device's: one that hangs holds back no other
        /// guest's vif (it connects and carries frames while the script
        /// still runs), only new devices that would take the old tap's
        /// name: one at the same path, and one elsewhere given the same
        /// `vifname`. Both are probed once the script is done, and connect.
        @Test func aHungOfflineScriptHoldsBackOnlyItsOwnTapName() throws {
            let scripts = try ScriptsDirectory(["hang": ScriptsDirectory.hang(going: "offline")])
            let (d, net, h, g) = try scripts.twoGuests(hotplugSeconds: 60, hungSlots: 3)
            defer { net.stop() }
            let name = "hxv\(getpid() % 100000)"

            let old = try XenBusVif(d, net, guest: h, backend: ["script": "hang", "vifname": name])
            try d.s.xenstore.destroyDevice(old.dev)
            #expect(eventually { scripts.hungChild != nil }, "the offline script never started")
            let child = try #require(scripts.hungChild)
            // Another guest's vif connects and carries frames meanwhile.
            let fine = try XenBusVif(d, net, guest: g)
            #expect(try vifCarriesFrames(fine.queue, tap: fine.tapName))
            #expect(ScriptsDirectory.running(child), "the offline script ended before the other vif connected")

            // The same path again, and another device named as the old tap:
            // neither is probed while the old tap and its script are there.
            let samePath = try XenBusVif.add(d, net, guest: h)
            let sameName = try XenBusVif.add(d, net, guest: h, devid: 1, backend: ["vifname": name])
            net.service.settle()
            #expect((try d.s.xenstore.state(at: samePath.backendPath)) == .initialising)
            #expect((try d.s.xenstore.state(at: sameName.backendPath)) == .initialising)
            #expect(ScriptsDirectory.running(child))
            // The script ends (its child does): both are offered, connect and carry frames.
            #expect(kill(child, SIGKILL) == 0)
            try XenBusVif.awaitInitWait(d, samePath)
            try XenBusVif.awaitInitWait(d, sameName)
            let first = try XenBusVif(d, attaching: samePath, guest: h, slot: 1)
            #expect(try vifCarriesFrames(first.queue, tap: first.tapName, tag: 0x7200))
            let named = try XenBusVif(d, attaching: sameName, guest: h, slot: 2)
            #expect(try vifCarriesFrames(named.queue, tap: name, tag: 0x7300))
            #expect(try vifCarriesFrames(fine.queue, tap: fine.tapName, tag: 0x7400))
        }

        /// A hotplug script dies with netback (the kernel kills it, kill -9
        /// included): left running, it would answer into the device a
        /// restarted netback probes again. The netback daemon as a process.
        @Test func aScriptDiesWithNetback() throws {
            // Notes its pid, then waits for a writer on a FIFO nobody opens.
            let waiter = "#!/bin/bash\necho $$ > \"$(dirname \"$0\")/waiter.pid\"\nread -r _ < \"$(dirname \"$0\")/go\"\n"
                + "xenstore-write \"$XENBUS_PATH/hotplug-status\" connected\n"
            let scripts = try ScriptsDirectory(["waiter": waiter])
            let dir = scripts.path
            #expect(mkfifo(dir + "/go", 0o600) == 0)
            let d = try HostileDom0()
            let build = Dom0Harness.buildDirectory(packageRoot: HostileDom0.root)
            var out: [CInt] = [-1, -1]
            #expect(pipe(&out) == 0 && fcntl(out[0], F_SETFD, FD_CLOEXEC) == 0 && fcntl(out[1], F_SETFD, FD_CLOEXEC) == 0)
            var netback = try ProcessLauncher.spawn(build + "/netback", arguments: [
                "--xenstore", d.s.xenstoreSocket, "--hypervisor", d.s.hypervisorSocket, "--log-level", "critical",
                "--hotplug-script", dir + "/vif-bridge"], environment: ["XEN_RUN_DIR": d.s.dir], descriptors: [(out[1], 1), (2, 2)])
            close(out[1])
            defer {
                close(out[0])
                if netback > 0 {
                    kill(netback, SIGKILL)
                    var st: Int32 = 0
                    waitpid(netback, &st, 0)
                }
            }
            var line = ""
            repeat { line = ProcessLauncher.readLine(out[0]) } while !line.isEmpty && !line.hasPrefix("netback ready")
            #expect(line.hasPrefix("netback ready"))

            let g = try d.guest("tied", pages: XenBusVif.pages(slots: 1))
            let dev = XenBusDevice(type: "vif", frontendDomid: XenStore.DomID(g.domid), devid: 0)
            try d.s.xenstore.createDevice(dev, backend: ["mac": "00:16:3e:00:07:01", "script": "waiter", "handle": "0", "type": "vif"],
                                          frontend: ["mac": "00:16:3e:00:07:01", "handle": "0"])
            let pidFile = dir + "/waiter.pid"
            #expect(eventually { ((try? String(contentsOfFile: pidFile, encoding: .utf8)) ?? "").hasSuffix("\n") },
                    "the script never started")
            let script = try #require(pid_t(((try? String(contentsOfFile: pidFile, encoding: .utf8)) ?? "")
                .trimmingCharacters(in: .whitespacesAndNewlines)))
            defer { kill(script, SIGKILL) }
            #expect(ScriptsDirectory.running(script))

            kill(netback, SIGKILL)
            var st: Int32 = 0
            waitpid(netback, &st, 0)
            netback = 0
            #expect(eventually { !ScriptsDirectory.running(script) }, "the script \(script) outlived netback")
        }
    }

    /// A scripts directory of its own (as /etc/xen/scripts): vif-bridge, the
    /// default, and `scripts` by name. A hung script's child (``hang`` notes
    /// its pid) is killed, should netback have failed to, and the directory
    /// removed when it goes.
    final class ScriptsDirectory {
        /// Hangs with a child of its own, whose pid it notes in hang.pid.
        static let hang = "#!/bin/bash\nsleep 600 &\necho $! > \"$(dirname \"$0\")/hang.pid\"\nwait\n"
        /// ``hang`` the first time it runs `action`; vif-bridge otherwise.
        static func hang(going action: String) -> String {
            hang.replacingOccurrences(of: "#!/bin/bash\n", with: "#!/bin/bash\n[ \"$1\" = \(action) ] && [ ! -e \"$(dirname \"$0\")/hang.pid\" ] || exec \"$(dirname \"$0\")/vif-bridge\" \"$@\"\n")
        }
        let path: String

        init(_ scripts: [String: String]) throws {
            var template = Array("/tmp/hotplug-XXXXXX".utf8CString)
            path = String(cString: mkdtemp(&template)!)
            #expect(symlink(HostileDom0.root + "/scripts/vif-bridge", path + "/vif-bridge") == 0)
            for (name, text) in scripts {
                try text.write(toFile: path + "/" + name, atomically: true, encoding: .utf8)
                #expect(chmod(path + "/" + name, 0o755) == 0)
            }
        }

        /// A dom0 whose netback runs this directory's scripts (vif-bridge by
        /// default) with `hotplugSeconds`, and two guests: "hung", with room
        /// for `hungSlots` vifs, and "fine", with room for one.
        func twoGuests(hotplugSeconds: Double, hungSlots: Int = 1)
            throws -> (HostileDom0, HostileNetback, Dom0Harness.Guest, Dom0Harness.Guest) {
            let d = try HostileDom0()
            let net = try HostileNetback(d, defaultScript: path + "/vif-bridge", hotplugSeconds: hotplugSeconds)
            do {
                return (d, net, try d.guest("hung", pages: XenBusVif.pages(slots: hungSlots)),
                        try d.guest("fine", pages: XenBusVif.pages(slots: 1)))
            } catch {
                net.stop()
                throw error
            }
        }

        var hungChild: pid_t? {
            Int32(((try? String(contentsOfFile: path + "/hang.pid", encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines))
        }

        /// Whether `pid` runs: gone, or a zombie for init to reap, is not.
        static func running(_ pid: pid_t) -> Bool {
            guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8) else { return false }
            return !(stat.split(separator: ")").last?.trimmingCharacters(in: .whitespaces).hasPrefix("Z") ?? false)
        }

        deinit {
            if let child = hungChild { kill(child, SIGKILL) }
            try? FileManager.default.removeItem(atPath: path)
        }
    }
}
