"""The policy document (design contract, "The policy document"), validated with pydantic.

A policy is JSON, served as is. :func:`validate_document` checks every value against its
meaning and returns the parsed :class:`PolicyDocument`; ``.to_json_dict()`` gives back plain
JSON. In order:

1. the JSON itself (:func:`check_json_values`): nesting at most ``MAX_DEPTH`` deep, at most
   ``MAX_NODES`` values, finite numbers, integers a JSON reader keeps exactly (|x| < 2**53),
   no NUL or other control characters in strings or keys — anything else would reach the
   database or a runtime and fail there;
2. the fields, strictly typed (no ``"0.5"`` for a number, no ``true`` for a threshold):
   thresholds in [0, 1] or null, temperatures positive and finite within
   [``MIN_TEMPERATURE``, ``MAX_TEMPERATURE``], costs positive and increasing, version
   numbers within the store's range;
3. internal consistency: shapes agree with the exits and classes, forced classes exist; for a
   large-vocabulary policy (``vocabulary``, see :class:`PolicyVocabulary`) the classes are the
   token buckets and the token-to-bucket map decodes to one bucket of them per token;
4. the content hash.

``certified`` in a document is what its author claims; the service re-runs the
certification at approval when it can (:mod:`exitwise.policies.reverify`).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from exitwise.calibration.buckets import MAX_BUCKETS, decode_bucket_map
from exitwise.calibration.exceptions import InputError
from exitwise.policies.canonical import SCHEMA, content_hash
from exitwise.policies.names import MODEL_NAME_MAX, MODEL_NAME_PATTERN, control_character

Score = Literal["max_prob", "margin", "entropy"]
Risk = Literal["disagreement", "induced_error", "sequence_disagreement"]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
VersionNumber = Annotated[int, Field(ge=1, le=2**31 - 1)]

MAX_DEPTH = 32
MAX_NODES = 2_000_000
MAX_SAFE_INT = 2**53 - 1
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 1e3
MAX_VOCABULARY = 1 << 22  # tokens; the decision rule's limit (exitwise.calibration.rule)
SHARE_TOLERANCE = 1e-3  # bucket traffic shares, rounded in the document, sum to 1 within this


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)


class ModelRef(_Open):
    name: Annotated[str, Field(min_length=1, max_length=MODEL_NAME_MAX, pattern=MODEL_NAME_PATTERN)]
    version: str | None = None


class Calibrator(_Open):
    type: Literal["identity", "temperature", "platt"]
    temperature: Annotated[float, Field(ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)] | None = None
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


ThresholdRow = list[Unit | None] | None


class VocabularyBucketMap(_Open):
    """The token-to-bucket map: ``zlib+base64:uint8`` data and the sha256 of the raw uint8 bytes."""

    encoding: Literal["zlib+base64:uint8"]
    data: Annotated[str, Field(min_length=1)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class VocabularyBuckets(_Open):
    """How the buckets were made, tokens per bucket and (optionally) each bucket's share of the traffic."""

    method: Literal["frequency", "mapping"]
    tokens: list[Annotated[int, Field(ge=0)]] | None = None
    share: list[Unit] | None = None


class PolicyVocabulary(_Open):
    """A language model's vocabulary: ``classes`` are then token buckets (the threshold columns).

    ``size`` tokens, scores from the ``top_k`` largest logits and the full log-sum-exp
    (:mod:`exitwise.calibration.topk`), ``bucket_of`` the bucket of every token id.
    """

    size: Annotated[int, Field(ge=2, le=MAX_VOCABULARY)]
    top_k: Annotated[int, Field(ge=1)]
    bucket_of: VocabularyBucketMap
    buckets: VocabularyBuckets | None = None

    @model_validator(mode="after")
    def _sizes(self) -> PolicyVocabulary:
        if self.top_k > self.size:
            raise ValueError(f"vocabulary.top_k ({self.top_k}) must be at most vocabulary.size ({self.size})")
        tokens = self.buckets.tokens if self.buckets is not None else None
        if tokens is not None and sum(tokens) != self.size:
            raise ValueError(f"vocabulary.buckets.tokens sums to {sum(tokens)}, expected vocabulary.size "
                             f"({self.size})")
        return self


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
    parent: VersionNumber | None = None
    vocabulary: PolicyVocabulary | None = None
    content_hash: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True, strict=True)

    @model_validator(mode="after")
    def _consistent(self) -> PolicyDocument:
        k, c = len(self.exits), len(self.classes)
        if len(set(self.classes)) != c:
            raise ValueError("classes must be unique")
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

    @field_validator("vocabulary")
    @classmethod
    def _vocabulary_buckets(cls, vocab: PolicyVocabulary | None, info: ValidationInfo) -> PolicyVocabulary | None:
        classes = info.data.get("classes")
        if vocab is not None and classes is not None:  # classes that did not validate are reported already
            _check_vocabulary(vocab, len(classes))
        return vocab

    def to_json_dict(self) -> dict[str, Any]:
        out = self.model_dump(mode="json", by_alias=True, exclude_none=False)
        if "vocabulary" not in self.model_fields_set:  # a classifier's document has no such key
            out.pop("vocabulary", None)
        return out


def _check_vocabulary(vocab: PolicyVocabulary, n_buckets: int) -> None:
    """The bucket map against the buckets (``classes``): it decodes, each token has one of them, counts agree."""
    if n_buckets > MAX_BUCKETS:
        raise ValueError(f"classes: a policy with a vocabulary has at most {MAX_BUCKETS} token buckets as classes, "
                         f"got {n_buckets}")
    try:
        bucket_of = decode_bucket_map(vocab.bucket_of.model_dump(), vocab.size, n_buckets)
    except ValueError as exc:
        raise ValueError(str(exc).removeprefix("policy: ")) from None
    if vocab.buckets is None:
        return
    counts = np.bincount(bucket_of, minlength=n_buckets).tolist()
    tokens, share = vocab.buckets.tokens, vocab.buckets.share
    if tokens is not None and len(tokens) != n_buckets:
        raise ValueError(f"vocabulary.buckets.tokens has {len(tokens)} entries, expected one per bucket "
                         f"(classes: {n_buckets})")
    if tokens is not None and tokens != counts:
        b = next(i for i, (t, n) in enumerate(zip(tokens, counts, strict=True)) if t != n)
        raise ValueError(f"vocabulary.buckets.tokens[{b}] is {tokens[b]}, but the bucket map puts {counts[b]} "
                         f"tokens in bucket {b}")
    if share is not None and len(share) != n_buckets:
        raise ValueError(f"vocabulary.buckets.share has {len(share)} entries, expected one per bucket "
                         f"(classes: {n_buckets})")
    if share is not None and abs(math.fsum(share) - 1.0) > SHARE_TOLERANCE:
        raise ValueError(f"vocabulary.buckets.share sums to {math.fsum(share):.6g}, expected 1 "
                         f"(within {SHARE_TOLERANCE})")


class DocumentError(InputError):
    """A policy document that does not validate; ``errors`` lists (location, message)."""

    title = "Invalid policy document"

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("invalid policy document: " + "; ".join(f"{loc}: {msg}" for loc, msg in errors))


def check_json_values(doc: Any, *, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> None:
    """Raise :class:`DocumentError` for JSON a policy document must not hold (see the module docstring).

    Iterative, so a document nested thousands deep is refused instead of exhausting the stack.
    """
    stack: list[tuple[Any, str, int]] = [(doc, "$", 0)]
    nodes = 0
    while stack:
        value, path, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise DocumentError([("$", f"more than {max_nodes} JSON values; a policy document is far smaller")])
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, float):
            if not math.isfinite(value):
                raise DocumentError([(path, "non-finite number (NaN or Infinity); use null for 'never exit'")])
        elif isinstance(value, int):
            if abs(value) > MAX_SAFE_INT:
                raise DocumentError([(path, f"integer out of range (|x| must be at most 2**53 - 1, got "
                                            f"{len(str(abs(value)))} digits)")])
        elif isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, dict | list):
            if depth >= max_depth:
                raise DocumentError([(path, f"nested deeper than {max_depth} levels")])
            if isinstance(value, dict):
                for key, item in value.items():
                    if not isinstance(key, str):
                        raise DocumentError([(path, f"object key {key!r} is not a string")])
                    _check_text(key, f"{path}.{key[:40]}")
                    stack.append((item, f"{path}.{key}", depth + 1))
            else:
                stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
        else:
            raise DocumentError([(path, f"{type(value).__name__} is not a JSON value")])


def _check_text(text: str, path: str) -> None:
    bad = control_character(text)
    if bad is not None:
        raise DocumentError([(path, f"control character {bad} in a string")])


def validate_document(doc: Any, *, check_hash: bool = True) -> PolicyDocument:
    """Parse and check a policy document; raise :class:`DocumentError` naming every problem."""
    if not isinstance(doc, dict):
        raise DocumentError([("$", f"a policy document is a JSON object, got {type(doc).__name__}")])
    check_json_values(doc)
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
