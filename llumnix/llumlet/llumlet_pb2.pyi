from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RequestProgress(_message.Message):
    __slots__ = ("request_id", "prompt_tokens", "computed_tokens", "output_tokens", "blocks", "running")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_tokens: int
    computed_tokens: int
    output_tokens: int
    blocks: int
    running: bool
    def __init__(self, request_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., computed_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., blocks: _Optional[int] = ..., running: _Optional[bool] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("instance_id", "incarnation", "seq", "step_id", "timestamp", "num_total_blocks", "num_free_blocks", "num_running", "num_waiting", "running_tokens", "waiting_prefill_tokens", "hol_demand_blocks", "waiting_demand_blocks", "decode_batch_size", "decode_tokens", "prefill_tokens", "num_preempted", "role", "healthy", "schedulable", "draining", "block_size", "step_seconds", "requests")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    NUM_TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WAITING_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HOL_DEMAND_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    WAITING_DEMAND_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DECODE_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTED_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    SCHEDULABLE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    incarnation: str
    seq: int
    step_id: int
    timestamp: float
    num_total_blocks: int
    num_free_blocks: int
    num_running: int
    num_waiting: int
    running_tokens: int
    waiting_prefill_tokens: int
    hol_demand_blocks: int
    waiting_demand_blocks: int
    decode_batch_size: int
    decode_tokens: int
    prefill_tokens: int
    num_preempted: int
    role: str
    healthy: bool
    schedulable: bool
    draining: bool
    block_size: int
    step_seconds: float
    requests: _containers.RepeatedCompositeFieldContainer[RequestProgress]
    def __init__(self, instance_id: _Optional[str] = ..., incarnation: _Optional[str] = ..., seq: _Optional[int] = ..., step_id: _Optional[int] = ..., timestamp: _Optional[float] = ..., num_total_blocks: _Optional[int] = ..., num_free_blocks: _Optional[int] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., running_tokens: _Optional[int] = ..., waiting_prefill_tokens: _Optional[int] = ..., hol_demand_blocks: _Optional[int] = ..., waiting_demand_blocks: _Optional[int] = ..., decode_batch_size: _Optional[int] = ..., decode_tokens: _Optional[int] = ..., prefill_tokens: _Optional[int] = ..., num_preempted: _Optional[int] = ..., role: _Optional[str] = ..., healthy: _Optional[bool] = ..., schedulable: _Optional[bool] = ..., draining: _Optional[bool] = ..., block_size: _Optional[int] = ..., step_seconds: _Optional[float] = ..., requests: _Optional[_Iterable[_Union[RequestProgress, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("healthy", "instance_id", "incarnation", "seconds_since_step")
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_STEP_FIELD_NUMBER: _ClassVar[int]
    healthy: bool
    instance_id: str
    incarnation: str
    seconds_since_step: float
    def __init__(self, healthy: _Optional[bool] = ..., instance_id: _Optional[str] = ..., incarnation: _Optional[str] = ..., seconds_since_step: _Optional[float] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("drain",)
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    drain: bool
    def __init__(self, drain: _Optional[bool] = ...) -> None: ...

class DrainReply(_message.Message):
    __slots__ = ("draining",)
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    draining: bool
    def __init__(self, draining: _Optional[bool] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_ids",)
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class AbortReply(_message.Message):
    __slots__ = ("aborted",)
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    aborted: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, aborted: _Optional[_Iterable[str]] = ...) -> None: ...

class MigrateRequest(_message.Message):
    __slots__ = ("request_id", "destination")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    destination: str
    def __init__(self, request_id: _Optional[str] = ..., destination: _Optional[str] = ...) -> None: ...

class MigrateReply(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...
