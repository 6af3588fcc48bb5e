import CNetShim
import CXen
import Foundation
import Glibc
import NetBack
import NetFrontKit
import Synchronization
import Testing
import XenHV
import XenRing
import XenTestKit

extension Hostile {
    /// Grants a netfront lies about, on both rings, while netback works and a
    /// second guest's vif keeps carrying frames. netback copies with grant
    /// copy, so a bad grant on transmit drops the packet with ERROR responses
    /// (the vif stays up) and on receive answers that buffer with ERROR,
    /// leaving the page alone. Needs root (taps, AF_PACKET sockets).
    @Suite struct NetGrantTests {
        static let gtfReading: UInt16 = 1 << 3
        static let gtfWriting: UInt16 = 1 << 4

        /// A one-slot tx request of `frame` through `ref` (the frame already in tx buffer `id`'s page).
        /// Posts rx buffers `ids`, each with its own ref (rxRef(id), the NetFront layout), and kicks.
        static func postRx(_ q: FrontQueue, _ ids: [UInt16]) throws {
            for id in ids {
                var r = netif_rx_request()
                r.id = id
                r.gref = q.rxRef(id)
                let queued = q.rx.enqueue(r)
                #expect(queued)
            }
            try q.pushRxAndKick()
        }

        static func request(_ q: FrontQueue, id: UInt16, ref: GrantRef, length: Int) -> netif_tx_request {
            var r = netif_tx_request()
            r.gref = ref; r.offset = 0; r.flags = 0; r.id = id; r.size = UInt16(length)
            return r
        }

        @Test func badTransmitGrantsDropThePacketWithError() throws {
            let pair = try HostileVifPair("liar", tags: ("gl", "gb"))
            defer { pair.close() }
            let hv = pair.vif, h = pair.liar, g = pair.bystander, q = pair.queue, gt = pair.grants
            let cap = try TapCapture(hv.name)
            let tableRefs = GrantRef(try h.hypervisor.queryGrantTableSize().frames) * 512
            // Another ref for the same page as tx buffer `id`, with whatever entry the case wants.
            let spare: GrantRef = tableRefs - 8
            var n = 0
            func refused(_ what: String, ref: (UInt16) -> GrantRef) throws {
                let id = try #require(q.takeTxID())
                let frame = testFrame(0x100 + n, length: 200)
                n += 1
                try q.writeTxBuffer(id, offset: 0, frame)
                let idx = q.tx.reqProdPvt
                q.sendRaw([.request(Self.request(q, id: id, ref: ref(id), length: frame.count))])
                try q.pushTx()
                let r = try q.txResponses(1)
                #expect(r.count == 1 && r.first?.id == id, "\(what)")
                #expect(r.first?.status == Int16(NETIF_RSP_ERROR), "\(what): status \(String(describing: r.first?.status))")
                #expect(try txPaddingIsZero(q, slot: idx), "\(what): response padding")
                #expect(!hv.isDisabled, "\(what): vif disabled: \(hv.disabledReason ?? "")")
                // Nothing of it reached the tap, and a good frame still does.
                let good = testFrame(0x7F00 + n, length: 120)
                let ok = try sendOne(q, good)
                #expect(ok.status == Int16(NETIF_RSP_OKAY) && ok.paddingZero, "\(what): the ring serves")
                #expect(cap.next() == good, "\(what): a frame of the refused packet reached the tap")
            }
            for ref in [tableRefs, tableRefs + 1, 64 * 512, 0xFFFF_FFFF] as [GrantRef] {
                try refused("ref \(ref) out of range") { _ in ref }
            }
            try refused("a revoked grant") { id in
                gt.grantAccess(spare, to: 0, frame: UInt32(q.txPage(id)), readOnly: false)
                _ = gt.endAccess(spare)
                return spare
            }
            try refused("a ref never granted") { _ in spare - 1 }
            try refused("a grant to another domain") { id in
                gt.grantAccess(spare, to: g.domid, frame: UInt32(q.txPage(id)), readOnly: false)
                return spare
            }
            try refused("a transfer grant") { id in
                gt.writeRawEntry(spare, flags: 2, domid: 0, frame: UInt32(q.txPage(id)))
                return spare
            }
            try refused("a frame past the guest's memory") { _ in
                gt.grantAccess(spare, to: 0, frame: 0x7FFF_FFFF, readOnly: false)
                return spare
            }
            // A multi-slot packet with one bad fragment: every slot answered ERROR, nothing sent.
            do {
                let a = try #require(q.takeTxID()), b = try #require(q.takeTxID())
                let frame = testFrame(0x200, length: 3000)
                try q.writeTxBuffer(a, offset: 0, Array(frame[..<2000]))
                var r0 = Self.request(q, id: a, ref: q.txRef(a), length: frame.count)
                r0.flags = UInt16(NETTXF_more_data)
                let r1 = Self.request(q, id: b, ref: tableRefs + 3, length: 1000)
                q.sendRaw([.request(r0), .request(r1)])
                try q.pushTx()
                let r = try q.txResponses(2)
                #expect(r.map(\.id) == [a, b] && r.allSatisfy { $0.status == Int16(NETIF_RSP_ERROR) }, "\(r)")
                let good = testFrame(0x7FFF, length: 120)
                #expect(try sendOne(q, good).status == Int16(NETIF_RSP_OKAY))
                #expect(cap.next() == good)
            }
            // Read-only is enough for transmit: netback only reads.
            let id = try #require(q.takeTxID())
            let frame = testFrame(0x300, length: 300)
            try q.writeTxBuffer(id, offset: 0, frame)
            gt.grantAccess(spare, to: 0, frame: UInt32(q.txPage(id)), readOnly: true)
            q.sendRaw([.request(Self.request(q, id: id, ref: spare, length: frame.count))])
            try q.pushTx()
            #expect(try q.txResponses(1).first?.status == Int16(NETIF_RSP_OKAY), "a read-only grant on transmit")
            #expect(cap.next() == frame)
            // Every entry netback touched is free again.
            #expect(gt.endAccess(spare), "ref \(spare) left busy")
            #expect(hv.stats.snapshot.reasons.values.reduce(0, +) > 0)

            pair.finish()
        }

        /// Transmit grants revoked while netback works on the ring: every
        /// request is answered; OKAY ones put exactly the frame written before
        /// the revoke on the tap, ERROR ones nothing (a page whose revoke
        /// succeeded is overwritten at once, so a copy after the revoke shows).
        @Test func transmitGrantsRevokedWhileInFlight() throws { try revokeWhileInFlight(fragmented: false) }

        /// The same with two-slot packets, whose fragment netback reads in place
        /// for the tap write: a revoke that beats the pin drops the packet, one
        /// that comes later is refused until the write is done, so the tap
        /// never carries a poisoned fragment.
        @Test func fragmentGrantsRevokedWhileReadInPlace() throws { try revokeWhileInFlight(fragmented: true) }

        func revokeWhileInFlight(fragmented: Bool) throws {
            let pair = try HostileVifPair("revoker", tags: (fragmented ? "fr" : "rr", fragmented ? "fb" : "rb"))
            defer { pair.close() }
            let hv = pair.vif, q = pair.queue, gt = pair.grants
            let cap = try TapCapture(hv.name)
            let poison = [UInt8](repeating: 0xEE, count: 4096)
            let head = 64
            var expected: [[UInt8]] = [], errors = 0, oks = 0, refusedWhileInUse = 0
            // 60 rounds, and more (up to 600) until a revoke has beaten netback's
            // copy (or pin) once: which side wins a round is up to the scheduler.
            var round = 0
            while round < 60 || (errors == 0 && round < 600) {
                defer { round += 1 }
                var packets: [[UInt16]] = [], frames: [[UInt8]] = []
                for k in 0..<32 {
                    let f = testFrame(round * 32 + k, length: (fragmented ? head + 100 : 64) + (k * 97) % 1400)
                    let id = try #require(q.takeTxID())
                    if fragmented {
                        let frag = try #require(q.takeTxID())
                        try q.writeTxBuffer(id, offset: 0, Array(f[..<head]))
                        try q.writeTxBuffer(frag, offset: 0, Array(f[head...]))
                        var first = Self.request(q, id: id, ref: q.txRef(id), length: f.count)
                        first.flags = UInt16(NETTXF_more_data)
                        q.sendRaw([.request(first), .request(Self.request(q, id: frag, ref: q.txRef(frag), length: f.count - head))])
                        packets.append([id, frag])
                    } else {
                        try q.writeTxBuffer(id, offset: 0, f)
                        q.sendRaw([.request(Self.request(q, id: id, ref: q.txRef(id), length: f.count))])
                        packets.append([id])
                    }
                    frames.append(f)
                }
                try q.pushTxAndKick()
                // Take back every other packet's last buffer, last first, while netback works.
                var revoked = Set<Int>()
                for (k, ids) in packets.enumerated().reversed() where k % 2 == round % 2 {
                    if gt.endAccess(q.txRef(ids.last!)) {
                        revoked.insert(k)
                        try q.writeTxBuffer(ids.last!, offset: 0, poison)
                    } else {
                        refusedWhileInUse += 1
                    }
                }
                let slots = packets.reduce(0) { $0 + $1.count }
                let r = try q.txResponses(slots)
                #expect(r.count == slots, "round \(round): \(r.count) responses")
                // Every slot of a packet carries the packet's status.
                var status: [Int: Int16] = [:]
                for resp in r {
                    guard let k = packets.firstIndex(where: { $0.contains(resp.id) }) else { Issue.record("unknown id \(resp.id)"); continue }
                    if let s = status[k] { #expect(s == resp.status, "round \(round): the slots of one packet disagree") }
                    status[k] = resp.status
                }
                for k in packets.indices {
                    guard let s = status[k] else { Issue.record("round \(round): packet \(k) unanswered"); continue }
                    if s == Int16(NETIF_RSP_OKAY) {
                        oks += 1
                        expected.append(frames[k])
                    } else {
                        #expect(s == Int16(NETIF_RSP_ERROR), "round \(round): status \(s)")
                        #expect(revoked.contains(k), "round \(round): ERROR for a grant never revoked")
                        errors += 1
                    }
                }
                for k in revoked {
                    let id = packets[k].last!
                    gt.grantAccess(q.txRef(id), to: 0, frame: UInt32(q.txPage(id)), readOnly: false)
                }
                #expect(!hv.isDisabled)
            }
            // What reached the tap: the OKAY frames in order, never a poisoned one.
            let end = testFrame(0xFFFF, length: 64)
            #expect(try sendOne(q, end).status == Int16(NETIF_RSP_OKAY))
            var captured: [[UInt8]] = []
            while let f = cap.next(), f != end { captured.append(f) }
            #expect(captured == expected, "\(captured.count) frames on the tap for \(expected.count) OKAY responses")
            print("tx revoke in flight (\(fragmented ? "fragments read in place" : "copied")): \(oks) OKAY, \(errors) ERROR, "
                  + "\(refusedWhileInUse) revokes refused while netback held the grant")
            #expect(errors > 0, "no revoke ever beat netback's copy or pin")

            pair.finish()
        }

        /// Receive buffers whose grants are bad or revoked while frames arrive:
        /// netback must write into them, so each gets an ERROR response and
        /// the page stays as the guest left it; good buffers get the frames.
        @Test func receiveGrantsReadOnlyOrRevokedWhileInFlight() throws {
            let pair = try HostileVifPair("rxliar", tags: ("xl", "xb"), postRx: false)
            defer { pair.close() }
            let hv = pair.vif, q = pair.queue, gt = pair.grants
            let inject = try TapInjector(hv.name)
            let marker = [UInt8](repeating: 0x5C, count: 4096)
            // Rx buffer `id` uses ref rxRef(id) (the NetFront layout); the liar re-grants some.
            func post(_ ids: [UInt16]) throws { try Self.postRx(q, ids) }
            func pageOf(_ id: UInt16) throws -> [UInt8] { try q.rxBuffer(id) }
            var rxErrors = 0, rxOK = 0, revokedPages = 0
            var sent = Set<[UInt8]>()

            for round in 0..<20 {
                // 16 buffers: a quarter read-only, a quarter revoked before netback
                // sees them, a quarter revoked while frames arrive, the rest good.
                let ids = (0..<16).map { UInt16((round * 16 + $0) & 255) }
                for (k, id) in ids.enumerated() {
                    gt.grantAccess(q.rxRef(id), to: 0, frame: UInt32(q.rxPage(id)), readOnly: k % 4 == 0)
                    try q.writeRxBuffer(id, marker)
                }
                var revoked = Set<UInt16>()
                for (k, id) in ids.enumerated() where k % 4 == 1 {
                    #expect(gt.endAccess(q.rxRef(id)))
                    revoked.insert(id)
                }
                try post(ids)
                for k in 0..<16 {
                    let f = testFrame(round * 16 + k, length: 100 + k * 50)
                    sent.insert(f)
                    try inject.send(f)
                    if k % 4 == 2 && k < 14 {
                        // A later buffer of the same kind, revoked while netback delivers.
                        let id = ids[k + 4 < 16 ? k + 4 : k]
                        if gt.endAccess(q.rxRef(id)) { revoked.insert(id); try q.writeRxBuffer(id, marker) }
                    }
                }
                // Every posted buffer is answered (the injected frames fill them all).
                var responses: [(id: UInt16, status: Int16)] = []
                #expect(try eventually(seconds: 10, every: 1) {
                    while let r = try q.rx.nextResponse() { responses.append((r.id, r.status)) }
                    return responses.count >= ids.count
                }, "round \(round): \(responses.count) of \(ids.count) rx responses")
                for (k, id) in ids.enumerated() {
                    guard let resp = responses.first(where: { $0.id == id }) else { continue }
                    let readOnly = k % 4 == 0
                    if readOnly || revoked.contains(id) {
                        if resp.status > 0 {
                            // Only a buffer revoked after netback's copy may hold data; then the
                            // marker written after the revoke must be all that is there.
                            #expect(!readOnly, "round \(round): a read-only buffer was answered \(resp.status)")
                        } else {
                            #expect(resp.status == Int16(NETIF_RSP_ERROR), "round \(round): status \(resp.status)")
                            rxErrors += 1
                        }
                        #expect(try pageOf(id) == marker, "round \(round): buffer \(id) written after its grant was refused")
                        if revoked.contains(id) { revokedPages += 1 }
                    } else {
                        #expect(resp.status > 0, "round \(round): a good buffer was answered \(resp.status)")
                        if resp.status > 0 {
                            let got = Array(try pageOf(id).prefix(Int(resp.status)))
                            // Ours, or something the host's stack sent out on the tap.
                            let ours = got.count > 13 && Int(got[12]) << 8 | Int(got[13]) == Int(TapCapture.etherType)
                            #expect(!ours || sent.contains(got), "round \(round): buffer \(id) holds a frame we never sent")
                            rxOK += 1
                        }
                    }
                }
                for id in ids {
                    _ = gt.endAccess(q.rxRef(id))
                    #expect(gt.flags(q.rxRef(id)) & (Self.gtfReading | Self.gtfWriting) == 0, "buffer \(id) left busy")
                }
                #expect(!hv.isDisabled)
            }
            print("rx bad grants: \(rxOK) frames delivered, \(rxErrors) buffers answered ERROR, \(revokedPages) revoked pages left alone")
            #expect(rxErrors > 0 && rxOK > 0)

            pair.finish()
        }

        /// Large frames are read straight into the posted buffers, pinned
        /// writable for the readv: a read-only or revoked buffer among those
        /// an in-place read would take is never written (the copy path answers
        /// it ERROR), and every frame delivered whole is one we sent.
        @Test func receiveBuffersReadInPlaceKeepToTheirGrants() throws {
            let pair = try HostileVifPair("rxjumbo", tags: ("jl", "jb"), postRx: false, quiet: true, mtu: 9000)
            defer { pair.close() }
            let hv = pair.vif, q = pair.queue, gt = pair.grants
            let inject = try TapInjector(hv.name)
            let marker = [UInt8](repeating: 0x5C, count: 4096)
            var sent = Set<[UInt8]>(), delivered = 0, refused = 0
            for round in 0..<12 {
                // 40 buffers, 20 two-slot frames; one bad buffer a round, at a different place.
                let ids = (0..<40).map { UInt16((round * 40 + $0) & 255) }
                let bad = (round * 7) % 40
                for (k, id) in ids.enumerated() {
                    gt.grantAccess(q.rxRef(id), to: 0, frame: UInt32(q.rxPage(id)), readOnly: k == bad && round % 2 == 0)
                    try q.writeRxBuffer(id, marker)
                }
                if round % 2 == 1 { #expect(gt.endAccess(q.rxRef(ids[bad]))) }
                try Self.postRx(q, ids)
                for k in 0..<20 {
                    let f = testFrame(round * 20 + k, length: 8000)
                    sent.insert(f)
                    try inject.send(f)
                }
                var responses: [netif_rx_response] = []
                #expect(try eventually(seconds: 10, every: 1) {
                    while let r = try q.rx.nextResponse() { responses.append(r) }
                    return responses.count >= ids.count
                }, "round \(round): \(responses.count) of \(ids.count) rx responses")
                // Whole frames (slots chained by more_data) are ours; the bad buffer is untouched.
                var frame: [UInt8] = [], broken = false
                for r in responses {
                    if r.status > 0 { frame += Array(try q.rxBuffer(r.id).prefix(Int(r.status))) } else { broken = true }
                    if r.id == ids[bad] {
                        #expect(r.status == Int16(NETIF_RSP_ERROR), "round \(round): the bad buffer was answered \(r.status)")
                        #expect(try q.rxBuffer(r.id) == marker, "round \(round): the bad buffer was written")
                        refused += 1
                    }
                    guard r.flags & UInt16(NETRXF_more_data) == 0 else { continue }
                    let ours = frame.count > 13 && Int(frame[12]) << 8 | Int(frame[13]) == Int(TapCapture.etherType)
                    if !broken && ours {
                        #expect(sent.contains(frame), "round \(round): a \(frame.count)-byte frame we never sent")
                        delivered += 1
                    }
                    frame = []
                    broken = false
                }
                for id in ids {
                    _ = gt.endAccess(q.rxRef(id))
                    #expect(gt.flags(q.rxRef(id)) & (Self.gtfReading | Self.gtfWriting) == 0, "buffer \(id) left busy")
                }
                #expect(!hv.isDisabled)
            }
            let s = hv.stats.snapshot
            print("rx in place: \(delivered) jumbo frames delivered whole, \(s.rxInPlace) of them read in place, \(refused) bad buffers refused")
            #expect(delivered > 0 && s.rxInPlace > 0 && refused == 12)

            pair.finish()
        }
    }
}

/// Frames sent out through a tap (the host transmits on it, so netback reads
/// them from its descriptor): an AF_PACKET socket bound to the interface.
final class TapInjector {
    let fd: CInt
    init(_ name: String) throws { fd = try tapSender(name) }

    func send(_ frame: [UInt8]) throws {
        let n = frame.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, 0) }
        guard n == frame.count else { throw FrontError("AF_PACKET send: \(errno)") }
    }

    deinit { close(fd) }
}
