import BlkBack
import CXen
import NetBack

/// blkback's request decoding and validation (Linux blkback's rules), both
/// ABIs: whatever a guest writes into a slot, an accepted read or write stays
/// within the disk and within its pages.
func fuzzBlkifRequest(_ data: UnsafeRawBufferPointer) {
    var input = FuzzInput(data)
    let abi = input.u8()
    let sectorSize = input.u8() & 1 == 0 ? 512 : 4096
    let sectors = UInt64(input.u32()) | UInt64(input.u8()) << 32
    let flags = input.u8()
    let g = DiskGeometry(sectors: sectors, sectorSize: sectorSize, readOnly: flags & 1 != 0,
                         discard: flags & 2 != 0, discardSecure: flags & 4 != 0)
    var slot = [UInt8](repeating: 0, count: 112)
    slot.withUnsafeMutableBytes { input.fill($0.baseAddress!, 112) }
    let req = slot.withUnsafeBytes { b -> BlkRequest in
        abi & 1 == 0 ? BlkRequest.decode(nativeBytes: b) : BlkRequest.decode(x86_32: UnsafeRawBufferPointer(rebasing: b[0..<108]))
    }
    guard case .success(let total) = req.validate(geometry: g) else { return }
    switch req.command {
    case .read, .write, .writeBarrier:
        guard req.nrSegments > 0 else { return }
        if req.operation == UInt8(BLKIF_OP_INDIRECT) {
            // Its segments live in the indirect pages; they are validated when mapped.
            precondition(req.nrSegments <= BlkifLimits.maxIndirectSegments, "accepted \(req.nrSegments) indirect segments")
            return
        }
        precondition(req.nrSegments <= BlkifLimits.maxDirectSegments, "accepted \(req.nrSegments) direct segments")
        precondition(!g.readOnly || req.command == .read, "accepted a write to a read-only disk")
        for i in 0..<req.nrSegments {
            let s = req.directSegment(i)
            precondition(s.firstSect <= s.lastSect && s.lastSect < BlkifLimits.sectorsPerPage, "accepted segment \(s)")
        }
        let (end, overflow) = req.sector.addingReportingOverflow(total)
        precondition(!overflow && end <= sectors, "accepted sectors \(req.sector)+\(total) on a \(sectors)-sector disk")
    default:
        break
    }
}

/// netback's transmit packet assembly (slots + extra info, Linux's rules) and
/// the checksum/GSO header setup over the packet's bytes.
func fuzzNetifTx(_ data: UnsafeRawBufferPointer) {
    let n = data.count / 12
    guard n >= 1 else { return }
    var reqs = [netif_tx_request](repeating: netif_tx_request(), count: min(n, 64))
    for i in reqs.indices {
        withUnsafeMutableBytes(of: &reqs[i]) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: data[(i * 12)..<(i * 12 + 12)])) }
    }
    let outstanding = reqs.count - 1
    var taken = 1
    var packet = TxPacket()
    do {
        try TxParser.parse(first: reqs[0], outstanding: outstanding, next: { () throws(TxFatal) -> netif_tx_request in
            precondition(taken < reqs.count, "the parser read past the published requests")
            defer { taken += 1 }
            return reqs[taken]
        }, into: &packet)
    } catch {
        return  // fatal: the vif is disabled
    }
    guard packet.drop == nil, !packet.multicastControl else { return }
    precondition(packet.fragments.count <= TxParser.fatalSlots, "accepted \(packet.fragments.count + 1) slots")
    precondition(packet.first.size >= UInt16(TxParser.ethernetHeader), "accepted a first slot of \(packet.first.size) bytes")
    precondition(Int(packet.first.offset) + Int(packet.first.size) <= TxParser.pageSize, "first slot crosses its page")
    for f in packet.fragments {
        precondition(Int(f.offset) + Int(f.size) <= TxParser.pageSize, "fragment crosses its page")
    }
    // The headers of whatever bytes follow, as the guest's packet data.
    let rest = data.count - taken * 12
    guard rest > 0 else { return }
    let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: rest, alignment: 16)
    defer { buf.deallocate() }
    buf.copyMemory(from: UnsafeRawBufferPointer(rebasing: data[(taken * 12)...]))
    _ = try? TxParser.vnetHeader(flags: packet.first.flags, gso: packet.gso, data: buf)
}
