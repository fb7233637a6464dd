from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Event(_message.Message):
    __slots__ = ["data_json", "detail", "kind", "time"]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    data_json: str
    detail: str
    kind: str
    time: float
    def __init__(self, time: _Optional[float] = ..., kind: _Optional[str] = ..., detail: _Optional[str] = ..., data_json: _Optional[str] = ...) -> None: ...

class EventsRequest(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class QmpRequest(_message.Message):
    __slots__ = ["arguments_json", "command"]
    ARGUMENTS_JSON_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    arguments_json: str
    command: str
    def __init__(self, command: _Optional[str] = ..., arguments_json: _Optional[str] = ...) -> None: ...

class QmpResponse(_message.Message):
    __slots__ = ["return_json"]
    RETURN_JSON_FIELD_NUMBER: _ClassVar[int]
    return_json: str
    def __init__(self, return_json: _Optional[str] = ...) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ["timeout_seconds"]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    timeout_seconds: int
    def __init__(self, timeout_seconds: _Optional[int] = ...) -> None: ...

class ShutdownResponse(_message.Message):
    __slots__ = ["how"]
    HOW_FIELD_NUMBER: _ClassVar[int]
    how: str
    def __init__(self, how: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ["accel", "boot_seconds", "channel", "monitor_pid", "qemu_pid", "sandbox_id", "state"]
    ACCEL_FIELD_NUMBER: _ClassVar[int]
    BOOT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    MONITOR_PID_FIELD_NUMBER: _ClassVar[int]
    QEMU_PID_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    accel: str
    boot_seconds: float
    channel: str
    monitor_pid: int
    qemu_pid: int
    sandbox_id: str
    state: str
    def __init__(self, sandbox_id: _Optional[str] = ..., state: _Optional[str] = ..., qemu_pid: _Optional[int] = ..., monitor_pid: _Optional[int] = ..., accel: _Optional[str] = ..., channel: _Optional[str] = ..., boot_seconds: _Optional[float] = ...) -> None: ...
