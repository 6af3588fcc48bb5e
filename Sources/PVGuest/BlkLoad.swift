import CXen
import Glibc
import XenHV
import XenRing

/// A closed-loop workload for a guest disk, as fio describes one (`rw`, `bs`,
/// `iodepth`, `runtime`): the load generator inside pvguest (`pvguest-load`)
/// that scripts/bench-blkback sets against fio on the same image.
public struct BlkLoad: Sendable, Equatable, CustomStringConvertible {
    public var write: Bool
    public var blockSize: Int
    public var random: Bool
    public var depth: Int
    public var seconds: Double

    public init(write: Bool, blockSize: Int, random: Bool, depth: Int, seconds: Double) {
        self.write = write
        self.blockSize = blockSize
        self.random = random
        self.depth = depth
        self.seconds = seconds
    }

    /// `read:4k:rand:32:5`: operation (read, write), block size (bytes, or
    /// with a k or m suffix; a multiple of 512), seq or rand, queue depth, seconds.
    public init(parsing text: String) throws(BlkLoadError) {
        let f = text.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
        guard f.count == 5 else { throw .badSpec(text, "want OP:BS:seq|rand:DEPTH:SECONDS") }
        switch f[0] {
        case "read": write = false
        case "write": write = true
        default: throw .badSpec(text, "operation '\(f[0])' is not read or write")
        }
        let bs = f[1].lowercased()
        let mult = bs.hasSuffix("k") ? 1024 : bs.hasSuffix("m") ? 1 << 20 : 1
        guard let n = Int(mult == 1 ? bs : String(bs.dropLast())), n > 0, n * mult % 512 == 0, n * mult <= 16 << 20 else {
            throw .badSpec(text, "block size '\(f[1])' is not a multiple of 512 up to 16m")
        }
        blockSize = n * mult
        switch f[2] {
        case "seq": random = false
        case "rand": random = true
        default: throw .badSpec(text, "pattern '\(f[2])' is not seq or rand")
        }
        guard let d = Int(f[3]), (1...1024).contains(d) else { throw .badSpec(text, "depth '\(f[3])' is not 1..1024") }
        depth = d
        guard let s = Double(f[4]), s > 0, s <= 86400 else { throw .badSpec(text, "seconds '\(f[4])' is not in (0, 86400]") }
        seconds = s
    }

    public var description: String {
        let bs = blockSize % (1 << 20) == 0 ? "\(blockSize >> 20)m" : blockSize % 1024 == 0 ? "\(blockSize >> 10)k" : "\(blockSize)"
        return "\(write ? "write" : "read"):\(bs):\(random ? "rand" : "seq"):\(depth):\(seconds)"
    }
}

public enum BlkLoadError: Error, CustomStringConvertible, Sendable {
    case badSpec(String, String)
    case doesNotFit(String)
    case requestFailed(status: Int16, sector: UInt64)
    case strayResponse(UInt64)
    case stalled(Int)
    case disconnected

    public var description: String {
        switch self {
        case let .badSpec(s, why): return "load '\(s)': \(why)"
        case let .doesNotFit(why): return why
        case let .requestFailed(st, sector): return "request at sector \(sector) failed with status \(st)"
        case let .strayResponse(id): return "response for request \(id), which is not in flight"
        case let .stalled(n): return "no response for 30 s with \(n) request(s) in flight"
        case .disconnected: return "the device has no ring (backend being reconnected)"
        }
    }
}

/// What a run measured; latencies are per operation (all of its ring requests).
public struct BlkLoadResult: Sendable {
    public var load: BlkLoad
    public var operations: UInt64
    public var seconds: Double
    public var p50Nanoseconds: UInt64
    public var p99Nanoseconds: UInt64
    public var iops: Double { Double(operations) / seconds }
    public var megabytesPerSecond: Double { Double(operations) * Double(load.blockSize) / seconds / 1e6 }

    /// One line a benchmark script parses: `load SPEC iops N mbps N p50_us N p99_us N ops N seconds N`.
    public var line: String {
        "load \(load) iops \(iops) mbps \(megabytesPerSecond) p50_us \(Double(p50Nanoseconds) / 1000) p99_us \(Double(p99Nanoseconds) / 1000) ops \(operations) seconds \(seconds)"
    }
}

extension BlkFrontDevice {
    /// Runs `load` on queue 0 straight onto its ring: `depth` operations always
    /// in flight, each split into ring requests of at most ``chunk`` bytes over
    /// the slots' own granted pages (no copy, as fio's O_DIRECT reads into its
    /// buffers), every response's slot reissued at once and a wake-up's worth
    /// of reissues published together (RING_PUSH_REQUESTS_AND_CHECK_NOTIFY).
    ///
    /// The device must have been made with `completionThread: false`: this
    /// thread is then the ring's only consumer. Requests are built once per
    /// slot before the clock starts; the loop itself neither allocates nor
    /// locks beyond the queue's uncontended mutex.
    public func runLoad(_ load: BlkLoad) throws -> BlkLoadResult {
        let q = queues[0]
        let chunk = self.chunk
        let parts = (load.blockSize + chunk - 1) / chunk
        guard load.blockSize <= chunk || load.blockSize % chunk == 0 else {
            throw BlkLoadError.doesNotFit("block size \(load.blockSize) is neither at most nor a multiple of \(chunk) (one ring request)")
        }
        let n = load.depth * parts
        guard n <= q.slots else {
            throw BlkLoadError.doesNotFit("depth \(load.depth) x \(parts) ring request(s) each needs \(n) slots; the ring has \(q.slots)")
        }
        guard !isReadOnly || !load.write else { throw BlkLoadError.doesNotFit("the disk is read-only") }
        let positions = sectors * 512 / UInt64(load.blockSize)
        guard positions > 0 else { throw BlkLoadError.doesNotFit("the disk is smaller than one block") }
        guard var ring = q.state.withLock({ $0.ring }), let channel = q.state.withLock({ $0.channel }) else {
            throw BlkLoadError.disconnected
        }
        defer { q.state.withLock { $0.ring = ring } }

        // Every request built once: only the sector changes between issues.
        let templates = UnsafeMutablePointer<blkif_request>.allocate(capacity: n)
        defer { templates.deallocate() }
        let op = UInt8(load.write ? BLKIF_OP_WRITE : BLKIF_OP_READ)
        let pageSize = HVLimits.pageSize
        for k in 0..<n {
            let slot = q.firstSlot + k
            let len = min(chunk, load.blockSize - (k % parts) * chunk)
            let segs = (len + pageSize - 1) / pageSize
            var list = [blkif_request_segment]()
            for i in 0..<segs {
                list.append(blkif_request_segment(gref: slotRefs[slot][i], first_sect: 0,
                                                  last_sect: UInt8(min(pageSize, len - i * pageSize) / 512 - 1)))
            }
            var req = blkif_request()
            if segs <= Self.segmentsPerRequest {
                req.operation = op
                req.nr_segments = UInt8(segs)
                req.id = UInt64(slot)
                withUnsafeMutableBytes(of: &req.seg) { raw in
                    let s = raw.bindMemory(to: blkif_request_segment.self)
                    for i in 0..<segs { s[i] = list[i] }
                }
            } else {
                try list.withUnsafeBytes { try indirectPages[slot].write($0, at: 0) }
                var ind = blkif_request_indirect()
                ind.operation = UInt8(BLKIF_OP_INDIRECT)
                ind.indirect_op = op
                ind.nr_segments = UInt16(segs)
                ind.id = UInt64(slot)
                ind.indirect_grefs.0 = indirectRefs[slot]
                withUnsafeMutableBytes(of: &req) { $0.storeBytes(of: ind, as: blkif_request_indirect.self) }
            }
            templates[k] = req
        }
        // sector_number sits at the same offset in both layouts (blkif.h).
        let sectorOffset = MemoryLayout<blkif_request>.offset(of: \blkif_request.sector_number)!
        precondition(sectorOffset == MemoryLayout<blkif_request_indirect>.offset(of: \blkif_request_indirect.sector_number)!)

        let started = UnsafeMutablePointer<UInt64>.allocate(capacity: load.depth)
        defer { started.deallocate() }
        let remaining = UnsafeMutablePointer<Int>.allocate(capacity: load.depth)
        defer { remaining.deallocate() }
        remaining.initialize(repeating: 0, count: load.depth)
        let capacity = min(1 << 24, max(1 << 16, Int(load.seconds * 300_000)))
        let samples = UnsafeMutablePointer<UInt32>.allocate(capacity: capacity)
        defer { samples.deallocate() }
        var count = 0

        let stride = UInt64(load.blockSize / 512)
        var rng: UInt64 = 0x9E37_79B9_7F4A_7C15 ^ UInt64(truncatingIfNeeded: monotonicNanoseconds())
        var next: UInt64 = 0
        @inline(__always) func issue(_ i: Int, at t: UInt64) {
            var pos: UInt64
            if load.random {
                rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17
                pos = rng % positions
            } else {
                pos = next
                next = next + 1 == positions ? 0 : next + 1
            }
            let sector = pos * stride
            for p in 0..<parts {
                let tp = templates + (i * parts + p)
                UnsafeMutableRawPointer(tp).storeBytes(of: sector + UInt64(p * chunk / 512), toByteOffset: sectorOffset,
                                                       as: UInt64.self)
                _ = ring.enqueue(tp.pointee)  // never full: one slot per ring entry
            }
            remaining[i] = parts
            started[i] = t
        }

        let t0 = monotonicNanoseconds()
        let deadline = t0 + UInt64(load.seconds * 1e9)
        for i in 0..<load.depth { issue(i, at: t0) }
        if ring.pushRequestsAndCheckNotify() { try channel.notify() }
        var ops: UInt64 = 0
        var outstanding = load.depth
        var idleSince: UInt64 = 0
        while outstanding > 0 {
            var got = false
            var issued = false
            while let rsp = try ring.nextResponse() {
                got = true
                let k = Int(truncatingIfNeeded: rsp.id &- UInt64(q.firstSlot))
                guard rsp.id >= UInt64(q.firstSlot), k < n, remaining[k / parts] > 0 else {
                    throw BlkLoadError.strayResponse(rsp.id)
                }
                let i = k / parts
                guard rsp.status == Int16(BLKIF_RSP_OKAY) else {
                    throw BlkLoadError.requestFailed(status: rsp.status,
                                                     sector: UnsafeRawPointer(templates + k).load(fromByteOffset: sectorOffset, as: UInt64.self))
                }
                remaining[i] -= 1
                guard remaining[i] == 0 else { continue }
                let t = monotonicNanoseconds()
                ops += 1
                if count < capacity {
                    samples[count] = UInt32(truncatingIfNeeded: min(t &- started[i], UInt64(UInt32.max)))
                    count += 1
                }
                if t >= deadline {
                    outstanding -= 1
                } else {
                    issue(i, at: t)
                    issued = true
                }
            }
            if issued, ring.pushRequestsAndCheckNotify() { try channel.notify() }
            if got { idleSince = 0; continue }
            if try ring.finalCheckForResponses() { continue }
            if !channel.wait(milliseconds: 1000) {
                let t = monotonicNanoseconds()
                if idleSince == 0 { idleSince = t } else if t - idleSince > 30_000_000_000 { throw BlkLoadError.stalled(outstanding) }
            }
        }
        let elapsed = Double(monotonicNanoseconds() - t0) / 1e9
        var sorted = UnsafeMutableBufferPointer(start: samples, count: count)
        sorted.sort()
        let p50 = count > 0 ? UInt64(sorted[count / 2]) : 0
        let p99 = count > 0 ? UInt64(sorted[min(count - 1, count * 99 / 100)]) : 0
        return BlkLoadResult(load: load, operations: ops, seconds: elapsed, p50Nanoseconds: p50, p99Nanoseconds: p99)
    }
}

