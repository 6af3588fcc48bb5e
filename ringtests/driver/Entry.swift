// The libFuzzer driver for ringtests/targets. Built by scripts/fuzz with
// --sanitize=fuzzer,address and -DFUZZING (libFuzzer supplies main); in a plain
// build it replays files: `xen-fuzz TARGET FILE...`.
import Glibc
import RingFuzz

nonisolated(unsafe) var selected: FuzzTarget = .ringConsumer

@_cdecl("LLVMFuzzerInitialize")
public func fuzzInitialize(_ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>) -> CInt {
    guard let name = getenv("XEN_FUZZ_TARGET").map({ String(cString: $0) }), let t = FuzzTarget(rawValue: name) else {
        let msg = "set XEN_FUZZ_TARGET to one of: \(FuzzTarget.allCases.map(\.rawValue).joined(separator: ", "))\n"
        _ = msg.withCString { write(2, $0, strlen($0)) }
        exit(2)
    }
    selected = t
    FuzzTarget.aloneInProcess()
    return 0
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    selected.run(UnsafeRawBufferPointer(start: data, count: size))
    return 0
}

#if FUZZING
/// libFuzzer's driver entry (FuzzerDriver.cpp). SwiftPM owns `main`, so we call it.
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt

@main
struct FuzzMain {
    static func main() {
        var argc = CommandLine.argc
        var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
        withUnsafeMutablePointer(to: &argv) { _ = fuzzInitialize(&argc, $0) }
        exit(LLVMFuzzerRunDriver(&argc, &argv, { data, size in fuzzOne(data, size) }))
    }
}
#else
@main
struct Replay {
    static func main() {
        let args = CommandLine.arguments
        FuzzTarget.aloneInProcess()
        guard args.count >= 2, let t = FuzzTarget(rawValue: args[1]) else {
            print("usage: xen-fuzz TARGET FILE... (targets: \(FuzzTarget.allCases.map(\.rawValue).joined(separator: ", ")))")
            exit(2)
        }
        for path in args.dropFirst(2) {
            guard let f = fopen(path, "rb") else { continue }
            var bytes: [UInt8] = []
            var buf = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = fread(&buf, 1, buf.count, f)
                if n <= 0 { break }
                bytes += buf[0..<n]
            }
            fclose(f)
            bytes.withUnsafeBytes { t.run($0) }
        }
        print("replayed \(args.count - 2) inputs through \(t.rawValue)")
    }
}
#endif
