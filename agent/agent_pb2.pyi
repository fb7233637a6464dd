from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ARPNeighbor(_message.Message):
    __slots__ = ["device", "flags", "ll_addr", "state", "to_ip"]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    LL_ADDR_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TO_IP_FIELD_NUMBER: _ClassVar[int]
    device: str
    flags: int
    ll_addr: str
    state: int
    to_ip: str
    def __init__(self, to_ip: _Optional[str] = ..., device: _Optional[str] = ..., ll_addr: _Optional[str] = ..., state: _Optional[int] = ..., flags: _Optional[int] = ...) -> None: ...

class AddARPNeighborsRequest(_message.Message):
    __slots__ = ["neighbors"]
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    neighbors: _containers.RepeatedCompositeFieldContainer[ARPNeighbor]
    def __init__(self, neighbors: _Optional[_Iterable[_Union[ARPNeighbor, _Mapping]]] = ...) -> None: ...

class AddStorageRequest(_message.Message):
    __slots__ = ["storage"]
    STORAGE_FIELD_NUMBER: _ClassVar[int]
    storage: Storage
    def __init__(self, storage: _Optional[_Union[Storage, _Mapping]] = ...) -> None: ...

class BlkioEntry(_message.Message):
    __slots__ = ["major", "minor", "op", "value"]
    MAJOR_FIELD_NUMBER: _ClassVar[int]
    MINOR_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    major: int
    minor: int
    op: str
    value: int
    def __init__(self, major: _Optional[int] = ..., minor: _Optional[int] = ..., op: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...

class CheckRequest(_message.Message):
    __slots__ = ["service"]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: str
    def __init__(self, service: _Optional[str] = ...) -> None: ...

class CheckResponse(_message.Message):
    __slots__ = ["status"]
    class ServingStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = []
    NOT_SERVING: CheckResponse.ServingStatus
    SERVING: CheckResponse.ServingStatus
    STATUS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN: CheckResponse.ServingStatus
    status: CheckResponse.ServingStatus
    def __init__(self, status: _Optional[_Union[CheckResponse.ServingStatus, str]] = ...) -> None: ...

class CloseStdinRequest(_message.Message):
    __slots__ = ["container_id", "exec_id"]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ...) -> None: ...

class CopyFileRequest(_message.Message):
    __slots__ = ["data", "dir_mode", "file_mode", "file_size", "gid", "offset", "path", "uid"]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DIR_MODE_FIELD_NUMBER: _ClassVar[int]
    FILE_MODE_FIELD_NUMBER: _ClassVar[int]
    FILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dir_mode: int
    file_mode: int
    file_size: int
    gid: int
    offset: int
    path: str
    uid: int
    def __init__(self, path: _Optional[str] = ..., file_size: _Optional[int] = ..., file_mode: _Optional[int] = ..., dir_mode: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class CpuStats(_message.Message):
    __slots__ = ["throttled_periods", "throttled_time_ns", "usage_kernel_ns", "usage_total_ns", "usage_user_ns"]
    THROTTLED_PERIODS_FIELD_NUMBER: _ClassVar[int]
    THROTTLED_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    USAGE_KERNEL_NS_FIELD_NUMBER: _ClassVar[int]
    USAGE_TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    USAGE_USER_NS_FIELD_NUMBER: _ClassVar[int]
    throttled_periods: int
    throttled_time_ns: int
    usage_kernel_ns: int
    usage_total_ns: int
    usage_user_ns: int
    def __init__(self, usage_total_ns: _Optional[int] = ..., usage_kernel_ns: _Optional[int] = ..., usage_user_ns: _Optional[int] = ..., throttled_periods: _Optional[int] = ..., throttled_time_ns: _Optional[int] = ...) -> None: ...

class CreateContainerRequest(_message.Message):
    __slots__ = ["container_id", "devices", "exec_id", "oci_spec_json", "start", "stdio", "storages"]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    OCI_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STDIO_FIELD_NUMBER: _ClassVar[int]
    STORAGES_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    exec_id: str
    oci_spec_json: bytes
    start: bool
    stdio: StdioConfig
    storages: _containers.RepeatedCompositeFieldContainer[Storage]
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., oci_spec_json: _Optional[bytes] = ..., storages: _Optional[_Iterable[_Union[Storage, _Mapping]]] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., stdio: _Optional[_Union[StdioConfig, _Mapping]] = ..., start: bool = ...) -> None: ...

class CreateSandboxRequest(_message.Message):
    __slots__ = ["dns", "guest_hook_path", "hostname", "sandbox_id", "sandbox_pidns", "storages"]
    DNS_FIELD_NUMBER: _ClassVar[int]
    GUEST_HOOK_PATH_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_PIDNS_FIELD_NUMBER: _ClassVar[int]
    STORAGES_FIELD_NUMBER: _ClassVar[int]
    dns: _containers.RepeatedScalarFieldContainer[str]
    guest_hook_path: str
    hostname: str
    sandbox_id: str
    sandbox_pidns: bool
    storages: _containers.RepeatedCompositeFieldContainer[Storage]
    def __init__(self, hostname: _Optional[str] = ..., dns: _Optional[_Iterable[str]] = ..., sandbox_id: _Optional[str] = ..., storages: _Optional[_Iterable[_Union[Storage, _Mapping]]] = ..., sandbox_pidns: bool = ..., guest_hook_path: _Optional[str] = ...) -> None: ...

class DestroySandboxRequest(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class Device(_message.Message):
    __slots__ = ["container_path", "id", "options", "type", "vm_path"]
    CONTAINER_PATH_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VM_PATH_FIELD_NUMBER: _ClassVar[int]
    container_path: str
    id: str
    options: _containers.RepeatedScalarFieldContainer[str]
    type: str
    vm_path: str
    def __init__(self, id: _Optional[str] = ..., type: _Optional[str] = ..., vm_path: _Optional[str] = ..., container_path: _Optional[str] = ..., options: _Optional[_Iterable[str]] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class ExecProcessRequest(_message.Message):
    __slots__ = ["container_id", "exec_id", "process_json", "stdio"]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    PROCESS_JSON_FIELD_NUMBER: _ClassVar[int]
    STDIO_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    process_json: bytes
    stdio: StdioConfig
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., process_json: _Optional[bytes] = ..., stdio: _Optional[_Union[StdioConfig, _Mapping]] = ...) -> None: ...

class GetOOMEventRequest(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class GuestDetailsRequest(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class GuestDetailsResponse(_message.Message):
    __slots__ = ["agent_ready_uptime_seconds", "agent_version", "channel", "cpus_online", "cpus_possible", "kernel_release", "kernel_version", "machine", "mem_available_bytes", "mem_free_bytes", "mem_total_bytes", "memory", "uptime_seconds"]
    AGENT_READY_UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    CPUS_ONLINE_FIELD_NUMBER: _ClassVar[int]
    CPUS_POSSIBLE_FIELD_NUMBER: _ClassVar[int]
    KERNEL_RELEASE_FIELD_NUMBER: _ClassVar[int]
    KERNEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MACHINE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    MEM_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEM_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    agent_ready_uptime_seconds: float
    agent_version: str
    channel: str
    cpus_online: int
    cpus_possible: int
    kernel_release: str
    kernel_version: str
    machine: str
    mem_available_bytes: int
    mem_free_bytes: int
    mem_total_bytes: int
    memory: MemoryBlockInfo
    uptime_seconds: float
    def __init__(self, kernel_release: _Optional[str] = ..., kernel_version: _Optional[str] = ..., machine: _Optional[str] = ..., cpus_online: _Optional[int] = ..., cpus_possible: _Optional[int] = ..., mem_total_bytes: _Optional[int] = ..., mem_free_bytes: _Optional[int] = ..., mem_available_bytes: _Optional[int] = ..., memory: _Optional[_Union[MemoryBlockInfo, _Mapping]] = ..., agent_version: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., agent_ready_uptime_seconds: _Optional[float] = ..., channel: _Optional[str] = ...) -> None: ...

class IPAddress(_message.Message):
    __slots__ = ["address", "family", "prefix_len"]
    class Family(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = []
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LEN_FIELD_NUMBER: _ClassVar[int]
    V4: IPAddress.Family
    V6: IPAddress.Family
    address: str
    family: IPAddress.Family
    prefix_len: int
    def __init__(self, family: _Optional[_Union[IPAddress.Family, str]] = ..., address: _Optional[str] = ..., prefix_len: _Optional[int] = ...) -> None: ...

class Interface(_message.Message):
    __slots__ = ["addresses", "device", "hw_addr", "mtu", "name", "pci_path"]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HW_ADDR_FIELD_NUMBER: _ClassVar[int]
    MTU_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PCI_PATH_FIELD_NUMBER: _ClassVar[int]
    addresses: _containers.RepeatedCompositeFieldContainer[IPAddress]
    device: str
    hw_addr: str
    mtu: int
    name: str
    pci_path: str
    def __init__(self, device: _Optional[str] = ..., name: _Optional[str] = ..., addresses: _Optional[_Iterable[_Union[IPAddress, _Mapping]]] = ..., mtu: _Optional[int] = ..., hw_addr: _Optional[str] = ..., pci_path: _Optional[str] = ...) -> None: ...

class Interfaces(_message.Message):
    __slots__ = ["interfaces"]
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    interfaces: _containers.RepeatedCompositeFieldContainer[Interface]
    def __init__(self, interfaces: _Optional[_Iterable[_Union[Interface, _Mapping]]] = ...) -> None: ...

class ListInterfacesRequest(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class ListProcessesRequest(_message.Message):
    __slots__ = ["container_id"]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class ListProcessesResponse(_message.Message):
    __slots__ = ["processes"]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    processes: _containers.RepeatedCompositeFieldContainer[ProcessInfo]
    def __init__(self, processes: _Optional[_Iterable[_Union[ProcessInfo, _Mapping]]] = ...) -> None: ...

class ListRoutesRequest(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class LogRecord(_message.Message):
    __slots__ = ["level", "message", "time"]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    level: str
    message: str
    time: float
    def __init__(self, time: _Optional[float] = ..., level: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class MemoryBlockInfo(_message.Message):
    __slots__ = ["block_size_bytes", "hotplug_probe"]
    BLOCK_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOTPLUG_PROBE_FIELD_NUMBER: _ClassVar[int]
    block_size_bytes: int
    hotplug_probe: bool
    def __init__(self, block_size_bytes: _Optional[int] = ..., hotplug_probe: bool = ...) -> None: ...

class MemoryStats(_message.Message):
    __slots__ = ["cache_bytes", "failcnt", "limit_bytes", "max_usage_bytes", "usage_bytes"]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FAILCNT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_USAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    USAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    cache_bytes: int
    failcnt: int
    limit_bytes: int
    max_usage_bytes: int
    usage_bytes: int
    def __init__(self, usage_bytes: _Optional[int] = ..., max_usage_bytes: _Optional[int] = ..., limit_bytes: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., failcnt: _Optional[int] = ...) -> None: ...

class NetworkStats(_message.Message):
    __slots__ = ["name", "rx_bytes", "rx_packets", "tx_bytes", "tx_packets"]
    NAME_FIELD_NUMBER: _ClassVar[int]
    RX_BYTES_FIELD_NUMBER: _ClassVar[int]
    RX_PACKETS_FIELD_NUMBER: _ClassVar[int]
    TX_BYTES_FIELD_NUMBER: _ClassVar[int]
    TX_PACKETS_FIELD_NUMBER: _ClassVar[int]
    name: str
    rx_bytes: int
    rx_packets: int
    tx_bytes: int
    tx_packets: int
    def __init__(self, name: _Optional[str] = ..., rx_bytes: _Optional[int] = ..., rx_packets: _Optional[int] = ..., tx_bytes: _Optional[int] = ..., tx_packets: _Optional[int] = ...) -> None: ...

class OOMEvent(_message.Message):
    __slots__ = ["container_id"]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class OfflineCPUsRequest(_message.Message):
    __slots__ = ["keep_online"]
    KEEP_ONLINE_FIELD_NUMBER: _ClassVar[int]
    keep_online: int
    def __init__(self, keep_online: _Optional[int] = ...) -> None: ...

class OnlineCPUMemRequest(_message.Message):
    __slots__ = ["nb_cpus", "online_memory"]
    NB_CPUS_FIELD_NUMBER: _ClassVar[int]
    ONLINE_MEMORY_FIELD_NUMBER: _ClassVar[int]
    nb_cpus: int
    online_memory: bool
    def __init__(self, nb_cpus: _Optional[int] = ..., online_memory: bool = ...) -> None: ...

class OnlineCPUMemResponse(_message.Message):
    __slots__ = ["cpus_online", "mem_total_bytes"]
    CPUS_ONLINE_FIELD_NUMBER: _ClassVar[int]
    MEM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    cpus_online: int
    mem_total_bytes: int
    def __init__(self, cpus_online: _Optional[int] = ..., mem_total_bytes: _Optional[int] = ...) -> None: ...

class PauseContainerRequest(_message.Message):
    __slots__ = ["container_id"]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class PidsStats(_message.Message):
    __slots__ = ["current", "limit"]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    current: int
    limit: int
    def __init__(self, current: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ProcessInfo(_message.Message):
    __slots__ = ["args", "exec_id", "pid"]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    args: _containers.RepeatedScalarFieldContainer[str]
    exec_id: str
    pid: int
    def __init__(self, pid: _Optional[int] = ..., exec_id: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ...) -> None: ...

class ReadLogsRequest(_message.Message):
    __slots__ = ["follow"]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    follow: bool
    def __init__(self, follow: bool = ...) -> None: ...

class ReadStreamRequest(_message.Message):
    __slots__ = ["container_id", "exec_id"]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ...) -> None: ...

class ReadStreamResponse(_message.Message):
    __slots__ = ["data"]
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class RemoveContainerRequest(_message.Message):
    __slots__ = ["container_id", "timeout_seconds"]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    timeout_seconds: int
    def __init__(self, container_id: _Optional[str] = ..., timeout_seconds: _Optional[int] = ...) -> None: ...

class RemoveStorageRequest(_message.Message):
    __slots__ = ["mount_point"]
    MOUNT_POINT_FIELD_NUMBER: _ClassVar[int]
    mount_point: str
    def __init__(self, mount_point: _Optional[str] = ...) -> None: ...

class ReseedRandomDevRequest(_message.Message):
    __slots__ = ["data"]
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ResumeContainerRequest(_message.Message):
    __slots__ = ["container_id"]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ["dest", "device", "family", "gateway", "scope", "source"]
    DEST_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    dest: str
    device: str
    family: IPAddress.Family
    gateway: str
    scope: int
    source: str
    def __init__(self, dest: _Optional[str] = ..., gateway: _Optional[str] = ..., device: _Optional[str] = ..., source: _Optional[str] = ..., scope: _Optional[int] = ..., family: _Optional[_Union[IPAddress.Family, str]] = ...) -> None: ...

class Routes(_message.Message):
    __slots__ = ["routes"]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    def __init__(self, routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ...) -> None: ...

class SetGuestDateTimeRequest(_message.Message):
    __slots__ = ["sec", "usec"]
    SEC_FIELD_NUMBER: _ClassVar[int]
    USEC_FIELD_NUMBER: _ClassVar[int]
    sec: int
    usec: int
    def __init__(self, sec: _Optional[int] = ..., usec: _Optional[int] = ...) -> None: ...

class SetNetworkIdentityRequest(_message.Message):
    __slots__ = ["hostname", "hosts", "resolv_conf"]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    RESOLV_CONF_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    hosts: bytes
    resolv_conf: bytes
    def __init__(self, hostname: _Optional[str] = ..., hosts: _Optional[bytes] = ..., resolv_conf: _Optional[bytes] = ...) -> None: ...

class SignalProcessRequest(_message.Message):
    __slots__ = ["all", "container_id", "exec_id", "signal"]
    ALL_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    all: bool
    container_id: str
    exec_id: str
    signal: int
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., signal: _Optional[int] = ..., all: bool = ...) -> None: ...

class StartContainerRequest(_message.Message):
    __slots__ = ["container_id"]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class StatsContainerRequest(_message.Message):
    __slots__ = ["container_id"]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class StatsContainerResponse(_message.Message):
    __slots__ = ["blkio", "cpu", "memory", "network", "pids"]
    BLKIO_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    blkio: _containers.RepeatedCompositeFieldContainer[BlkioEntry]
    cpu: CpuStats
    memory: MemoryStats
    network: _containers.RepeatedCompositeFieldContainer[NetworkStats]
    pids: PidsStats
    def __init__(self, cpu: _Optional[_Union[CpuStats, _Mapping]] = ..., memory: _Optional[_Union[MemoryStats, _Mapping]] = ..., pids: _Optional[_Union[PidsStats, _Mapping]] = ..., blkio: _Optional[_Iterable[_Union[BlkioEntry, _Mapping]]] = ..., network: _Optional[_Iterable[_Union[NetworkStats, _Mapping]]] = ...) -> None: ...

class StdioConfig(_message.Message):
    __slots__ = ["stdin", "terminal"]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    stdin: bool
    terminal: bool
    def __init__(self, terminal: bool = ..., stdin: bool = ...) -> None: ...

class Storage(_message.Message):
    __slots__ = ["driver", "driver_options", "fstype", "mount_point", "options", "source"]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    DRIVER_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    FSTYPE_FIELD_NUMBER: _ClassVar[int]
    MOUNT_POINT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    driver: str
    driver_options: _containers.RepeatedScalarFieldContainer[str]
    fstype: str
    mount_point: str
    options: _containers.RepeatedScalarFieldContainer[str]
    source: str
    def __init__(self, driver: _Optional[str] = ..., driver_options: _Optional[_Iterable[str]] = ..., source: _Optional[str] = ..., fstype: _Optional[str] = ..., options: _Optional[_Iterable[str]] = ..., mount_point: _Optional[str] = ...) -> None: ...

class TtyWinResizeRequest(_message.Message):
    __slots__ = ["columns", "container_id", "exec_id", "rows"]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    columns: int
    container_id: str
    exec_id: str
    rows: int
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., rows: _Optional[int] = ..., columns: _Optional[int] = ...) -> None: ...

class UpdateContainerRequest(_message.Message):
    __slots__ = ["container_id", "resources_json"]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_JSON_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    resources_json: bytes
    def __init__(self, container_id: _Optional[str] = ..., resources_json: _Optional[bytes] = ...) -> None: ...

class UpdateInterfaceRequest(_message.Message):
    __slots__ = ["interface"]
    INTERFACE_FIELD_NUMBER: _ClassVar[int]
    interface: Interface
    def __init__(self, interface: _Optional[_Union[Interface, _Mapping]] = ...) -> None: ...

class UpdateRoutesRequest(_message.Message):
    __slots__ = ["routes"]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    routes: Routes
    def __init__(self, routes: _Optional[_Union[Routes, _Mapping]] = ...) -> None: ...

class VersionRequest(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class VersionResponse(_message.Message):
    __slots__ = ["agent_version", "api_hash", "grpc_version", "python_version"]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    API_HASH_FIELD_NUMBER: _ClassVar[int]
    GRPC_VERSION_FIELD_NUMBER: _ClassVar[int]
    PYTHON_VERSION_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    api_hash: str
    grpc_version: str
    python_version: str
    def __init__(self, agent_version: _Optional[str] = ..., api_hash: _Optional[str] = ..., python_version: _Optional[str] = ..., grpc_version: _Optional[str] = ...) -> None: ...

class WaitDeviceRequest(_message.Message):
    __slots__ = ["address", "timeout_ms", "type"]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    address: str
    timeout_ms: int
    type: str
    def __init__(self, type: _Optional[str] = ..., address: _Optional[str] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class WaitDeviceResponse(_message.Message):
    __slots__ = ["guest_path", "sysfs_path"]
    GUEST_PATH_FIELD_NUMBER: _ClassVar[int]
    SYSFS_PATH_FIELD_NUMBER: _ClassVar[int]
    guest_path: str
    sysfs_path: str
    def __init__(self, guest_path: _Optional[str] = ..., sysfs_path: _Optional[str] = ...) -> None: ...

class WaitProcessRequest(_message.Message):
    __slots__ = ["container_id", "exec_id"]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ...) -> None: ...

class WaitProcessResponse(_message.Message):
    __slots__ = ["signaled", "status"]
    SIGNALED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    signaled: bool
    status: int
    def __init__(self, status: _Optional[int] = ..., signaled: bool = ...) -> None: ...

class WriteStreamRequest(_message.Message):
    __slots__ = ["container_id", "data", "exec_id"]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    data: bytes
    exec_id: str
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class WriteStreamResponse(_message.Message):
    __slots__ = ["written"]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    written: int
    def __init__(self, written: _Optional[int] = ...) -> None: ...
