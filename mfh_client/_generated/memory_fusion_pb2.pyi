from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Durability(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DURABILITY_UNSPECIFIED: _ClassVar[Durability]
    DURABILITY_ACCEPTED: _ClassVar[Durability]
    DURABILITY_PERSISTED: _ClassVar[Durability]
DURABILITY_UNSPECIFIED: Durability
DURABILITY_ACCEPTED: Durability
DURABILITY_PERSISTED: Durability

class Record(_message.Message):
    __slots__ = ("namespace", "key", "kind", "payload_json", "version", "origin", "deleted", "updated_at_ms", "schema_version")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: str
    kind: str
    payload_json: str
    version: int
    origin: str
    deleted: bool
    updated_at_ms: int
    schema_version: int
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[str] = ..., kind: _Optional[str] = ..., payload_json: _Optional[str] = ..., version: _Optional[int] = ..., origin: _Optional[str] = ..., deleted: _Optional[bool] = ..., updated_at_ms: _Optional[int] = ..., schema_version: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("namespace", "key")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: str
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("record",)
    RECORD_FIELD_NUMBER: _ClassVar[int]
    record: Record
    def __init__(self, record: _Optional[_Union[Record, _Mapping]] = ...) -> None: ...

class BatchGetRequest(_message.Message):
    __slots__ = ("namespace", "keys")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, namespace: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ...) -> None: ...

class BatchGetResponse(_message.Message):
    __slots__ = ("records", "missing")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[Record]
    missing: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, records: _Optional[_Iterable[_Union[Record, _Mapping]]] = ..., missing: _Optional[_Iterable[str]] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("record", "expected_version", "durability", "ttl_seconds")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    DURABILITY_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    record: Record
    expected_version: int
    durability: Durability
    ttl_seconds: int
    def __init__(self, record: _Optional[_Union[Record, _Mapping]] = ..., expected_version: _Optional[int] = ..., durability: _Optional[_Union[Durability, str]] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("version", "event_id")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    version: int
    event_id: str
    def __init__(self, version: _Optional[int] = ..., event_id: _Optional[str] = ...) -> None: ...

class BatchPutRequest(_message.Message):
    __slots__ = ("puts", "durability")
    PUTS_FIELD_NUMBER: _ClassVar[int]
    DURABILITY_FIELD_NUMBER: _ClassVar[int]
    puts: _containers.RepeatedCompositeFieldContainer[PutRequest]
    durability: Durability
    def __init__(self, puts: _Optional[_Iterable[_Union[PutRequest, _Mapping]]] = ..., durability: _Optional[_Union[Durability, str]] = ...) -> None: ...

class BatchPutResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PutResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[PutResponse, _Mapping]]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("namespace", "key", "expected_version", "durability")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    DURABILITY_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: str
    expected_version: int
    durability: Durability
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[str] = ..., expected_version: _Optional[int] = ..., durability: _Optional[_Union[Durability, str]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("version", "event_id")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    version: int
    event_id: str
    def __init__(self, version: _Optional[int] = ..., event_id: _Optional[str] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("namespace", "kind", "key_prefix", "page_size", "page_token", "include_deleted")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_PREFIX_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_DELETED_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    kind: str
    key_prefix: str
    page_size: int
    page_token: str
    include_deleted: bool
    def __init__(self, namespace: _Optional[str] = ..., kind: _Optional[str] = ..., key_prefix: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., include_deleted: _Optional[bool] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("records", "next_page_token")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[Record]
    next_page_token: str
    def __init__(self, records: _Optional[_Iterable[_Union[Record, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("namespace", "key_prefix", "after_sequence", "send_progress")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_PREFIX_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SEND_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key_prefix: str
    after_sequence: int
    send_progress: bool
    def __init__(self, namespace: _Optional[str] = ..., key_prefix: _Optional[str] = ..., after_sequence: _Optional[int] = ..., send_progress: _Optional[bool] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("record", "op", "sequence", "event_id")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    record: Record
    op: str
    sequence: int
    event_id: str
    def __init__(self, record: _Optional[_Union[Record, _Mapping]] = ..., op: _Optional[str] = ..., sequence: _Optional[int] = ..., event_id: _Optional[str] = ...) -> None: ...

class MetadataFilter(_message.Message):
    __slots__ = ("field", "op", "value_json")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    VALUE_JSON_FIELD_NUMBER: _ClassVar[int]
    field: str
    op: str
    value_json: str
    def __init__(self, field: _Optional[str] = ..., op: _Optional[str] = ..., value_json: _Optional[str] = ...) -> None: ...

class SearchFilters(_message.Message):
    __slots__ = ("kinds", "tags", "metadata", "updated_after_ms", "updated_before_ms")
    KINDS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_BEFORE_MS_FIELD_NUMBER: _ClassVar[int]
    kinds: _containers.RepeatedScalarFieldContainer[str]
    tags: _containers.RepeatedScalarFieldContainer[str]
    metadata: _containers.RepeatedCompositeFieldContainer[MetadataFilter]
    updated_after_ms: int
    updated_before_ms: int
    def __init__(self, kinds: _Optional[_Iterable[str]] = ..., tags: _Optional[_Iterable[str]] = ..., metadata: _Optional[_Iterable[_Union[MetadataFilter, _Mapping]]] = ..., updated_after_ms: _Optional[int] = ..., updated_before_ms: _Optional[int] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("namespace", "namespace_prefix", "query", "filters", "embedding", "top_k")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_PREFIX_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    namespace_prefix: str
    query: str
    filters: SearchFilters
    embedding: _containers.RepeatedScalarFieldContainer[float]
    top_k: int
    def __init__(self, namespace: _Optional[str] = ..., namespace_prefix: _Optional[str] = ..., query: _Optional[str] = ..., filters: _Optional[_Union[SearchFilters, _Mapping]] = ..., embedding: _Optional[_Iterable[float]] = ..., top_k: _Optional[int] = ...) -> None: ...

class SearchHit(_message.Message):
    __slots__ = ("record", "score")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    record: Record
    score: float
    def __init__(self, record: _Optional[_Union[Record, _Mapping]] = ..., score: _Optional[float] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits",)
    HITS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    def __init__(self, hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ...) -> None: ...

class ListNamespacesRequest(_message.Message):
    __slots__ = ("prefix", "max_depth", "page_size", "page_token")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    MAX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    max_depth: int
    page_size: int
    page_token: str
    def __init__(self, prefix: _Optional[str] = ..., max_depth: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListNamespacesResponse(_message.Message):
    __slots__ = ("namespaces", "next_page_token")
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    namespaces: _containers.RepeatedScalarFieldContainer[str]
    next_page_token: str
    def __init__(self, namespaces: _Optional[_Iterable[str]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
