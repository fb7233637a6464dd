from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AttachDiskRequest(_message.Message):
    __slots__ = ["id", "path", "readonly"]
    ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    READONLY_FIELD_NUMBER: _ClassVar[int]
    id: str
    path: str
    readonly: bool
    def __init__(self, id: _Optional[str] = ..., path: _Optional[str] = ..., readonly: bool = ...) -> None: ...

class AttachDiskResponse(_message.Message):
    __slots__ = ["guest_path", "scsi_target", "seconds"]
    class SecondsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    GUEST_PATH_FIELD_NUMBER: _ClassVar[int]
    SCSI_TARGET_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    guest_path: str
    scsi_target: int
    seconds: _containers.ScalarMap[str, float]
    def __init__(self, guest_path: _Optional[str] = ..., scsi_target: _Optional[int] = ..., seconds: _Optional[_Mapping[str, float]] = ...) -> None: ...

class AttachNetworkRequest(_message.Message):
    __slots__ = ["model", "netns_path", "queues"]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NETNS_PATH_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    model: str
    netns_path: str
    queues: int
    def __init__(self, netns_path: _Optional[str] = ..., model: _Optional[str] = ..., queues: _Optional[int] = ...) -> None: ...

class AttachNetworkResponse(_message.Message):
    __slots__ = ["interfaces", "seconds", "skipped"]
    class SecondsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    interfaces: _containers.RepeatedCompositeFieldContainer[NetworkInterface]
    seconds: _containers.ScalarMap[str, float]
    skipped: _containers.RepeatedCompositeFieldContainer[SkippedInterface]
    def __init__(self, interfaces: _Optional[_Iterable[_Union[NetworkInterface, _Mapping]]] = ..., skipped: _Optional[_Iterable[_Union[SkippedInterface, _Mapping]]] = ..., seconds: _Optional[_Mapping[str, float]] = ...) -> None: ...

class AttachVfioRequest(_message.Message):
    __slots__ = ["group", "host_bdfs", "id"]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    HOST_BDFS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    group: str
    host_bdfs: _containers.RepeatedScalarFieldContainer[str]
    id: str
    def __init__(self, id: _Optional[str] = ..., host_bdfs: _Optional[_Iterable[str]] = ..., group: _Optional[str] = ...) -> None: ...

class AttachVfioResponse(_message.Message):
    __slots__ = ["guest_paths"]
    GUEST_PATHS_FIELD_NUMBER: _ClassVar[int]
    guest_paths: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, guest_paths: _Optional[_Iterable[str]] = ...) -> None: ...

class ClaimRequest(_message.Message):
    __slots__ = ["alias", "cgroup_json", "debug", "log_file", "log_format", "nice", "sandbox_id"]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    CGROUP_JSON_FIELD_NUMBER: _ClassVar[int]
    DEBUG_FIELD_NUMBER: _ClassVar[int]
    LOG_FILE_FIELD_NUMBER: _ClassVar[int]
    LOG_FORMAT_FIELD_NUMBER: _ClassVar[int]
    NICE_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    alias: str
    cgroup_json: str
    debug: bool
    log_file: str
    log_format: str
    nice: int
    sandbox_id: str
    def __init__(self, sandbox_id: _Optional[str] = ..., alias: _Optional[str] = ..., cgroup_json: _Optional[str] = ..., log_file: _Optional[str] = ..., log_format: _Optional[str] = ..., debug: bool = ..., nice: _Optional[int] = ...) -> None: ...

class ClaimResponse(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class DetachDiskRequest(_message.Message):
    __slots__ = ["id"]
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DetachDiskResponse(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class DetachNetworkRequest(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class DetachNetworkResponse(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class DetachVfioRequest(_message.Message):
    __slots__ = ["id"]
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DetachVfioResponse(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

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

class NetworkInterface(_message.Message):
    __slots__ = ["addresses", "guest_pci", "host_device", "mac", "mtu", "name", "queues"]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    GUEST_PCI_FIELD_NUMBER: _ClassVar[int]
    HOST_DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    MTU_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    addresses: _containers.RepeatedScalarFieldContainer[str]
    guest_pci: str
    host_device: str
    mac: str
    mtu: int
    name: str
    queues: int
    def __init__(self, name: _Optional[str] = ..., mac: _Optional[str] = ..., mtu: _Optional[int] = ..., host_device: _Optional[str] = ..., guest_pci: _Optional[str] = ..., queues: _Optional[int] = ..., addresses: _Optional[_Iterable[str]] = ...) -> None: ...

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

class ResizeRequest(_message.Message):
    __slots__ = ["memory_mib", "vcpus"]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    memory_mib: int
    vcpus: int
    def __init__(self, vcpus: _Optional[int] = ..., memory_mib: _Optional[int] = ...) -> None: ...

class ResizeResponse(_message.Message):
    __slots__ = ["guest_mem_total_bytes", "memory_mib", "seconds", "vcpus_online"]
    class SecondsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    GUEST_MEM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    VCPUS_ONLINE_FIELD_NUMBER: _ClassVar[int]
    guest_mem_total_bytes: int
    memory_mib: int
    seconds: _containers.ScalarMap[str, float]
    vcpus_online: int
    def __init__(self, vcpus_online: _Optional[int] = ..., memory_mib: _Optional[int] = ..., guest_mem_total_bytes: _Optional[int] = ..., seconds: _Optional[_Mapping[str, float]] = ...) -> None: ...

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

class SkippedInterface(_message.Message):
    __slots__ = ["kind", "name", "reason"]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

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
