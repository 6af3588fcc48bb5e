import Foundation
import Glibc
import Testing
import XenBus
import XenStore
import XenTestKit

extension Hostile {
    /// netback's hotplug scripts as libxl runs them: a relative `script` is
    /// one of the scripts directory, `offline` runs the script the device went
    /// online with, and a script that never finishes is killed with what it
    /// started and fails only its own device. Needs root (taps, a bridge).
    @Suite struct HotplugScriptTests {
        @Test func scriptsResolveGoOfflineTheSameWayAndAreBoundInTime() throws {
            var template = Array("/tmp/hotplug-XXXXXX".utf8CString)
            let dir = String(cString: mkdtemp(&template)!)
            defer {
                // Should netback fail to kill it, the hung script's child goes here.
                if let t = try? String(contentsOfFile: dir + "/hang.pid", encoding: .utf8),
                   let child = Int32(t.trimmingCharacters(in: .whitespacesAndNewlines)) { kill(child, SIGKILL) }
                try? FileManager.default.removeItem(atPath: dir)
            }
            // The scripts directory: vif-bridge (the default), a recorder that
            // notes each action and then does vif-bridge's work, and a script
            // that hangs with a child of its own.
            #expect(symlink(HostileDom0.root + "/scripts/vif-bridge", dir + "/vif-bridge") == 0)
            let recorder = "#!/bin/bash\necho \"$1\" >> \"$(dirname \"$0\")/actions\"\nexec \"$(dirname \"$0\")/vif-bridge\" \"$@\"\n"
            let hang = "#!/bin/bash\nsleep 600 &\necho $! > \"$(dirname \"$0\")/hang.pid\"\nwait\n"
            for (name, text) in [("recorder", recorder), ("hang", hang)] {
                try text.write(toFile: dir + "/" + name, atomically: true, encoding: .utf8)
                #expect(chmod(dir + "/" + name, 0o755) == 0)
            }
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
            #expect(actions() == "online\n")
            // Removed by the toolstack: the recorder runs offline, not the default script.
            try d.s.xenstore.destroyDevice(dev)
            #expect(pollUntil(seconds: 10) { actions() == "online\noffline\n" }, "\(actions())")

            // A script that never finishes fails its device after hotplugSeconds, killed with its child.
            let stuck = try XenBusVif.add(d, net, guest: h, backend: ["script": dir + "/hang"])
            #expect(Dom0Harness.wait(d.s.xenstore, state: stuck.backendPath, seconds: 20) { $0 == .closing || $0 == .initWait } == .closing)
            let error = (try d.s.xenstore.readIfExists(stuck.backendPath + "/error")) ?? ""
            #expect(error.contains("did not finish within 2 s"), "\(error)")
            let child = Int32(((try? String(contentsOfFile: dir + "/hang.pid", encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines))
            #expect(child != nil)
            if let child {
                // Gone, or a zombie for init to reap: not running.
                let running = { () -> Bool in
                    guard let stat = try? String(contentsOfFile: "/proc/\(child)/stat", encoding: .utf8) else { return false }
                    return !(stat.split(separator: ")").last?.trimmingCharacters(in: .whitespaces).hasPrefix("Z") ?? false)
                }
                #expect(pollUntil(seconds: 10) { !running() }, "the hung script's child \(child) still runs")
            }
            try d.s.xenstore.destroyDevice(stuck)

            // netback goes on (its XenBus work waited for the hung script, as it is
            // serial): another vif connects and carries frames.
            let fine = try XenBusVif(d, net, guest: g, devid: 1)
            #expect(try vifCarriesFrames(fine.queue, tap: fine.tapName))
        }
    }
}
