import CXen

/// Every Xen struct the project uses, as Swift imports it from libxen-dev.
/// Member paths are spelled as layout.c spells them; XenABITests checks both
/// lists name the same members.
let swiftLayouts: [SwiftLayout] = [
    // blkif.h
    SwiftLayout("blkif_request_segment", blkif_request_segment.self) {
        $0.stored("gref", \.gref)
        $0.stored("first_sect", \.first_sect)
        $0.stored("last_sect", \.last_sect)
    },
    SwiftLayout("blkif_request", blkif_request.self) {
        $0.stored("operation", \.operation)
        $0.stored("nr_segments", \.nr_segments)
        $0.stored("handle", \.handle)
        $0.stored("id", \.id)
        $0.stored("sector_number", \.sector_number)
        $0.stored("seg", \.seg)
        $0.stored("seg[1]", \.seg.1)
        $0.stored("seg[10].last_sect", \.seg.10.last_sect)
    },
    SwiftLayout("blkif_request_discard", blkif_request_discard.self) {
        $0.stored("operation", \.operation)
        $0.stored("flag", \.flag)
        $0.stored("handle", \.handle)
        $0.stored("id", \.id)
        $0.stored("sector_number", \.sector_number)
        $0.stored("nr_sectors", \.nr_sectors)
    },
    SwiftLayout("blkif_request_indirect", blkif_request_indirect.self) {
        $0.stored("operation", \.operation)
        $0.stored("indirect_op", \.indirect_op)
        $0.stored("nr_segments", \.nr_segments)
        $0.stored("id", \.id)
        $0.stored("sector_number", \.sector_number)
        $0.stored("handle", \.handle)
        $0.stored("indirect_grefs", \.indirect_grefs)
        $0.stored("indirect_grefs[7]", \.indirect_grefs.7)
    },
    SwiftLayout("blkif_response", blkif_response.self) {
        $0.stored("id", \.id)
        $0.stored("operation", \.operation)
        $0.stored("status", \.status)
    },

    // ring.h's shared ring headers, as blkif.h and netif.h instantiate them.
    SwiftLayout("blkif_sring", blkif_sring.self) {
        $0.stored("req_prod", \.req_prod)
        $0.stored("req_event", \.req_event)
        $0.stored("rsp_prod", \.rsp_prod)
        $0.stored("rsp_event", \.rsp_event)
        $0.stored("pvt", \.pvt)
        $0.stored("__pad", \.__pad)
        $0.stored("ring", \.ring)
    },
    SwiftLayout("netif_tx_sring", netif_tx_sring.self) {
        $0.stored("req_prod", \.req_prod)
        $0.stored("req_event", \.req_event)
        $0.stored("rsp_prod", \.rsp_prod)
        $0.stored("rsp_event", \.rsp_event)
        $0.stored("pvt", \.pvt)
        $0.stored("__pad", \.__pad)
        $0.stored("ring", \.ring)
    },
    SwiftLayout("netif_rx_sring", netif_rx_sring.self) {
        $0.stored("req_prod", \.req_prod)
        $0.stored("req_event", \.req_event)
        $0.stored("rsp_prod", \.rsp_prod)
        $0.stored("rsp_event", \.rsp_event)
        $0.stored("pvt", \.pvt)
        $0.stored("__pad", \.__pad)
        $0.stored("ring", \.ring)
    },

    // netif.h
    SwiftLayout("netif_tx_request", netif_tx_request.self) {
        $0.stored("gref", \.gref)
        $0.stored("offset", \.offset)
        $0.stored("flags", \.flags)
        $0.stored("id", \.id)
        $0.stored("size", \.size)
    },
    SwiftLayout("netif_tx_response", netif_tx_response.self) {
        $0.stored("id", \.id)
        $0.stored("status", \.status)
    },
    SwiftLayout("netif_rx_request", netif_rx_request.self) {
        $0.stored("id", \.id)
        $0.stored("pad", \.pad)
        $0.stored("gref", \.gref)
    },
    SwiftLayout("netif_rx_response", netif_rx_response.self) {
        $0.stored("id", \.id)
        $0.stored("offset", \.offset)
        $0.stored("flags", \.flags)
        $0.stored("status", \.status)
    },
    SwiftLayout("netif_extra_info", netif_extra_info.self) {
        $0.stored("type", \.type)
        $0.stored("flags", \.flags)
        $0.stored("u", \.u)
        $0.throughUnion("u.gso.size", \.u.gso.size)
        $0.throughUnion("u.gso.type", \.u.gso.type)
        $0.throughUnion("u.gso.pad", \.u.gso.pad)
        $0.throughUnion("u.gso.features", \.u.gso.features)
        $0.throughUnion("u.mcast.addr", \.u.mcast.addr)
        $0.throughUnion("u.hash.type", \.u.hash.type)
        $0.throughUnion("u.hash.algorithm", \.u.hash.algorithm)
        $0.throughUnion("u.hash.value", \.u.hash.value)
        $0.throughUnion("u.pad", \.u.pad)
    },

    // grant_table.h
    SwiftLayout("grant_entry_v1", grant_entry_v1.self) {
        $0.stored("flags", \.flags)
        $0.stored("domid", \.domid)
        $0.stored("frame", \.frame)
    },
    SwiftLayout("gnttab_map_grant_ref", gnttab_map_grant_ref.self) {
        $0.stored("host_addr", \.host_addr)
        $0.stored("flags", \.flags)
        $0.stored("ref", \.ref)
        $0.stored("dom", \.dom)
        $0.stored("status", \.status)
        $0.stored("handle", \.handle)
        $0.stored("dev_bus_addr", \.dev_bus_addr)
    },
    SwiftLayout("gnttab_unmap_grant_ref", gnttab_unmap_grant_ref.self) {
        $0.stored("host_addr", \.host_addr)
        $0.stored("dev_bus_addr", \.dev_bus_addr)
        $0.stored("handle", \.handle)
        $0.stored("status", \.status)
    },
    SwiftLayout("gnttab_copy", gnttab_copy.self) {
        $0.stored("source", \.source)
        $0.throughUnion("source.u.ref", \.source.u.ref)
        $0.throughUnion("source.u.gmfn", \.source.u.gmfn)
        $0.stored("source.domid", \.source.domid)
        $0.stored("source.offset", \.source.offset)
        $0.stored("dest", \.dest)
        $0.throughUnion("dest.u.ref", \.dest.u.ref)
        $0.throughUnion("dest.u.gmfn", \.dest.u.gmfn)
        $0.stored("dest.domid", \.dest.domid)
        $0.stored("dest.offset", \.dest.offset)
        $0.stored("len", \.len)
        $0.stored("flags", \.flags)
        $0.stored("status", \.status)
    },

    // xen.h
    SwiftLayout("start_info", start_info.self) {
        $0.stored("magic", \.magic)
        $0.stored("nr_pages", \.nr_pages)
        $0.stored("shared_info", \.shared_info)
        $0.stored("flags", \.flags)
        $0.stored("store_mfn", \.store_mfn)
        $0.stored("store_evtchn", \.store_evtchn)
        $0.stored("console", \.console)
        $0.throughUnion("console.domU.mfn", \.console.domU.mfn)
        $0.throughUnion("console.domU.evtchn", \.console.domU.evtchn)
        $0.throughUnion("console.dom0.info_off", \.console.dom0.info_off)
        $0.throughUnion("console.dom0.info_size", \.console.dom0.info_size)
        $0.stored("pt_base", \.pt_base)
        $0.stored("nr_pt_frames", \.nr_pt_frames)
        $0.stored("mfn_list", \.mfn_list)
        $0.stored("mod_start", \.mod_start)
        $0.stored("mod_len", \.mod_len)
        $0.stored("cmd_line", \.cmd_line)
        $0.stored("first_p2m_pfn", \.first_p2m_pfn)
        $0.stored("nr_p2m_frames", \.nr_p2m_frames)
    },
    SwiftLayout("vcpu_info", vcpu_info.self) {
        $0.stored("evtchn_upcall_pending", \.evtchn_upcall_pending)
        $0.stored("evtchn_upcall_mask", \.evtchn_upcall_mask)
        $0.stored("evtchn_pending_sel", \.evtchn_pending_sel)
        $0.stored("arch", \.arch)
        $0.stored("arch.cr2", \.arch.cr2)
        $0.stored("arch.pad", \.arch.pad)
        $0.stored("time", \.time)
        $0.stored("time.version", \.time.version)
        $0.stored("time.tsc_timestamp", \.time.tsc_timestamp)
        $0.stored("time.system_time", \.time.system_time)
        $0.stored("time.tsc_to_system_mul", \.time.tsc_to_system_mul)
        $0.stored("time.tsc_shift", \.time.tsc_shift)
        $0.stored("time.flags", \.time.flags)
    },
    SwiftLayout("shared_info", shared_info.self) {
        $0.stored("vcpu_info", \.vcpu_info)
        $0.stored("vcpu_info[1]", \.vcpu_info.1)
        $0.stored("evtchn_pending", \.evtchn_pending)
        $0.stored("evtchn_mask", \.evtchn_mask)
        $0.stored("wc_version", \.wc_version)
        $0.stored("wc_sec", \.wc_sec)
        $0.stored("wc_nsec", \.wc_nsec)
        $0.stored("wc_sec_hi", \.wc_sec_hi)
        $0.stored("arch", \.arch)
        $0.stored("arch.max_pfn", \.arch.max_pfn)
        $0.stored("arch.pfn_to_mfn_frame_list_list", \.arch.pfn_to_mfn_frame_list_list)
        $0.stored("arch.nmi_reason", \.arch.nmi_reason)
        $0.stored("arch.p2m_cr3", \.arch.p2m_cr3)
        $0.stored("arch.p2m_vaddr", \.arch.p2m_vaddr)
        $0.stored("arch.p2m_generation", \.arch.p2m_generation)
    },

    // xs_wire.h
    SwiftLayout("xsd_sockmsg", xsd_sockmsg.self) {
        $0.stored("type", \.type)
        $0.stored("req_id", \.req_id)
        $0.stored("tx_id", \.tx_id)
        $0.stored("len", \.len)
    },
    SwiftLayout("xenstore_domain_interface", xenstore_domain_interface.self) {
        $0.stored("req", \.req)
        $0.stored("rsp", \.rsp)
        $0.stored("req_cons", \.req_cons)
        $0.stored("req_prod", \.req_prod)
        $0.stored("rsp_cons", \.rsp_cons)
        $0.stored("rsp_prod", \.rsp_prod)
        $0.stored("server_features", \.server_features)
        $0.stored("connection", \.connection)
        $0.stored("error", \.error)
    },

    // console.h
    SwiftLayout("xencons_interface", xencons_interface.self) {
        $0.stored("in", \.`in`)
        $0.stored("out", \.out)
        $0.stored("in_cons", \.in_cons)
        $0.stored("in_prod", \.in_prod)
        $0.stored("out_cons", \.out_cons)
        $0.stored("out_prod", \.out_prod)
    },
]
