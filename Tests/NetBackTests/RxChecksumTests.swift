import CNetShim
import NetFrontKit
import Testing
@testable import NetBack

/// The software checksum the receive path finishes for a frontend without
/// IPv6 checksum offload, over a frame scattered in page-sized pieces (the
/// in-place path's pinned rx buffers).
@Suite struct RxChecksumTests {
    /// `frame` cut into 4096-byte pages stored in reverse order, each in its
    /// own allocation; returns the pages and a `page(k)` lookup.
    func scatter(_ frame: [UInt8]) -> [UnsafeMutableRawPointer] {
        let n = (frame.count + 4095) / 4096
        return (0..<n).map { k in
            let p = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 64)
            let piece = frame[(k * 4096)..<min(frame.count, (k + 1) * 4096)]
            piece.withUnsafeBytes { p.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
            return p
        }
    }

    func gather(_ pages: [UnsafeMutableRawPointer], _ len: Int) -> [UInt8] {
        (0..<len).map { pages[$0 / 4096].load(fromByteOffset: $0 % 4096, as: UInt8.self) }
    }

    @Test func aJumboIPv6DatagramIsChecksummedAcrossPages() {
        let src: [UInt8] = [0xfd] + Array(repeating: 0, count: 14) + [2]
        let dst: [UInt8] = [0xfd] + Array(repeating: 0, count: 14) + [1]
        let payload = (0..<8900).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        let mac: [UInt8] = [0, 0x16, 0x3e, 1, 2, 3]
        let partial = Frames.udp6(srcMAC: mac, dstMAC: mac, src: src, dst: dst, sport: 5000, dport: 6000,
                                  payload: payload, checksumBlank: true)
        let whole = Frames.udp6(srcMAC: mac, dstMAC: mac, src: src, dst: dst, sport: 5000, dport: 6000, payload: payload)
        let pages = scatter(partial)
        defer { pages.forEach { $0.deallocate() } }
        #expect(RxEngine.isIPv6(UnsafeRawBufferPointer(start: pages[0], count: 4096)))
        let h = VnetHeader(flags: CNET_VNET_F_NEEDS_CSUM, gsoType: 0, headerLength: 0, gsoSize: 0, csumStart: 54, csumOffset: 6)
        let out = RxEngine.completeChecksum(h, length: partial.count) { pages[$0] }
        #expect(out.flags == CNET_VNET_F_DATA_VALID && !out.needsChecksum)
        #expect(gather(pages, partial.count) == whole)
    }

    /// csum_start odd and the checksum field straddling a page boundary.
    @Test func oddStartAndAFieldAcrossPages() {
        let len = 9001, start = 15, at = 4095  // field bytes 4095 and 4096
        var frame = (0..<len).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 11) }
        frame[at] = 0x12; frame[at + 1] = 0x34  // the "pseudo-header sum" already there
        let pages = scatter(frame)
        defer { pages.forEach { $0.deallocate() } }
        let h = VnetHeader(flags: CNET_VNET_F_NEEDS_CSUM, gsoType: 0, headerLength: 0, gsoSize: 0,
                           csumStart: UInt16(start), csumOffset: UInt16(at - start))
        #expect(RxEngine.completeChecksum(h, length: len) { pages[$0] }.dataValid)
        let done = gather(pages, len)
        // The finished sum over [start, len), plus the pseudo-header sum it
        // replaced (as a receiver adds the pseudo-header), verifies to zero.
        #expect(done[start...].withUnsafeBytes { PacketParser.internetChecksum($0, initial: 0x1234) } == 0)
        #expect(done[..<at] == frame[..<at] && done[(at + 2)...] == frame[(at + 2)...])
        // Offsets outside the frame: no flag, nothing written.
        let bad = VnetHeader(flags: CNET_VNET_F_NEEDS_CSUM, gsoType: 0, headerLength: 0, gsoSize: 0, csumStart: 8999, csumOffset: 6)
        #expect(RxEngine.completeChecksum(bad, length: len) { pages[$0] }.flags == 0)
        #expect(gather(pages, len) == done)
    }
}
