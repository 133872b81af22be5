"""The policy document (design contract, "The policy document"), validated with pydantic.

A policy is JSON, served as is. :func:`validate_document` checks structure and internal
consistency (shapes agree with the exits and classes, costs increase, the hash matches) and
returns the parsed :class:`PolicyDocument`; ``.to_json_dict()`` gives back plain JSON.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from exitwise.calibration.exceptions import InputError
from exitwise.policies.canonical import SCHEMA, content_hash
from exitwise.policies.names import MODEL_NAME_MAX, MODEL_NAME_PATTERN

Score = Literal["max_prob", "margin", "entropy"]
Risk = Literal["disagreement", "induced_error"]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class ModelRef(_Open):
    name: Annotated[str, Field(min_length=1, max_length=MODEL_NAME_MAX, pattern=MODEL_NAME_PATTERN)]
    version: str | None = None


class Calibrator(_Open):
    type: Literal["identity", "temperature", "platt"]
    temperature: Annotated[float, Field(gt=0)] | None = None
    coef: list[float] | None = None
    intercept: float | None = None

    @model_validator(mode="after")
    def _parameters(self) -> Calibrator:
        if self.type == "temperature" and self.temperature is None:
            raise ValueError("a temperature calibrator needs 'temperature'")
        if self.type == "platt" and (self.coef is None or len(self.coef) != 3 or self.intercept is None):
            raise ValueError("a platt calibrator needs 'coef' (3 numbers) and 'intercept'")
        return self


class Exit(_Open):
    name: Annotated[str, Field(min_length=1)]
    cost: Annotated[float, Field(gt=0)]
    calibrator: Calibrator = Calibrator(type="identity")


class ForcedFullDepth(_Open):
    classes: list[str] = []
    segments: list[str] = []


class SegmentGuarantee(_Open):
    eps: Unit
    n: Annotated[int, Field(ge=0)]
    upper_bound: Unit | None = None
    certified: bool


class Guarantee(_Open):
    risk: Risk
    eps: Annotated[float, Field(gt=0, lt=1)]
    delta: Annotated[float, Field(gt=0, lt=1)]
    method: str
    n: Annotated[int, Field(ge=0)]
    certified: bool
    segments: dict[str, SegmentGuarantee] = {}


ThresholdRow = list[float | None] | None


class PolicyDocument(_Open):
    """A policy document; unknown extra fields are kept (and hashed) as they are."""

    schema_: Literal["exitwise.policy/v1"] = Field(alias="schema")
    model: ModelRef
    exits: Annotated[list[Exit], Field(min_length=2)]
    classes: Annotated[list[str], Field(min_length=1)]
    score: Score = "max_prob"
    segment_keys: list[str] = []
    thresholds: dict[str, list[ThresholdRow] | None]
    forced_full_depth: ForcedFullDepth = ForcedFullDepth()
    max_exit: Annotated[int, Field(ge=0)] | None = None
    shadow_rate: Unit = 0.0
    guarantee: Guarantee
    expected: dict[str, Any]
    data: dict[str, Any]
    parent: Annotated[int, Field(ge=1)] | None = None
    content_hash: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _consistent(self) -> PolicyDocument:
        k, c = len(self.exits), len(self.classes)
        costs = [e.cost for e in self.exits]
        for i in range(1, k):
            if costs[i] <= costs[i - 1]:
                raise ValueError(f"exits[{i}].cost must be greater than exits[{i - 1}].cost (costs are cumulative)")
        if "default" not in self.thresholds:
            raise ValueError("thresholds must have a 'default' entry")
        for seg, rows in self.thresholds.items():
            if rows is None:
                continue
            if len(rows) != k - 1:
                raise ValueError(f"thresholds[{seg!r}] must have {k - 1} rows (one per early exit), got {len(rows)}")
            for j, row in enumerate(rows):
                if row is not None and len(row) != c:
                    raise ValueError(f"thresholds[{seg!r}][{j}] must have {c} entries (one per class), got {len(row)}")
        unknown = set(self.forced_full_depth.classes) - set(self.classes)
        if unknown:
            raise ValueError(f"forced_full_depth.classes names unknown classes: {sorted(unknown)}")
        if self.max_exit is not None and self.max_exit > k - 1:
            raise ValueError(f"max_exit {self.max_exit} is beyond the last exit {k - 1}")
        return self

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=False)


class DocumentError(InputError):
    """A policy document that does not validate; ``errors`` lists (location, message)."""

    title = "Invalid policy document"

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("invalid policy document: " + "; ".join(f"{loc}: {msg}" for loc, msg in errors))


def validate_document(doc: Any, *, check_hash: bool = True) -> PolicyDocument:
    """Parse and check a policy document; raise :class:`DocumentError` naming every problem."""
    if not isinstance(doc, dict):
        raise DocumentError([("$", f"a policy document is a JSON object, got {type(doc).__name__}")])
    if doc.get("schema") != SCHEMA:
        raise DocumentError([("schema", f"expected {SCHEMA!r}, got {doc.get('schema')!r}")])
    try:
        parsed = PolicyDocument.model_validate(doc)
    except ValidationError as exc:
        raise DocumentError(
            [(".".join(str(p) for p in e["loc"]) or "$", e["msg"]) for e in exc.errors()]
        ) from None
    if check_hash:
        expected = content_hash(doc)
        if doc["content_hash"] != expected:
            raise DocumentError([("content_hash", f"does not match the content (expected {expected})")])
    return parsed
