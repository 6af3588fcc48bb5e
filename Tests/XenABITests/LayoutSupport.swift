import CXenTestSupport
import Testing

/// The C compiler's sizeof/offsetof values from layout.c, by probe name
/// ("blkif_request", "union blkif_sring_entry", "start_info.console.domU.mfn").
let cLayout: [String: Int] = {
    var count = 0
    // Sound: cxts_layout_probes returns a static table of `count` entries.
    let table = cxts_layout_probes(&count)!
    var values: [String: Int] = [:]
    for entry in UnsafeBufferPointer(start: table, count: count) {
        values[String(cString: entry.name)] = entry.value
    }
    return values
}()

/// One Swift-imported Xen struct: its size and member offsets, each named as
/// layout.c names the C probe it must equal.
struct SwiftLayout: Sendable, CustomTestStringConvertible {
    struct Member: Sendable {
        let path: String
        /// nil when Swift could not say where the member lives.
        let offset: Int?
    }
    let name: String
    let size: Int
    let members: [Member]
    var testDescription: String { name }

    init<T>(_ name: String, _ type: T.Type, _ describe: (inout Builder<T>) -> Void) {
        var builder = Builder<T>()
        describe(&builder)
        self.name = name
        self.size = MemoryLayout<T>.size
        self.members = builder.members
    }

    struct Builder<T> {
        fileprivate(set) var members: [Member] = []

        /// A stored member (including array elements, `\.seg.1`): `MemoryLayout.offset(of:)`.
        mutating func stored(_ path: String, _ keyPath: PartialKeyPath<T>) {
            members.append(Member(path: path, offset: MemoryLayout<T>.offset(of: keyPath)))
        }

        /// A member reached through a C union. Swift imports union members as
        /// computed properties, for which `offset(of:)` is nil, so the offset is
        /// measured instead: a marker written through the key path into a zeroed
        /// `T` must land in exactly one place.
        mutating func throughUnion<F: BitwiseCopyable>(_ path: String, _ keyPath: WritableKeyPath<T, F>) {
            let size = MemoryLayout<T>.size
            let raw = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: MemoryLayout<T>.alignment)
            defer { raw.deallocate() }
            raw.initializeMemory(as: UInt8.self, repeating: 0, count: size)
            // Sound: T is an imported C struct, for which all-zero bytes are a valid value.
            let value = raw.bindMemory(to: T.self, capacity: 1)
            let marker = (0..<MemoryLayout<F>.size).map { UInt8(0x80 | ($0 * 37 + 11) & 0x7f) }
            value.pointee[keyPath: keyPath] = marker.withUnsafeBytes { $0.loadUnaligned(as: F.self) }
            let bytes = UnsafeRawBufferPointer(start: raw, count: size)
            let hits = (0...(size - marker.count)).filter {
                bytes[$0..<($0 + marker.count)].elementsEqual(marker)
            }
            members.append(Member(path: path, offset: hits.count == 1 ? hits[0] : nil))
        }
    }
}
