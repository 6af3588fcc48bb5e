import Glibc
import Logging

/// Entry point for ringtests' `nbd-server` target: one client connection to
/// the NBD server pvguest exports its disks with, fed what a hostile local
/// client can send (handshake, options, requests and payloads, in any order),
/// against a RAM disk that checks every operation the server hands it: inside
/// the export, on the buffer the request named, no write or discard on a
/// read-only export. The server must never crash or hang.
public enum NBDFuzzing {
    /// Input: a flags byte (bit 0 read-only, bit 1 discard), the export's size
    /// in 512-byte sectors (one byte), then the client's byte stream.
    public static func session(_ data: UnsafeRawBufferPointer) {
        guard data.count >= 2 else { return }
        let device = CheckedDevice(size: UInt64(data[1]) * 512, readOnly: data[0] & 1 != 0, canTrim: data[0] & 2 != 0)
        var quiet = Logger(label: "nbd-fuzz")
        quiet.logLevel = .critical
        let server = NBDServer(exportName: "fuzz", device: device, logger: quiet)
        var sv: [CInt] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &sv) == 0 else {
            fatalError("nbd-fuzz: socketpair: \(String(cString: strerror(errno)))")
        }
        let client = Client(fd: sv[1], bytes: Array(UnsafeRawBufferPointer(rebasing: data[2...])))
        var thread = pthread_t()
        let box = Unmanaged.passRetained(client).toOpaque()
        guard pthread_create(&thread, nil, { arg in
            Unmanaged<Client>.fromOpaque(arg!).takeRetainedValue().run()
            return nil
        }, box) == 0 else { fatalError("nbd-fuzz: pthread_create failed") }
        server.connections.wrappingAdd(1, ordering: .relaxed)  // as the accept loop counts it
        NBDConnection(fd: sv[0], server: server).serve()  // closes its end
        pthread_join(thread, nil)
        close(sv[1])
    }

    /// The client's end: sends the input while it reads whatever the server
    /// answers (so neither side blocks on a full socket), then reads to the end.
    final class Client: @unchecked Sendable {
        // Sound: only the client thread touches it after creation.
        let fd: CInt
        let bytes: [UInt8]
        init(fd: CInt, bytes: [UInt8]) { self.fd = fd; self.bytes = bytes }

        func run() {
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            var sent = 0
            var sink = [UInt8](repeating: 0, count: 65536)
            if bytes.isEmpty { shutdown(fd, Int32(SHUT_WR)) }
            while true {
                var p = pollfd(fd: fd, events: Int16(POLLIN) | (sent < bytes.count ? Int16(POLLOUT) : 0), revents: 0)
                guard poll(&p, 1, -1) >= 0 || errno == EINTR else { return }
                if sent < bytes.count, p.revents & Int16(POLLOUT) != 0 {
                    let n = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL)) }
                    if n > 0 { sent += n } else if n < 0 && errno != EAGAIN && errno != EINTR { sent = bytes.count }
                    if sent == bytes.count { shutdown(fd, Int32(SHUT_WR)) }
                }
                if p.revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 {
                    let n = read(fd, &sink, sink.count)
                    if n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR) { return }
                }
            }
        }
    }

    /// A RAM disk that checks what it is asked to do.
    final class CheckedDevice: BlockDevice, @unchecked Sendable {
        // Sound: as MemoryBlockDevice, which holds the bytes.
        let disk: MemoryBlockDevice
        let canTrim: Bool
        var size: UInt64 { disk.size }
        var isReadOnly: Bool { disk.isReadOnly }
        init(size: UInt64, readOnly: Bool, canTrim: Bool) {
            disk = MemoryBlockDevice(size: size, readOnly: readOnly)
            self.canTrim = canTrim
        }

        func inside(_ offset: UInt64, _ count: UInt64, _ op: String) {
            let (end, overflow) = offset.addingReportingOverflow(count)
            precondition(!overflow && end <= size, "\(op) of \(count) bytes at \(offset) on a \(size)-byte export")
        }
        func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, completion: @escaping @Sendable (Int32?) -> Void) {
            inside(offset, UInt64(buffer.count), "read")
            disk.read(at: offset, into: buffer, completion: completion)
        }
        func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool, completion: @escaping @Sendable (Int32?) -> Void) {
            precondition(!isReadOnly, "write on a read-only export")
            inside(offset, UInt64(buffer.count), "write")
            disk.write(at: offset, from: buffer, fua: fua, completion: completion)
        }
        func flush(completion: @escaping @Sendable (Int32?) -> Void) { disk.flush(completion: completion) }
        func trim(at offset: UInt64, length: UInt64, completion: @escaping @Sendable (Int32?) -> Void) {
            precondition(!isReadOnly, "discard on a read-only export")
            inside(offset, length, "discard")
            guard canTrim else { completion(95 /* ENOTSUP */); return }
            disk.trim(at: offset, length: length, completion: completion)
        }
    }
}
