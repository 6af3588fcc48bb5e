import Dispatch

extension XenBusClient {
    /// Blocks (at most `seconds`) until `<dir>/state` satisfies `predicate`,
    /// woken by a watch on the state node; nil on timeout. The synchronous
    /// twin of ``waitForState(at:timeout:_:)`` for threads that are not async.
    public func awaitState(at dir: String, seconds: Double = 30,
                           _ predicate: (XenbusState) -> Bool) -> XenbusState? {
        let sem = DispatchSemaphore(value: 0)
        guard let w = try? watch(dir + "/state", callback: { _ in sem.signal() }) else { return nil }
        defer { try? unwatch(w) }
        let deadline = DispatchTime.now() + seconds
        while true {
            if let s = try? state(at: dir), predicate(s) { return s }
            guard sem.wait(timeout: deadline) == .success else { return nil }
        }
    }
}
