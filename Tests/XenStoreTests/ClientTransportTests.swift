import Dispatch
import Synchronization
import Testing
import XenBus
import XenStore

/// XenBusClient against a transport the test plays: what it sends when
/// xenstored does not answer.
@Suite struct ClientTransportTests {
    /// Records every message sent; never answers (receive blocks until close).
    final class Silent: XenBusTransport {
        let sent = Mutex<[[UInt8]]>([])
        let closed = DispatchSemaphore(value: 0)
        func send(_ bytes: UnsafeRawBufferPointer) throws(XenBusError) { sent.withLock { $0.append(Array(bytes)) } }
        func receive(into buf: UnsafeMutableRawBufferPointer) throws(XenBusError) -> Int {
            closed.wait()
            closed.signal()
            throw .closed
        }
        func close() { closed.signal() }
    }

    /// An XS_WATCH left unanswered may still be registered by xenstored
    /// later, where it would count against the connection's watch quota for
    /// good: the client withdraws it with an XS_UNWATCH of the same path and
    /// token, whose reply it does not wait for.
    @Test func aWatchThatTimesOutIsWithdrawn() throws {
        let t = Silent()
        let c = XenBusClient(transport: t)
        defer { c.close() }
        c.timeout = 0.1
        #expect(throws: XenBusError.timeout) { _ = try c.watch("/local/domain/7/x", token: "tok") }
        let sent = t.sent.withLock { $0 }
        let types = sent.map { m in m.withUnsafeBytes { XSHeader(from: $0.baseAddress!).type } }
        #expect(types == [XSType.watch.rawValue, XSType.unwatch.rawValue])
        #expect(sent.count == 2 && sent[0].dropFirst(XSHeader.size) == sent[1].dropFirst(XSHeader.size),
                "the same path and token")
        // Any other request that times out sends nothing more.
        #expect(throws: XenBusError.timeout) { try c.write("/a", "b") }
        #expect(t.sent.withLock { $0.count } == 3)
    }
}
