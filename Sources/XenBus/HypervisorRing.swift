import XenHV

extension XenBusClient {
    /// A guest's connection to xenstored over its xenstore ring: the page and
    /// event channel the domain builder named in start_info (store_mfn,
    /// store_evtchn), as a PV kernel's xenbus does at boot.
    public static func guest(hypervisor hv: Hypervisor) throws -> XenBusClient {
        guard let si = hv.startInfo, let memory = hv.memory else {
            throw XenBusError.protocolViolation("not a guest connection: no start_info")
        }
        let page = try memory.region.slice(offset: Int(si.storeMFN) * HVLimits.pageSize, length: HVLimits.pageSize)
        let channel = try hv.channel(si.storeEventChannel)
        // The closure keeps the channel (and through the hypervisor connection,
        // the memory mapping) alive for as long as the transport is.
        return XenBusClient.guest(XenBusRingPort(
            page: page.unsafeBaseAddress, eventFD: channel.descriptor,
            notify: { withExtendedLifetime(memory) { try? channel.notify() } }))
    }
}
