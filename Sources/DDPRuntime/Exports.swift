// The status types the control API returns are the wire's plain Swift structs.
@_exported import struct DDPWire.StatusReply
@_exported import struct DDPWire.WorkerStatus
