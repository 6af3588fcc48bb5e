/// Constants of the NBD protocol (nbd's doc/proto.md), newstyle fixed
/// negotiation and simple replies.
enum NBDProto {
    static let initMagic: UInt64 = 0x4E42_444D_4147_4943  // "NBDMAGIC"
    static let optMagic: UInt64 = 0x4948_4156_454F_5054  // "IHAVEOPT"
    static let replyMagic: UInt64 = 0x3_E889_0455_65A9
    static let requestMagic: UInt32 = 0x2560_9513
    static let simpleReplyMagic: UInt32 = 0x6744_6698

    // Handshake flags (server) and client flags.
    static let flagFixedNewstyle: UInt16 = 1 << 0
    static let flagNoZeroes: UInt16 = 1 << 1
    static let clientFixedNewstyle: UInt32 = 1 << 0
    static let clientNoZeroes: UInt32 = 1 << 1

    // Options.
    static let optExportName: UInt32 = 1
    static let optAbort: UInt32 = 2
    static let optList: UInt32 = 3
    static let optInfo: UInt32 = 6
    static let optGo: UInt32 = 7

    // Option replies.
    static let repAck: UInt32 = 1
    static let repServer: UInt32 = 2
    static let repInfo: UInt32 = 3
    static let repErrUnsup: UInt32 = 0x8000_0001
    static let repErrPolicy: UInt32 = 0x8000_0002
    static let repErrInvalid: UInt32 = 0x8000_0003
    static let repErrUnknown: UInt32 = 0x8000_0006

    static let infoExport: UInt16 = 0
    static let infoBlockSize: UInt16 = 3

    // Transmission flags.
    static let hasFlags: UInt16 = 1 << 0
    static let readOnly: UInt16 = 1 << 1
    static let sendFlush: UInt16 = 1 << 2
    static let sendFUA: UInt16 = 1 << 3
    static let sendTrim: UInt16 = 1 << 5
    static let sendWriteZeroes: UInt16 = 1 << 6
    static let canMultiConn: UInt16 = 1 << 8

    // Commands and command flags.
    static let cmdRead: UInt16 = 0
    static let cmdWrite: UInt16 = 1
    static let cmdDisc: UInt16 = 2
    static let cmdFlush: UInt16 = 3
    static let cmdTrim: UInt16 = 4
    static let cmdWriteZeroes: UInt16 = 6
    static let cmdFlagFUA: UInt16 = 1 << 0
    /// NBD_CMD_FLAG_FAST_ZERO: fail at once unless zeroing is faster than
    /// writing zeros (only with NBD_FLAG_SEND_FAST_ZERO, which we never offer).
    static let cmdFlagFastZero: UInt16 = 1 << 4

    // Errors carried in replies.
    static let EPERM: UInt32 = 1
    static let EIO: UInt32 = 5
    static let ENOMEM: UInt32 = 12
    static let EINVAL: UInt32 = 22
    static let ENOSPC: UInt32 = 28
    static let ENOTSUP: UInt32 = 95

    /// Largest request payload we accept (32 MiB, as qemu's server).
    static let maxPayload: UInt32 = 32 << 20
}
