"""Request and response bodies: strict JSON in, UTC timestamps with microseconds out."""

import re
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    JsonValue,
    PlainSerializer,
    PlainValidator,
    StringConstraints,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from app.queue.schedules import check_cron, check_timezone

EXAMPLE_TIME = "2026-11-28T15:04:05.123456Z"
EXAMPLE_JOB_ID = "019ac5a1b2c3d4e5f6a7b8c9d0e1f2a3"
EXAMPLE_LEASE_ID = EXAMPLE_JOB_ID + ".1"


@lru_cache(maxsize=4096)
def format_timestamp(moment: datetime) -> str:
    """`YYYY-MM-DDTHH:MM:SS.ffffffZ`: one fixed shape, so clients can even compare strings.

    Cached: the jobs of one batch or one group commit share their times, and formatting
    was a quarter of a batch enqueue's CPU (py-spy)."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?P<frac>\.\d+)?(?P<offset>[Zz]|[+-]\d{2}:\d{2})?"
)


def parse_timestamp(value: object) -> datetime:
    """An RFC 3339 string with an offset; a naive time would mean a different moment per host."""
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 timestamp string such as '2026-01-01T12:00:00Z'")
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise ValueError(
            f"{value[:64]!r} is not an RFC 3339 timestamp such as '2026-01-01T12:00:00Z'"
        )
    if match["offset"] is None:
        raise ValueError(f"{value!r} has no UTC offset: add 'Z' or an offset such as '+02:00'")
    frac = match["frac"] or ""
    text = value[: match.start("frac")] + frac[:7] + value[match.end("frac") :] if frac else value
    try:
        return datetime.fromisoformat(text).astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"{value!r} is not a valid time in years 0001..9999 (UTC)") from exc


def _payload(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(
            "payload must be a string: encode structured data as text first "
            '(for example JSON-encode it, so {"a": 1} becomes "{\\"a\\": 1}")'
        )
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise ValueError("payload is not valid Unicode text (it has a lone surrogate)") from exc
    return no_nul(value)


def no_nul(value: str) -> str:
    """Text columns cannot hold NUL on PostgreSQL; refuse it on every backend alike."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters (\\u0000)")
    return value


NoNul = AfterValidator(no_nul)
NO_NUL_PATTERN = "^[^\\u0000]*$"  # the same rule, for the spec


def _exception_size(value: str) -> str:
    if len(value.encode()) > 65536:
        raise ValueError("exception text is over 64 KiB of UTF-8; truncate it")
    return value


Timestamp = Annotated[
    datetime,
    PlainSerializer(format_timestamp, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time", "example": EXAMPLE_TIME}),
]
InputTimestamp = Annotated[
    datetime,
    PlainValidator(parse_timestamp),
    WithJsonSchema(
        {
            "type": "string",
            "format": "date-time",
            "description": "RFC 3339 with an offset (Z or ±HH:MM), years 0001..9999.",
            "example": "2026-12-01T09:00:00Z",
        }
    ),
]


# The fields a job enqueued by a schedule carries, on every rendering of a job.
def schedule_id_field() -> Any:
    return Field(
        description="The schedule that enqueued this job (PUT /schedules/{schedule_id}); "
        "null for a job a producer enqueued.",
        examples=[None],
    )


def scheduled_for_field() -> Any:
    return Field(description="For a job a schedule enqueued: the occurrence it stands for.")


def catch_up_field() -> Any:
    return Field(
        description="For a job a schedule enqueued: true when it was enqueued late, for "
        "the latest of several occurrences that came due while no scheduler ran (the "
        "earlier ones are dropped), or over 60 s after its occurrence; false when on time.",
        examples=[None],
    )


def _url_safe(name: str) -> str:
    """`.` and `..` pass the pattern, but no URL can carry them (/queues/{name})."""
    if name in (".", ".."):
        raise ValueError(f"a job name cannot be {name!r}: a URL path could not carry it")
    return name


JobName = Annotated[
    str,
    StringConstraints(strict=True, pattern=r"^[A-Za-z0-9_.:\-]{1,255}$"),
    AfterValidator(_url_safe),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^[A-Za-z0-9_.:\-]{1,255}$",
            "not": {"enum": [".", ".."]},
            "minLength": 1,
            "maxLength": 255,
            "description": "1..255 characters of A-Z a-z 0-9 _ . : -, not `.` or `..`",
            "example": "send_email",
        }
    ),
]
Payload = Annotated[
    str,
    PlainValidator(_payload),
    WithJsonSchema(
        {
            "type": "string",
            "description": "Opaque to the server; encode structured data as a string. "
            "Any Unicode text but NUL (\\u0000).",
            "pattern": NO_NUL_PATTERN,
            "example": '{"to": "ada@example.com"}',
        }
    ),
]


def _integral(value: object) -> object:
    """JSON Schema counts 3.0 as an integer, so we do too; strings, booleans and 3.5 still
    fail the strict integer check that follows."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Integral = BeforeValidator(_integral)


def strict_int(ge: int, le: int, **kwargs: Any) -> Any:
    """A JSON integer in [ge, le]: no strings, booleans or fractions (pydantic would coerce
    them); use with an `Integral` annotation."""
    return Field(ge=ge, le=le, strict=True, **kwargs)


class StrictBody(BaseModel):
    """Request bodies reject unknown fields: a typo must not silently mean a default."""

    model_config = ConfigDict(extra="forbid", strict=True)
    NEVER_NULL: ClassVar[tuple[str, ...]] = ()  # optional fields whose null is a 422

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        """Defaults of request fields in words, not as `default`: openapi-typescript 7 (with
        its default flags) makes every property with a `default` in a component schema
        required, so a TypeScript client could not omit `max_retries` or `wait_ms`. The
        server applies the default when the field is absent, as the description says."""
        schema = handler(core_schema)
        for name, field in handler.resolve_ref_schema(schema).get("properties", {}).items():
            if name in cls.NEVER_NULL:  # absent is fine, an explicit null is refused
                branches = [b for b in field.pop("anyOf", []) if b != {"type": "null"}]
                field.update(branches[0] if len(branches) == 1 else {"anyOf": branches})
            if "default" in field:
                default = field.pop("default")
                if default is not None:  # null is the same as absent: nothing to say
                    said = field.get("description", "")
                    field["description"] = f"{said} Default: {default}.".strip()
        return schema


class EnqueueRequest(StrictBody):
    """bg_jobs' JobEnqueueRequest; availability is now, `available_at` or `available_in_ms`."""

    model_config = ConfigDict(
        json_schema_extra={
            # Not both availabilities at once (null counts as absent).
            "not": {
                "required": ["available_at", "available_in_ms"],
                "properties": {
                    "available_at": {"type": "string"},
                    "available_in_ms": {"type": "integer"},
                },
            },
            "examples": [
                {"name": "send_email", "payload": '{"to": "ada@example.com"}'},
                {"name": "report.daily", "payload": "2026-11-28", "available_in_ms": 60000},
                {
                    "name": "reminder",
                    "payload": "42",
                    "available_at": "2026-12-01T09:00:00Z",
                    "max_retries": 5,
                    "priority": 1,
                },
            ],
        }
    )

    name: JobName
    payload: Payload
    available_at: InputTimestamp | None = Field(
        default=None, description="Run no earlier than this time (AvailableAt)."
    )
    available_in_ms: Annotated[int | None, Integral] = strict_int(
        0, 31_536_000_000, default=None, description="Run after this many ms (AvailableIn)."
    )
    max_retries: Annotated[int, Integral] = strict_int(
        0, 100, default=3, description="Retries after the first run: at most 1 + max_retries runs."
    )
    priority: Annotated[int, Integral] = strict_int(
        0,
        9,
        default=0,
        description="0 to 9, lower runs first: among the ready jobs of the names a lease asks "
        "for, the lowest priority goes first, then the oldest. Low priorities wait while "
        "higher ones keep arriving.",
    )

    @model_validator(mode="after")
    def _one_availability(self) -> "EnqueueRequest":
        if self.available_at is not None and self.available_in_ms is not None:
            raise ValueError("give either available_at or available_in_ms, not both")
        return self


class LeaseRequest(StrictBody):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "worker_id": "worker-1",
                    "names": ["send_email"],
                    "max_jobs": 10,
                    "wait_ms": 5000,
                    "lease_ms": 60000,
                }
            ]
        }
    )

    worker_id: Annotated[str, NoNul] = Field(
        min_length=1,
        max_length=255,
        strict=True,
        description="Who holds the lease; stored as the job's reserved_by.",
        json_schema_extra={"pattern": NO_NUL_PATTERN},
    )
    names: list[JobName] = Field(
        min_length=1, max_length=100, strict=True, description="The job names this worker handles."
    )
    max_jobs: Annotated[int, Integral] = strict_int(
        1,
        1000,
        default=1,
        description="Reserve up to this many jobs. Fewer come back when their payloads would "
        "pass BGJOBS_MAX_RESPONSE_BYTES (8 MiB), but at least one when one is ready.",
    )
    wait_ms: Annotated[int, Integral] = strict_int(
        0, 60_000, default=0, description="Long poll: wait up to this long for a job."
    )
    lease_ms: Annotated[int, Integral] = strict_int(
        1000,
        86_400_000,
        default=30_000,
        description="The lease expires this long after it is granted unless extended.",
    )


class EnqueueBatchRequest(StrictBody):
    """Up to 1,000 jobs, committed together or not at all."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "jobs": [
                        {"name": "send_email", "payload": '{"to": "ada@example.com"}'},
                        {"name": "send_email", "payload": '{"to": "bob@example.com"}'},
                        {"name": "report.daily", "payload": "2026-11-28", "available_in_ms": 60000},
                    ]
                }
            ]
        }
    )

    jobs: list[EnqueueRequest] = Field(
        min_length=1, max_length=1000, strict=True, description="1 to 1,000 jobs."
    )


def _distinct(ids: list[str], field: str, what: str = "lease id") -> list[str]:
    seen: set[str] = set()
    for some_id in ids:
        if some_id in seen:
            raise ValueError(f"{what} {some_id!r} is repeated: each may appear once in {field}")
        seen.add(some_id)
    return ids


LeaseIdIn = Annotated[
    str,
    Field(min_length=1, max_length=255, strict=True, examples=[EXAMPLE_LEASE_ID]),
]


class LeaseIdsRequest(StrictBody):
    """1 to 1,000 distinct lease ids."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"ids": [EXAMPLE_LEASE_ID]}]})

    ids: list[LeaseIdIn] = Field(
        min_length=1,
        max_length=1000,
        strict=True,
        description="1 to 1,000 distinct lease ids.",
        json_schema_extra={"uniqueItems": True},
    )

    @model_validator(mode="after")
    def _distinct_ids(self) -> "LeaseIdsRequest":
        _distinct(self.ids, "ids")
        return self


class ExtendBatchRequest(LeaseIdsRequest):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"ids": [EXAMPLE_LEASE_ID], "lease_ms": 60000}]}
    )

    lease_ms: Annotated[int, Integral] = strict_int(
        1000, 86_400_000, description="Each lease now ends this long from now."
    )


class FailRequest(StrictBody):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"exception": "SMTP timeout", "retry_in_ms": 5000}]}
    )

    exception: Annotated[str, NoNul, AfterValidator(_exception_size)] = Field(
        max_length=65536,
        strict=True,
        description="What went wrong (up to 64 KiB of UTF-8).",
        json_schema_extra={"pattern": NO_NUL_PATTERN},
    )
    retry_in_ms: Annotated[int | None, Integral] = strict_int(
        0,
        2_592_000_000,
        default=None,
        description="Retry after this long instead of the default exponential backoff.",
    )


class FailItemRequest(FailRequest):
    """One fail of a batch: the single fail's body plus the lease it is for."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"id": EXAMPLE_LEASE_ID, "exception": "SMTP timeout"}]}
    )

    id: LeaseIdIn


class FailBatchRequest(StrictBody):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {"id": EXAMPLE_LEASE_ID, "exception": "SMTP timeout"},
                        {"id": EXAMPLE_JOB_ID[:-1] + "b.2", "exception": "bad address",
                         "retry_in_ms": 0},
                    ]
                }
            ]
        }
    )  # fmt: skip

    items: list[FailItemRequest] = Field(
        min_length=1,
        max_length=1000,
        strict=True,
        description="1 to 1,000 items, each for a different lease (`id`).",
        json_schema_extra={"uniqueItems": True},
    )

    @model_validator(mode="after")
    def _distinct_ids(self) -> "FailBatchRequest":
        _distinct([item.id for item in self.items], "items")
        return self


class ExtendRequest(StrictBody):
    model_config = ConfigDict(json_schema_extra={"examples": [{"lease_ms": 60000}]})

    lease_ms: Annotated[int, Integral] = strict_int(
        1000, 86_400_000, description="The lease now ends this long from now."
    )


class JobOut(BaseModel):
    """A pending job: available, scheduled (available_at in the future) or reserved."""

    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "id": EXAMPLE_JOB_ID,
                    "name": "send_email",
                    "payload": '{"to": "ada@example.com"}',
                    "attempts": 0,
                    "max_retries": 3,
                    "created_at": EXAMPLE_TIME,
                    "available_at": EXAMPLE_TIME,
                    "reserved_at": None,
                    "reserved_by": None,
                    "lease_expires_at": None,
                    "priority": 0,
                    "schedule_id": None,
                    "scheduled_for": None,
                    "catch_up": None,
                    "state": "available",
                }
            ]
        },
    )

    id: str
    name: str
    payload: str
    attempts: int = Field(description="Runs started so far (grows when the job is leased).")
    max_retries: int
    created_at: Timestamp
    available_at: Timestamp
    reserved_at: Timestamp | None = Field(description="When the current lease was granted.")
    reserved_by: str | None = Field(description="The worker holding the current lease.")
    lease_expires_at: Timestamp | None = Field(
        description="While reserved: when the lease runs out unless extended (the job then "
        "counts as failed by its worker and retries or fails); null otherwise."
    )
    priority: int = Field(description="0 to 9, lower runs first.", examples=[0])
    schedule_id: str | None = schedule_id_field()
    scheduled_for: Timestamp | None = scheduled_for_field()
    catch_up: bool | None = catch_up_field()
    state: Literal["available", "scheduled", "reserved"]


class SucceededJobOut(BaseModel):
    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "id": EXAMPLE_JOB_ID,
                    "name": "send_email",
                    "payload": "{}",
                    "attempts": 1,
                    "created_at": EXAMPLE_TIME,
                    "available_at": EXAMPLE_TIME,
                    "succeeded_at": EXAMPLE_TIME,
                    "priority": 0,
                    "schedule_id": None,
                    "scheduled_for": None,
                    "catch_up": None,
                    "state": "succeeded",
                }
            ]
        },
    )

    id: str
    name: str
    payload: str
    attempts: int
    created_at: Timestamp
    available_at: Timestamp
    succeeded_at: Timestamp
    priority: int = Field(description="0 to 9, lower runs first.", examples=[0])
    schedule_id: str | None = schedule_id_field()
    scheduled_for: Timestamp | None = scheduled_for_field()
    catch_up: bool | None = catch_up_field()
    state: Literal["succeeded"] = "succeeded"


class FailedJobOut(BaseModel):
    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "id": EXAMPLE_JOB_ID,
                    "name": "send_email",
                    "payload": "{}",
                    "attempts": 4,
                    "exception": "SMTP timeout",
                    "created_at": EXAMPLE_TIME,
                    "available_at": EXAMPLE_TIME,
                    "failed_at": EXAMPLE_TIME,
                    "priority": 0,
                    "schedule_id": None,
                    "scheduled_for": None,
                    "catch_up": None,
                    "state": "failed",
                }
            ]
        },
    )

    id: str
    name: str
    payload: str
    attempts: int
    exception: str
    created_at: Timestamp
    available_at: Timestamp
    failed_at: Timestamp
    priority: int = Field(description="0 to 9, lower runs first.", examples=[0])
    schedule_id: str | None = schedule_id_field()
    scheduled_for: Timestamp | None = scheduled_for_field()
    catch_up: bool | None = catch_up_field()
    state: Literal["failed"] = "failed"


AnyJobOut = Annotated[JobOut | SucceededJobOut | FailedJobOut, Field(discriminator="state")]


class LeaseOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(
        description="The lease id: ack, fail, extend or release with it.",
        examples=[EXAMPLE_LEASE_ID],
    )
    expires_at: Timestamp
    job: JobOut


class LeasesOut(BaseModel):
    leases: list[LeaseOut] = Field(description="Empty when the wait ended with no job.")


class RetryingOut(BaseModel):
    outcome: Literal["retrying"] = "retrying"
    job: JobOut


class BuriedOut(BaseModel):
    outcome: Literal["failed"] = "failed"
    job: FailedJobOut


FailOut = Annotated[RetryingOut | BuriedOut, Field(discriminator="outcome")]


class ExtendOut(BaseModel):
    id: str = Field(examples=[EXAMPLE_LEASE_ID])
    expires_at: Timestamp


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null at the end."
    )


class SucceededJobPage(BaseModel):
    items: list[SucceededJobOut]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null at the end."
    )


class FailedJobPage(BaseModel):
    items: list[FailedJobOut]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null at the end."
    )


class ErrorOut(BaseModel):
    detail: str = Field(examples=["job '0193' not found"])


CONFLICT_CODES = (
    "finished_by_this_lease",
    "finished_by_another_lease",
    "leased_again",
    "released",
    "expired",
    "conflict",
)
CODE_DESCRIPTION = (
    "Why: `not_found` (never issued), `finished_by_this_lease` (this very lease already "
    "finished the job: a retried ack or fail can treat it as done; `job` is the finished "
    "job), `finished_by_another_lease`, `leased_again`, `released`, `expired` (put back in "
    "the queue), or `conflict` (any other state conflict)."
)


class ConflictOut(BaseModel):
    """A 409: the job's state forbids the change, and `code` says why."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "detail": f"cannot ack lease '{EXAMPLE_LEASE_ID}': job {EXAMPLE_JOB_ID} has "
                    "been leased again since",
                    "code": "leased_again",
                }
            ]
        }
    )

    detail: str
    code: Literal[CONFLICT_CODES] = Field(description=CODE_DESCRIPTION)  # type: ignore[valid-type]
    job: AnyJobOut | None = Field(
        default=None, description="With `finished_by_this_lease`: the job as it finished."
    )


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorOut(BaseModel):
    detail: str = Field(examples=["body.payload: payload must be a string"])
    errors: list[FieldError]


class Status(BaseModel):
    status: str = Field(examples=["ok"])


class DeletedJobOut(BaseModel):
    """A job of a replayed batch that has been deleted since."""

    id: str
    state: Literal["deleted"] = "deleted"


class JobsOut(BaseModel):
    """The batch's jobs in request order (a replay shows each in its current state)."""

    jobs: list[Annotated[JobOut | SucceededJobOut | FailedJobOut | DeletedJobOut,
                         Field(discriminator="state")]]  # fmt: skip


class ItemErrorOut(BaseModel):
    """One item of a batch that was refused, by the rules of the single call."""

    id: str
    status: Literal[404, 409]
    code: Literal[("not_found", *CONFLICT_CODES)] = Field(description=CODE_DESCRIPTION)  # type: ignore[valid-type]
    detail: str
    job: AnyJobOut | None = Field(
        default=None, description="With `finished_by_this_lease`: the job as it finished."
    )


class AckItemOut(BaseModel):
    id: str
    status: Literal[200]
    job: SucceededJobOut


class FailItemOut(BaseModel):
    id: str
    status: Literal[200]
    outcome: Literal["retrying", "failed"]
    job: JobOut | FailedJobOut


class ExtendItemOut(BaseModel):
    id: str
    status: Literal[200]
    expires_at: Timestamp


class AckResultsOut(BaseModel):
    results: list[AckItemOut | ItemErrorOut] = Field(description="One per id, in request order.")


class FailResultsOut(BaseModel):
    results: list[FailItemOut | ItemErrorOut] = Field(description="One per item, in request order.")


class ExtendResultsOut(BaseModel):
    results: list[ExtendItemOut | ItemErrorOut] = Field(description="One per id, in request order.")


# -- bulk actions (POST /jobs/retry, POST /jobs/delete) ------------------------------------

JobIdIn = Annotated[
    str, Field(min_length=1, max_length=255, strict=True, examples=[EXAMPLE_JOB_ID])
]
RESERVED_REFUSAL = (
    "reserved jobs belong to the workers holding them and cannot be retried or deleted in "
    "bulk; wait for their leases to end"
)


def _not_reserved(value: object) -> object:
    if value == "reserved":
        raise ValueError(RESERVED_REFUSAL)
    return value


class DeleteFilter(StrictBody):
    state: Annotated[
        Literal["available", "scheduled", "succeeded", "failed"], BeforeValidator(_not_reserved)
    ] = Field(description="Every job in this state (as of the call's start).")
    name: JobName | None = Field(default=None, description="Only jobs of this name.")


class RetryFilter(StrictBody):
    state: Literal["failed"] = Field(description="Only failed jobs retry.")
    name: JobName | None = Field(default=None, description="Only jobs of this name.")


def _ids_xor_filter(ids: object, filter_: object) -> None:
    if (ids is None) == (filter_ is None):
        raise ValueError('send either "ids" or "filter", not both and not neither')


def _distinct_job_ids(ids: list[str]) -> list[str]:
    return _distinct(ids, "ids", "job id")


BulkIds = Annotated[
    list[JobIdIn],
    AfterValidator(_distinct_job_ids),
    Field(min_length=1, max_length=1000, json_schema_extra={"uniqueItems": True}),
]
IDS_DESCRIPTION = "1 to 1,000 distinct job ids: one result each."
ONE_OF: list[JsonValue] = [{"required": ["ids"]}, {"required": ["filter"]}]


def _present(value: object) -> object:
    """An explicit null is refused: leave the key out instead."""
    if value is None:
        raise ValueError("must not be null: send either ids or filter and leave the other out")
    return value


class DeleteJobsRequest(StrictBody):
    """Exactly one of `ids` or `filter`."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": ONE_OF,
            "examples": [
                {"ids": [EXAMPLE_JOB_ID]},
                {"filter": {"state": "failed", "name": "send_email"}},
            ],
        }
    )

    NEVER_NULL = ("ids", "filter")
    ids: BulkIds | None = Field(default=None, description=IDS_DESCRIPTION)
    filter: DeleteFilter | None = Field(default=None, description="Every job matching it.")
    _no_null = field_validator("ids", "filter", mode="before")(_present)

    @model_validator(mode="after")
    def _one(self) -> "DeleteJobsRequest":
        _ids_xor_filter(self.ids, self.filter)
        return self


class RetryJobsRequest(StrictBody):
    """Exactly one of `ids` or `filter`."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": ONE_OF,
            "examples": [{"ids": [EXAMPLE_JOB_ID]}, {"filter": {"state": "failed"}}],
        }
    )

    NEVER_NULL = ("ids", "filter")
    ids: BulkIds | None = Field(default=None, description=IDS_DESCRIPTION)
    filter: RetryFilter | None = Field(default=None, description="Every failed job matching it.")
    _no_null = field_validator("ids", "filter", mode="before")(_present)

    @model_validator(mode="after")
    def _one(self) -> "RetryJobsRequest":
        _ids_xor_filter(self.ids, self.filter)
        return self


class BulkItemErrorOut(BaseModel):
    """One id that was refused: unknown, not failed (retry), or reserved (delete)."""

    id: str
    status: Literal[404, 409]
    code: Literal["not_found", "not_failed", "reserved"]
    detail: str


class RetriedItemOut(BaseModel):
    id: str
    status: Literal[200]
    job: JobOut


class DeletedItemOut(BaseModel):
    id: str
    status: Literal[200]


class RetryResultsOut(BaseModel):
    results: list[RetriedItemOut | BulkItemErrorOut] = Field(description="One per id, in order.")


class DeleteResultsOut(BaseModel):
    results: list[DeletedItemOut | BulkItemErrorOut] = Field(description="One per id, in order.")


class BulkFilterOut(BaseModel):
    """What a filter call did; call again while `more`."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"done": 120, "skipped": 1, "more": False}]}
    )

    done: int = Field(description="Jobs retried or deleted.")
    skipped: int = Field(description="Jobs that changed since the walk saw them (e.g. leased).")
    more: bool = Field(description="The 10,000-job cap was reached: call again for the rest.")


class StateCountsOut(BaseModel):
    """Jobs in each state now."""

    available: int = Field(examples=[120])
    scheduled: int = Field(examples=[4])
    reserved: int = Field(examples=[8])
    succeeded: int = Field(examples=[51234])
    failed: int = Field(examples=[17])


class FinishedOut(BaseModel):
    """Jobs that succeeded, or finally failed (not counting attempts that will be retried),
    in a span of whole minutes."""

    succeeded: int = Field(examples=[42])
    failed: int = Field(examples=[1])


class NameStatsOut(BaseModel):
    name: str = Field(examples=["send_email"])
    counts: StateCountsOut
    oldest_available_age_ms: int | None = Field(
        description="How long the oldest available job has been waiting; null when none is.",
        examples=[1234],
    )
    last_minute: FinishedOut = Field(
        description="Finished in the current minute and the one before (60 to 120 s)."
    )
    last_hour: FinishedOut = Field(
        description="Finished since the start of the minute an hour ago."
    )


class TotalsOut(BaseModel):
    counts: StateCountsOut
    oldest_available_age_ms: int | None = Field(examples=[1234])
    last_minute: FinishedOut
    last_hour: FinishedOut


class MinuteOut(BaseModel):
    minute: str = Field(description="Start of the minute (UTC).", examples=["2026-12-02T03:04:00Z"])
    succeeded: int = Field(examples=[3])
    failed: int = Field(examples=[1])


class ServerOut(BaseModel):
    version: str = Field(description="The bgjobs-server package version.", examples=["0.1.0"])
    backend: Literal["sqlite", "postgresql"] = Field(description="The database behind it.")


class StatsOut(BaseModel):
    """Counts for dashboards and `bgjobs stats`."""

    server: ServerOut = Field(description="What answered: for the top of a dashboard.")
    totals: TotalsOut
    names: list[NameStatsOut] = Field(description="One entry per job name, sorted by name.")
    series: list[MinuteOut] | None = Field(
        default=None,
        description="With `?series=Nm`: finishes per minute over the last N minutes (the "
        "current one included), oldest first, zero-filled.",
    )


class FailureGroupOut(BaseModel):
    first_line: str = Field(description="The first line of the exception the jobs share.")
    count: int
    names: dict[str, int] = Field(description="How many of them per job name, most first.")
    last_failed_at: Timestamp


class FailureGroupsOut(BaseModel):
    """Failed jobs grouped by the first line of their exception, most frequent first."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "groups": [
                        {
                            "first_line": "SMTPRecipientsRefused: 550 no such user",
                            "count": 500,
                            "names": {"send_email": 500},
                            "last_failed_at": EXAMPLE_TIME,
                        }
                    ],
                    "scanned": 512,
                    "complete": True,
                }
            ]
        }
    )

    groups: list[FailureGroupOut]
    scanned: int = Field(description="Failed jobs read, newest first (at most 10,000).")
    complete: bool = Field(description="False when there are older failed jobs not read.")


class RateLimitBody(StrictBody):
    """At most `count` leases per `per_ms` milliseconds, across all replicas."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"count": 10, "per_ms": 1000}]})

    count: Annotated[int, Integral] = strict_int(
        1, 1_000_000, description="Leases allowed per `per_ms`."
    )
    per_ms: Annotated[int, Integral] = strict_int(
        1, 86_400_000, description="The window, in milliseconds (at most a day)."
    )


class QueueOut(BaseModel):
    """A job name as a queue: its settings and its jobs by state now."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "send_email",
                    "paused": False,
                    "concurrency_limit": 5,
                    "rate_limit": {"count": 10, "per_ms": 1000},
                    "counts": {
                        "available": 120,
                        "scheduled": 4,
                        "reserved": 5,
                        "succeeded": 51234,
                        "failed": 17,
                    },
                }
            ]
        }
    )

    name: str = Field(examples=["send_email"])
    paused: bool = Field(description="While true, no job of this name is leased.")
    concurrency_limit: int | None = Field(
        description="At most this many live leases of this name at once, on all replicas "
        "together (leases expired but not yet reaped count too); null: no limit."
    )
    rate_limit: RateLimitBody | None = Field(
        description="At most `count` leases per `per_ms`, paced evenly (one every "
        "per_ms / count), on all replicas together; null: no limit."
    )
    counts: StateCountsOut


class QueuesOut(BaseModel):
    queues: list[QueueOut] = Field(
        description="One entry per name that has jobs or settings, sorted by name."
    )


class QueuePatch(StrictBody):
    """The settings to change; an absent key is left as it is, and null removes a limit."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"paused": True},
                {"concurrency_limit": 5, "rate_limit": {"count": 10, "per_ms": 1000}},
                {"concurrency_limit": None, "rate_limit": None},
            ]
        }
    )
    NEVER_NULL = ("paused",)

    paused: bool | None = Field(
        default=None,
        description="Pause (true) or resume (false) leasing this name's jobs, on every "
        "replica. Enqueues go on while paused; a resume wakes waiting polls at once.",
    )
    concurrency_limit: Annotated[int | None, Integral] = strict_int(
        1,
        100_000,
        default=None,
        description="At most this many live leases of this name at once, on all replicas "
        "together; null removes the limit.",
    )
    rate_limit: RateLimitBody | None = Field(
        default=None,
        description="At most `count` leases per `per_ms`, paced evenly, on all replicas "
        "together; null removes the limit.",
    )

    @field_validator("paused", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("must not be null: send true or false, or leave it out")
        return value


SCHEDULE_ID_PATTERN = r"^[A-Za-z0-9_.:\-]{1,255}$"


def _or_none(check: Callable[[str], str]) -> Callable[[str | None], str | None]:
    """A string check that lets null (absent) through."""
    return lambda value: None if value is None else check(value)


class ScheduleRequest(StrictBody):
    """A recurring schedule: every `interval_ms`, or at the times of a `cron` expression in
    `timezone`; each occurrence enqueues one job of `name` with `payload`."""

    model_config = ConfigDict(
        json_schema_extra={
            # Exactly one of interval_ms and cron (null counts as absent), and a timezone
            # only with cron.
            "oneOf": [
                {"required": ["interval_ms"], "properties": {"interval_ms": {"type": "integer"}}},
                {"required": ["cron"], "properties": {"cron": {"type": "string"}}},
            ],
            "not": {
                "required": ["interval_ms", "timezone"],
                "properties": {
                    "interval_ms": {"type": "integer"},
                    "timezone": {"type": "string"},
                },
            },
            "examples": [
                {"name": "report.daily", "payload": "{}", "cron": "30 2 * * *",
                 "timezone": "Europe/Berlin"},
                {"name": "heartbeat", "payload": "", "interval_ms": 60000,
                 "skip_if_running": False},
            ],
        }
    )  # fmt: skip

    name: JobName
    payload: Payload
    max_retries: Annotated[int, Integral] = strict_int(
        0, 100, default=3, description="max_retries of each job it enqueues."
    )
    priority: Annotated[int, Integral] = strict_int(
        0, 9, default=0, description="priority of each job it enqueues (0 to 9, lower first)."
    )
    interval_ms: Annotated[int | None, Integral] = strict_int(
        1000,
        31_536_000_000,
        default=None,
        description="Fixed rate: an occurrence every this many ms after the time of the PUT "
        "that last set the timing (the first one interval after it). Give this or `cron`.",
    )
    cron: Annotated[str | None, AfterValidator(_or_none(check_cron))] = Field(
        default=None,
        max_length=255,
        strict=True,
        description="5 fields (minute hour day-of-month month day-of-week) as in crontab, "
        "read in `timezone`. Give this or `interval_ms`.",
        examples=["30 2 * * *"],
    )
    timezone: Annotated[str | None, AfterValidator(_or_none(check_timezone))] = Field(
        default=None,
        max_length=255,
        strict=True,
        description="The IANA time zone `cron` is read in (only with `cron`). Default: UTC.",
        examples=["Europe/Berlin"],
    )
    paused: bool = Field(default=False, strict=True, description="While true, nothing is enqueued.")
    skip_if_running: bool = Field(
        default=True,
        strict=True,
        description="Skip an occurrence while the job of the previous one is still pending "
        "(available, scheduled or reserved).",
    )

    @model_validator(mode="after")
    def _one_timing(self) -> "ScheduleRequest":
        if (self.interval_ms is None) == (self.cron is None):
            raise ValueError("give exactly one of interval_ms and cron")
        if self.timezone is not None and self.cron is None:
            raise ValueError("timezone applies to cron only; leave it out with interval_ms")
        return self


class ScheduleOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "nightly-report",
                    "name": "report.daily",
                    "payload": "{}",
                    "max_retries": 3,
                    "priority": 0,
                    "interval_ms": None,
                    "cron": "30 2 * * *",
                    "timezone": "Europe/Berlin",
                    "paused": False,
                    "skip_if_running": True,
                    "anchor_at": EXAMPLE_TIME,
                    "next_run_at": "2026-11-29T01:30:00.000000Z",
                    "last_run_at": None,
                    "last_job_id": None,
                    "created_at": EXAMPLE_TIME,
                    "updated_at": EXAMPLE_TIME,
                }
            ]
        }
    )

    id: str = Field(examples=["nightly-report"])
    name: str
    payload: str
    max_retries: int
    priority: int
    interval_ms: int | None
    cron: str | None
    timezone: str | None = Field(description="With `cron`: its IANA time zone.")
    paused: bool
    skip_if_running: bool
    anchor_at: Timestamp = Field(
        description="When the timing was last set: interval occurrences are anchor_at + "
        "k * interval_ms."
    )
    next_run_at: Timestamp | None = Field(
        description="The next occurrence (null: the cron expression never matches again)."
    )
    last_run_at: Timestamp | None = Field(
        description="The occurrence the last job it enqueued stands for."
    )
    last_job_id: str | None = Field(description="The last job it enqueued.")
    created_at: Timestamp
    updated_at: Timestamp


class SchedulesOut(BaseModel):
    schedules: list[ScheduleOut] = Field(description="Every schedule, by id.")
