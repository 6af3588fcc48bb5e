import CXen
import CXenTestSupport
import Testing
@testable import XenRing

/// Swift's view of the Xen ABI against the C compiler's, struct by struct.
@Suite struct LayoutMatchesC {
    @Test("size and every member offset equal C's sizeof/offsetof", arguments: swiftLayouts)
    func layout(_ swift: SwiftLayout) throws {
        let cSize = try #require(cLayout[swift.name], "layout.c has no sizeof(struct \(swift.name))")
        #expect(swift.size == cSize, "sizeof(struct \(swift.name))")
        for member in swift.members {
            let name = "\(swift.name).\(member.path)"
            let cOffset = try #require(cLayout[name], "layout.c has no offsetof for \(name)")
            let offset = try #require(member.offset, "Swift cannot locate \(name)")
            #expect(offset == cOffset, "offsetof(\(name))")
        }
        // Both sides list the same members, so neither can silently skip one.
        let cMembers = Set(cLayout.keys.filter { $0.hasPrefix(swift.name + ".") })
        let swiftMembers = Set(swift.members.map { "\(swift.name).\($0.path)" })
        #expect(cMembers == swiftMembers)
    }

    @Test("every C probe is checked from Swift")
    func everyProbeChecked() {
        var checked = Set<String>()
        for layout in swiftLayouts {
            checked.insert(layout.name)
            for member in layout.members { checked.insert("\(layout.name).\(member.path)") }
        }
        // The union sizes are checked against slotStride below.
        checked.formUnion(["union blkif_sring_entry", "union netif_tx_sring_entry", "union netif_rx_sring_entry"])
        #expect(Set(cLayout.keys).subtracting(checked).sorted() == [])
        #expect(Set(swiftLayouts.map(\.name)).count == swiftLayouts.count, "a struct listed twice")
    }
}

/// The sizes xen-facts.md lists, typed in by hand: an independent check that
/// the headers are the x86_64 ABI we think they are.
@Suite struct DocumentedSizes {
    @Test func blkif() {
        #expect(MemoryLayout<blkif_request>.size == 112)
        #expect(MemoryLayout<blkif_response>.size == 16)
        #expect(MemoryLayout<blkif_request_discard>.size == 32)
        #expect(MemoryLayout<blkif_request_indirect>.size == 64)
        #expect(MemoryLayout<blkif_request_segment>.size == 8)
    }

    @Test func netif() {
        #expect(MemoryLayout<netif_tx_request>.size == 12)
        #expect(MemoryLayout<netif_tx_response>.size == 4)
        #expect(MemoryLayout<netif_rx_request>.size == 8)
        #expect(MemoryLayout<netif_rx_response>.size == 8)
        #expect(MemoryLayout<netif_extra_info>.size == 8)
    }

    @Test func grantsAndXenStore() {
        #expect(MemoryLayout<grant_entry_v1>.size == 8)
        #expect(MemoryLayout<xsd_sockmsg>.size == 16)
        #expect(MemoryLayout<xenstore_domain_interface>.offset(of: \.rsp) == 1024)
        #expect(MemoryLayout<xenstore_domain_interface>.offset(of: \.req_cons) == 2048)
        #expect(MemoryLayout<xenstore_domain_interface>.offset(of: \.rsp_prod) == 2060)
    }

    @Test("shared ring header is 64 bytes") func ringHeader() {
        #expect(MemoryLayout<blkif_sring>.offset(of: \.ring) == 64)
        #expect(cxen_sring_header_size() == 64)
        #expect(RingLayout.headerSize == 64)
    }
}

/// XenRing's geometry against ring.h's own arithmetic.
@Suite struct RingGeometry {
    @Test("blkif entries per ring: Swift == __CONST_RING_SIZE == 32...512",
          arguments: zip([1, 2, 4, 8, 16], [32, 64, 128, 256, 512] as [UInt32]))
    func blkifEntries(pages: Int, documented: UInt32) {
        let c = cxen_blkif_ring_size(pages * RingLayout.pageSize)
        #expect(BlkifRing.entries(pages: pages) == c)
        #expect(c == documented)
    }

    @Test("netif tx/rx one-page rings hold 256")
    func netifEntries() {
        #expect(NetifTxRing.entries(pages: 1) == cxen_netif_tx_ring_size(4096))
        #expect(NetifRxRing.entries(pages: 1) == cxen_netif_rx_ring_size(4096))
        #expect(NetifTxRing.entries(pages: 1) == 256)
        #expect(NetifRxRing.entries(pages: 1) == 256)
    }

    @Test("slotStride == sizeof(union name_sring_entry)")
    func slotStride() {
        #expect(BlkifRing.slotStride == cLayout["union blkif_sring_entry"])
        #expect(NetifTxRing.slotStride == cLayout["union netif_tx_sring_entry"])
        #expect(NetifRxRing.slotStride == cLayout["union netif_rx_sring_entry"])
        #expect(BlkifRing.slotStride == 112)
    }

    @Test("RingLayout's index offsets are ring.h's")
    func indexOffsets() {
        #expect(RingLayout.reqProdOffset == cLayout["blkif_sring.req_prod"])
        #expect(RingLayout.reqEventOffset == cLayout["blkif_sring.req_event"])
        #expect(RingLayout.rspProdOffset == cLayout["blkif_sring.rsp_prod"])
        #expect(RingLayout.rspEventOffset == cLayout["blkif_sring.rsp_event"])
        #expect(RingLayout.headerSize == cLayout["blkif_sring.ring"])
        #expect(RingLayout.headerSize == cLayout["netif_tx_sring.ring"])
        #expect(RingLayout.headerSize == cLayout["netif_rx_sring.ring"])
        #expect(RingLayout.pageSize == Int(CXEN_PAGE_SIZE))
    }
}
