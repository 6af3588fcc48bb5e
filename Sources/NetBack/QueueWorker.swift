import CNetShim
import CXen
import Glibc
import Logging
import Synchronization
import XenHV
import XenRing

/// One queue of a connected vif: its mapped tx and rx rings, event
/// channel(s), tap queue descriptor and the thread that serves them.
///
/// The thread polls the event channel(s), the tap (only while the rx backlog
/// has room) and a control eventfd (stop, or a changed rate). Each wake-up runs a transmit pass and a
/// receive pass; a rate-limited transmit side and a waiting receive backlog
/// set the poll timeout.
final class QueueWorker: @unchecked Sendable {
    // Sound: after init, the engines and mappings are touched only by the
    // worker thread; `stop()` joins it before releasing anything.
    let shared: VifShared
    let hypervisor: Hypervisor
    let index: Int
    let txMap: GrantMapping
    let rxMap: GrantMapping
    let txChannel: EventChannel
    let rxChannel: EventChannel?  // split event channels only
    let tapFD: CInt
    let ownsFD: Bool
    /// Written to stop the thread (`stopping` set) or to make it look at a
    /// changed rate.
    let controlFD: CInt
    let stopping = Atomic<Bool>(false)
    let rxNotify: Bool
    /// `shared.rateChanges` when this queue last took the rate.
    private var rateChangesSeen: UInt64
    var tx: TxEngine
    var rx: RxEngine
    private var thread: pthread_t?
    /// Dropped packets are logged as Linux's net_ratelimit lets them.
    private var dropLog = LogRateLimit()

    init(shared: VifShared, hypervisor: Hypervisor, domid: DomID, rxQueueLimit: Int,
         index: Int, rings: VifQueueRings, features: FrontendFeatures, tapFD: CInt, ownsFD: Bool) throws(VifError) {
        self.shared = shared
        self.hypervisor = hypervisor
        self.index = index
        self.tapFD = tapFD
        self.ownsFD = ownsFD
        self.rxNotify = features.rxNotify
        var cleanup: [() -> Void] = []
        if ownsFD { cleanup.append { _ = Glibc.close(tapFD) } }
        func fail(_ e: VifError) -> VifError {
            for c in cleanup.reversed() { c() }
            return e
        }
        let txm: GrantMapping
        switch hypervisor.mapGrant(domid: domid, ref: rings.txRingRef, writable: true) {
        case .success(let m): txm = m
        case .failure(let s): throw fail(.grant(ref: rings.txRingRef, s))
        }
        cleanup.append { hypervisor.unmapGrant(txm) }
        let rxm: GrantMapping
        switch hypervisor.mapGrant(domid: domid, ref: rings.rxRingRef, writable: true) {
        case .success(let m): rxm = m
        case .failure(let s): throw fail(.grant(ref: rings.rxRingRef, s))
        }
        cleanup.append { hypervisor.unmapGrant(rxm) }
        txMap = txm
        rxMap = rxm
        func bind(_ port: EventPort) throws(VifError) -> EventChannel {
            do {
                let ch = try hypervisor.bindInterdomain(remote: domid, remotePort: port)
                cleanup.append { try? ch.close() }
                return ch
            } catch {
                throw fail(.eventChannel(port: port, "\(error)"))
            }
        }
        switch rings.events.normalized {
        case .shared(let p):
            txChannel = try bind(p)
            rxChannel = nil
        case .split(let t, let r):
            txChannel = try bind(t)
            rxChannel = try bind(r)
        }
        controlFD = cxen_eventfd(0, Int32(O_NONBLOCK | O_CLOEXEC))
        guard controlFD >= 0 else { throw fail(.badConnection("eventfd: \(String(cString: strerror(errno)))")) }
        let txRing: SharedRing<NetifTxRing>
        let rxRing: SharedRing<NetifRxRing>
        do {
            txRing = try txm.region.ring(NetifTxRing.self, pages: 1)
            rxRing = try rxm.region.ring(NetifRxRing.self, pages: 1)
        } catch {
            Glibc.close(controlFD)
            throw fail(.badConnection("\(error)"))
        }
        // The count first: a change after it is seen at the first turn.
        rateChangesSeen = shared.rateChanges.load(ordering: .acquiring)
        let rate = shared.rate.withLock { $0 }
        tx = TxEngine(ring: BackRing(attaching: txRing), hypervisor: hypervisor, domid: domid, tapFD: tapFD,
                      stats: shared.stats, queueStats: shared.stats.queues[index], rate: rate)
        let offloads = Vif.tapOffloads(features)
        rx = RxEngine(ring: BackRing(attaching: rxRing), hypervisor: hypervisor, domid: domid, tapFD: tapFD,
                      stats: shared.stats, queueStats: shared.stats.queues[index], sg: features.sg, gsoTCPv4: offloads.tso4,
                      gsoTCPv6: offloads.tso6, ipv6Checksum: features.ipv6ChecksumOffload,
                      queueLimit: rxQueueLimit)
    }

    /// Starts the queue's thread; throws when none can be made (EAGAIN under
    /// a thread limit): that vif's connect fails, netback goes on.
    func start() throws(VifError) {
        let box = Unmanaged.passRetained(self)
        var t = pthread_t()
        let rc = pthread_create(&t, nil, { arg in
            let w = Unmanaged<QueueWorker>.fromOpaque(arg!).takeRetainedValue()
            w.run()
            return nil
        }, box.toOpaque())
        guard rc == 0 else {
            box.release()
            throw .thread(errno: rc)
        }
        thread = t
    }

    /// Makes the thread look at the shared state (a changed rate) now.
    func wake() {
        var one: UInt64 = 1
        _ = write(controlFD, &one, 8)
    }

    /// Stops and joins the thread, then unmaps the rings and closes the ports.
    func stop() {
        stopping.store(true, ordering: .releasing)
        wake()
        if let t = thread { pthread_join(t, nil) }
        thread = nil
        hypervisor.unmapGrant(txMap)
        hypervisor.unmapGrant(rxMap)
        try? txChannel.close()
        try? rxChannel?.close()
        Glibc.close(controlFD)
        if ownsFD { Glibc.close(tapFD) }
    }

    private func notify(tx: Bool, rx: Bool) {
        if let rxChannel {
            if tx { try? txChannel.notify() }
            if rx { try? rxChannel.notify() }
        } else if tx || rx {
            try? txChannel.notify()
        }
    }

    private func run() {
        DetachedThread.setName("\(shared.tap?.name ?? "vif")q\(index)")
        var txHoldUntil: UInt64 = 0
        var fds = [pollfd](repeating: pollfd(), count: 4)
        // Storm back-off (XSA-332): kicks that keep finding no work mute the
        // event channels, so a guest notifying in a tight loop cannot make
        // this thread spin on its behalf.
        var kicked = false
        var storm = KickStormGuard()
        var tapGoneReported = false
        while true {
            let disabled = shared.disabled.load(ordering: .relaxed)
            let before = (tx.ring.reqCons, rx.ring.reqCons, rx.count, tx.held == nil)
            var now = RateLimiter.now()
            var timeout: Int32 = -1
            let rateChanges = shared.rateChanges.load(ordering: .acquiring)
            if rateChanges != rateChangesSeen {
                rateChangesSeen = rateChanges
                tx.limiter.change(to: shared.rate.withLock { $0 }, now: now)
                txHoldUntil = 0  // a held queue tries again with the new credit
            }
            // A spent turn budget on either side: poll without waiting, so
            // the stop eventfd and the other side get their turn first.
            var moreWork = false
            if !disabled {
                // Transmit.
                if now >= txHoldUntil {
                    txHoldUntil = 0
                    switch tx.run(kick: { notify(tx: true, rx: false) }) {
                    case .idle(let n):
                        notify(tx: n, rx: false)
                    case .budgetSpent(let n):
                        notify(tx: n, rx: false)
                        moreWork = true
                    case .rateLimited(let until, let n):
                        notify(tx: n, rx: false)
                        txHoldUntil = until
                    case .fatal(let f, let n):
                        notify(tx: n, rx: false)
                        shared.fatal(f, queue: index)
                        continue
                    }
                    if let d = tx.lastDrop {
                        if let leftOut = dropLog.admit(now: now) {
                            shared.logger.warning("queue \(index): dropped a transmitted packet: \(d)\(LogRateLimit.suffix(leftOut))")
                        }
                        tx.lastDrop = nil
                    }
                }
                // Receive (cheap when idle: a full backlog is not read, and
                // the stall clock is checked on every wake-up).
                do {
                    if try serveRx() { moreWork = true }
                } catch {
                    shared.fatal(.bogusRing(error), queue: index)
                    continue
                }
                now = RateLimiter.now()
                if txHoldUntil != 0 { timeout = PollTimeout.until(txHoldUntil, now: now) }
                // Frames wait: a frontend without feature-rx-notify is polled
                // for buffers; one with it kicks when it posts, and is timed
                // for a stall only while it has none posted at all.
                if rx.count > 0 && (!rxNotify || (rx.postedCount == 0 && !rx.carrierOff)) {
                    let t: Int32 = rxNotify
                        ? PollTimeout.until(rx.waitingSince &+ shared.stallTimeout, now: now) : 10
                    timeout = PollTimeout.sooner(timeout, t)
                }
                if moreWork { timeout = 0 }
            }
            let after = (tx.ring.reqCons, rx.ring.reqCons, rx.count, tx.held == nil)
            if storm.turn(kicked: kicked, foundWork: before != after, now: RateLimiter.now()) {
                shared.stats.eventStormBackoffs.wrappingAdd(1, ordering: .relaxed)
            }
            var backingOff = false
            if let left = storm.muted(now: RateLimiter.now()) {
                backingOff = true
                timeout = PollTimeout.sooner(timeout, PollTimeout.milliseconds(left))
            }
            // Reported before the wait: a read that met EBADFD (the tap deleted
            // between a wake-up and the read) leaves the tap out of this poll,
            // which may then sleep until the guest or a stop wakes it.
            if rx.tapGone && !tapGoneReported {
                tapGoneReported = true
                shared.stats.count(.tapGone)
                shared.logger.warning("queue \(index): tap \(shared.tap?.name ?? "?") is gone (deleted under the vif): no longer reading it")
            }
            var n = 0
            fds[n] = pollfd(fd: controlFD, events: Int16(POLLIN), revents: 0); n += 1
            let evtchnAt = n
            if !backingOff {
                fds[n] = pollfd(fd: txChannel.descriptor, events: Int16(POLLIN), revents: 0); n += 1
                if let rxChannel { fds[n] = pollfd(fd: rxChannel.descriptor, events: Int16(POLLIN), revents: 0); n += 1 }
            }
            var tapAt = -1
            if !disabled && !rx.backlogFull && !rx.tapGone {
                tapAt = n
                fds[n] = pollfd(fd: tapFD, events: Int16(POLLIN), revents: 0); n += 1
            }
            let r = poll(&fds, nfds_t(n), timeout)
            if r < 0 && errno != EINTR { shared.logger.error("poll: \(String(cString: strerror(errno)))"); return }
            if fds[0].revents != 0 {
                if stopping.load(ordering: .acquiring) { return }
                _ = cxen_evtfd_drain(controlFD)
            }
            // A deleted tap polls POLLERR at once, for ever (tun_chr_poll with
            // no device): stop polling it rather than spin.
            if tapAt >= 0, fds[tapAt].revents & Int16(POLLERR | POLLHUP | POLLNVAL) != 0 { rx.tapGone = true }
            kicked = false
            if !backingOff {
                if fds[evtchnAt].revents != 0 { _ = txChannel.consume(); kicked = true }
                if let rxChannel, fds[evtchnAt + 1].revents != 0 { _ = rxChannel.consume(); kicked = true }
            }
        }
    }

    /// Reads the tap into the backlog and delivers to the posted buffers until
    /// neither makes progress or a ring's worth of responses went out (a
    /// peer flooding the tap while the guest keeps posting buffers must not
    /// keep the worker from its stop eventfd and transmit side; Linux's rx
    /// thread takes 64 packets a round); handles the stalled-guest carrier.
    /// Returns whether the budget ran out with work left.
    private func serveRx() throws(RingError) -> Bool {
        var notifyRx = false
        var more = false
        let start = rx.ring.rspProdPvt
        while true {
            // Frames read in place are pushed one by one; a spent budget
            // leaves the rest for the next round, after the transmit side.
            if try rx.readInPlace(kick: { notify(tx: false, rx: true) }) {
                more = true
                break
            }
            if rx.ring.rspProdPvt &- start >= rx.ring.size {
                more = true
                break
            }
            rx.readTap()
            let before = rx.count
            let postedBefore = rx.postedCount
            notifyRx = try rx.deliver() || notifyRx
            if rx.count == before && rx.postedCount == postedBefore { break }
            if rx.count == 0 && rx.backlogEmpty {
                rx.readTap()
                if rx.count == 0 { break }
            }
        }
        let now = RateLimiter.now()
        if rx.count > 0 {
            // The stall clock runs from the last frame delivered (Linux's
            // last_rx_time, set per packet): a guest that receives, however
            // slowly, is not stalled.
            if rx.waitingSince == 0 || rx.ring.rspProdPvt != start {
                rx.waitingSince = now
            } else if rxNotify, rx.postedCount == 0, now &- rx.waitingSince >= shared.stallTimeout, !rx.carrierOff {
                // Only a frontend with feature-rx-notify can stall: one without
                // posts buffers with no kick and is polled for them (every
                // 10 ms while frames wait), as Linux's read_xenbus_vif_flags
                // sets stall_timeout = 0 for it. Turning its carrier off would
                // leave nothing to poll for, and the vif dark.
                rx.carrierOff = true
                rx.flushBacklog()
                rx.waitingSince = 0
                try? shared.tap?.setCarrier(false)
                shared.logger.warning("queue \(index): guest rx stalled, carrier off")
                _ = try rx.deliver()  // re-arm req_event so posting buffers wakes us
            }
        } else {
            rx.waitingSince = 0
        }
        // After the stall check: buffers the guest posted meanwhile (taken by
        // its last deliver) bring the carrier straight back, as Linux's
        // xenvif_rx_queue_ready; nothing else would wake us for them.
        if rx.carrierOff, rx.postedCount > 0 {
            rx.carrierOff = false
            try? shared.tap?.setCarrier(true)
            shared.logger.info("queue \(index): guest rx ready, carrier on")
        }
        if notifyRx { notify(tx: false, rx: true) }
        return more
    }
}
