import XenCtl
import XenHV

/// xenctl's readers of what a user writes: an xl.cfg file (XLConfig, then
/// DomainConfig with its disk, vif and cpus values), and a disk or vif
/// specification or a CPU list on its own (`xenctl block-attach`,
/// `network-attach`). Bad input is one error line, `file:line: message` with a
/// line of the file, and never a crash or a hang; what is accepted holds the
/// rules the rest of the toolstack relies on.
func fuzzXLConfig(_ data: UnsafeRawBufferPointer) {
    let text = String(decoding: data, as: UTF8.self)
    let lines = data.reduce(1) { $0 + ($1 == 0x0A ? 1 : 0) }
    do throws(ConfigError) {
        let cfg = try XLConfig(parsing: text, file: "fuzz.cfg")
        do throws(ConfigError) {
            let d = try DomainConfig(cfg, online: fuzzOnlineCPUs, workingDirectory: "/fuzz")
            precondition(!d.name.isEmpty && d.name.utf8.count <= 64 && !d.name.hasPrefix("-")
                         && !d.name.contains(where: { $0 == "/" || $0.isWhitespace })
                         && !d.name.unicodeScalars.contains(where: { $0.properties.generalCategory == .control }),
                         "accepted name \(d.name.debugDescription)")
            for disk in d.disks {
                precondition(disk.target.hasPrefix("/"), "accepted a disk target that is not absolute: \(disk.target.debugDescription)")
            }
            precondition(Set(d.disks.map { $0.devid }).count == d.disks.count, "accepted two disks with one devid")
            if let cpus = d.cpus { precondition(!cpus.isEmpty, "accepted an empty cpus set") }
        } catch {
            oneLine(error.description)
            precondition((0...lines).contains(error.line), "error on line \(error.line) of a \(lines)-line file")
        }
    } catch {
        oneLine(error.description)
        precondition((1...lines).contains(error.line), "error on line \(error.line) of a \(lines)-line file")
    }
    do throws(SpecError) { _ = try DiskSpec(parsing: text) } catch { oneLine(error.description) }
    do throws(SpecError) {
        let vif = try VifSpec(parsing: text)
        if let name = vif.vifname { precondition(VifSpec.isValidInterfaceName(name), "accepted vifname \(name.debugDescription)") }
    } catch { oneLine(error.description) }
    do throws(CPUListError) { _ = try DomainConfig.cpuList(text) } catch { oneLine(error.description) }
}

/// The fuzzer's host: CPUs 0-3 online.
private let fuzzOnlineCPUs: CPUSet? = try? DomainConfig.cpuList("0-3")

/// An error a user reads is one line: no newline, and no other control
/// character (a terminal would act on an escape sequence from a config file).
private func oneLine(_ message: String) {
    precondition(!message.unicodeScalars.contains { $0.properties.generalCategory == .control },
                 "error message with a control character: \(message.debugDescription)")
}
