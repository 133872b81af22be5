"""Synthetic token-level exit logs of a language model (top-k per exit), for tests and benchmarks.

Generative model (all draws seeded, see below), for sequence s of ``seq_len`` tokens and token i:

* segment values per sequence (every token of a sequence shares them), w_j ∝ (j + 1)^(-1/2);
  the last level of the first segment column is harder (``hard_shift``);
* difficulty d_i = sqrt(c) z_s + sqrt(1 - c) e_i + shift(segment), z_s, e_i ~ N(0, 1), with
  c = ``sequence_share``: tokens of one sequence share z_s, so they are dependent;
* the final exit's answer a_i is a token drawn from a Zipf(``zipf_exponent``) frequency
  distribution over the vocabulary (rank r -> token id through a fixed permutation);
* exit k < K-1 agrees with a_i when its latent margin
  M_ik = alpha_k - ``difficulty_weight`` d_i + sqrt(rho) g_i + sqrt(1 - rho) h_ik > 0, alpha_k
  rising with depth from ``agreement[0]`` to ``agreement[1]`` (rho = ``noise_corr``); when it
  disagrees it predicts another Zipf-drawn token, and a_i is usually (``answer_in_topk``) among
  its top-k at a low rank;
* its top probability (the confidence) is the posterior P(M_ik > 0 | O_ik) of a noisy view
  O_ik = M_ik + s o_ik (s = ``confidence_noise``) pushed through sigmoid(T_k logit(.) + ``confidence_bias``):
  informative but over-confident (T_k from ``overconfidence[0]`` to ``overconfidence[1]``, bias > 0);
* the other k - 1 probabilities decay geometrically from the top one, and the tail (the V - k
  other tokens) holds a share ``tail_share`` of what the top-k leaves: the logits are
  ``values = lse + log(p)``, ``lse`` a per-row offset, so the top-k probabilities are exact and
  the tail mass 1 - sum(exp(values - lse)) is positive; no tail token exceeds the k-th value;
* the top-k ids are distinct: slot 0 the prediction, the others distractors of increasing
  frequency rank (more frequent tokens get higher logits), with a_i placed among them;
* the label (the true next token) is a_i with probability ``label_agreement``, else another token.

Draws come from per-chunk streams ``SeedSequence(seed, spawn_key=(chunk, stream))``, one per kind
of draw, over chunks of whole sequences (their count depends on ``seq_len`` only): the output
depends on (spec, n_sequences, seq_len, seed) only, and the first m sequences do not depend on
n_sequences. 10^6 tokens x 12 exits x top-32 is 3.1 GB (1.5 GB of float32 values + 1.5 GB of
int32 ids); the work is vectorised per chunk of about 8k tokens, so memory beyond the output is
a few tens of MB.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import expit, log_ndtr

from exitwise.calibration.exceptions import InputError
from exitwise.calibration.logs import MAX_VOCAB, ExitSpec, ModelCard, SegmentColumn
from exitwise.calibration.tokens import TokenLogs

__all__ = ["TokenSpec", "synthetic_token_card", "synthetic_token_logs"]

CHUNK_TOKENS = 1 << 13
_PERMUTATION_SEED = 20240613  # the vocabulary's rank -> id map: a property of the "model", not of the traffic
_TS_START = np.datetime64("2024-01-01T00:00:00", "us")
_STREAMS = ("segments", "sequence", "token", "answer", "shared", "exit", "observe", "other", "tail", "second",
            "ratio", "offset", "start", "spread", "place", "slot", "label", "label_other")


@dataclass(frozen=True)
class TokenSpec:
    """Parameters of the synthetic token traffic (see the module docstring)."""

    n_exits: int = 12
    vocab_size: int = 32000
    top_k: int = 32
    segments: tuple[tuple[str, int], ...] = (("domain", 4),)
    zipf_exponent: float = 1.1
    sequence_share: float = 0.5
    difficulty_weight: float = 1.2
    hard_shift: float = 0.8
    agreement: tuple[float, float] = (-0.5, 3.0)
    noise_corr: float = 0.6
    overconfidence: tuple[float, float] = (2.0, 1.5)
    confidence_noise: float = 1.3
    confidence_bias: float = 1.0
    answer_in_topk: float = 0.85
    tail_share: tuple[float, float] = (0.1, 0.6)
    label_agreement: float = 0.6
    model: str = "synthetic-lm"
    with_ts: bool = True

    def __post_init__(self) -> None:
        if self.n_exits < 2:
            raise InputError(f"n_exits must be >= 2, got {self.n_exits}")
        if not 2 <= self.vocab_size <= MAX_VOCAB:
            raise InputError(f"vocab_size must be in 2..{MAX_VOCAB}, got {self.vocab_size}")
        if not 1 <= self.top_k < self.vocab_size:
            raise InputError(f"top_k must be in 1..vocab_size - 1 ({self.vocab_size - 1}), got {self.top_k}")
        for name, levels in self.segments:
            if not name or levels < 1:
                raise InputError(f"segment {name!r} needs a name and >= 1 levels, got {levels}")
        for field in ("sequence_share", "noise_corr", "answer_in_topk", "label_agreement"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                raise InputError(f"{field} must be in [0, 1], got {getattr(self, field)}")
        lo, hi = self.tail_share
        if not 0.0 < lo <= hi < 1.0:
            raise InputError(f"tail_share must be 0 < low <= high < 1, got {self.tail_share}")
        if min(self.overconfidence) <= 0 or self.zipf_exponent <= 0:
            raise InputError("overconfidence and zipf_exponent must be > 0")

    @property
    def margins(self) -> np.ndarray:
        """alpha_k per exit: the agreement margin rises linearly with depth (the last one a step further)."""
        k = self.n_exits
        a = np.linspace(self.agreement[0], self.agreement[1], k - 1)
        return np.append(a, self.agreement[1] + 1.0)

    @property
    def temperatures(self) -> np.ndarray:
        """T_k per exit: the slope of the confidence logit (> 1: over-confident)."""
        return np.linspace(self.overconfidence[0], self.overconfidence[1], self.n_exits)

    def segment_levels(self, name: str) -> tuple[str, ...]:
        """Level names of segment column ``name`` (``name_0`` ...), in generation order."""
        return tuple(f"{name}_{j}" for j in range(dict(self.segments)[name]))

    def card(self) -> ModelCard:
        """The model card of these logs (see :func:`synthetic_token_card`)."""
        return synthetic_token_card(self.n_exits, self.vocab_size, segments=self.segments, model=self.model)

    def sample(self, n_sequences: int, seq_len: int, seed: int = 0) -> TokenLogs:
        """``n_sequences`` x ``seq_len`` tokens of logs; deterministic in (self, n_sequences, seq_len, seed)."""
        if n_sequences < 1 or seq_len < 1:
            raise InputError(f"n_sequences and seq_len must be >= 1, got {n_sequences} and {seq_len}")
        n, k_exits, top = n_sequences * seq_len, self.n_exits, self.top_k
        values = np.empty((n, k_exits, top), dtype=np.float32)
        indices = np.empty((n, k_exits, top), dtype=np.int32)
        lse = np.empty((n, k_exits), dtype=np.float32)
        labels = np.empty(n, dtype=np.int64)
        seq_codes = {name: np.empty(n_sequences, dtype=np.int64) for name, _ in self.segments}
        per_chunk = max(1, CHUNK_TOKENS // seq_len)
        for chunk, first in enumerate(range(0, n_sequences, per_chunk)):
            stop = min(n_sequences, first + per_chunk)
            rows = slice(first * seq_len, stop * seq_len)
            seg = _chunk(self, seed, chunk, stop - first, seq_len, values[rows], indices[rows], lse[rows],
                         labels[rows])
            for name, codes in seg.items():
                seq_codes[name][first:stop] = codes
        segments = {}
        for name, _ in self.segments:
            levels = self.segment_levels(name)
            order = sorted(range(len(levels)), key=lambda j: levels[j])
            rank = np.empty(len(levels), dtype=np.int32)
            rank[order] = np.arange(len(levels), dtype=np.int32)
            codes = np.repeat(rank[seq_codes[name]], seq_len)
            segments[name] = SegmentColumn(codes=codes, levels=tuple(levels[j] for j in order))
        positions = np.tile(np.arange(seq_len, dtype=np.int64), n_sequences)
        ts = None
        if self.with_ts:
            micros = np.repeat(np.arange(n_sequences, dtype=np.int64) * 1_000_000, seq_len) + positions * 20_000
            ts = _TS_START + micros.astype("timedelta64[us]")
        return TokenLogs(
            values=values, indices=indices, lse=lse, card=self.card(),
            groups=np.repeat(np.arange(n_sequences, dtype=np.int64), seq_len),
            group_levels=np.arange(n_sequences, dtype=np.int64), positions=positions, labels=labels,
            segments=segments, ts=ts,
            source=f"synthetic_tokens(n_sequences={n_sequences}, seq_len={seq_len}, seed={seed})",
        )


def synthetic_token_card(
    n_exits: int = 12,
    vocab_size: int = 32000,
    *,
    segments: tuple[tuple[str, int], ...] = (("domain", 4),),
    model: str = "synthetic-lm",
) -> ModelCard:
    """A token-level model card: exits ``layer1`` .. ``layerK`` with cumulative costs 1..K, ``vocab_size``,
    groups in ``sequence_id``, positions in ``position``, labels in ``label``."""
    return ModelCard(
        model=model,
        exits=tuple(ExitSpec(name=f"layer{k + 1}", cost=float(k + 1)) for k in range(n_exits)),
        segment_columns=tuple(name for name, _ in segments),
        vocab_size=vocab_size,
        group_column="sequence_id",
        position_column="position",
    )


def synthetic_token_logs(
    n_sequences: int,
    seq_len: int,
    *,
    n_exits: int = 12,
    vocab_size: int = 32000,
    top_k: int = 32,
    seed: int = 0,
    segments: tuple[tuple[str, int], ...] = (("domain", 4),),
    **params: Any,
) -> TokenLogs:
    """Synthetic token logs from :class:`TokenSpec`: ``n_sequences * seq_len`` tokens, rows in sequence order.

    ``params`` are the other :class:`TokenSpec` fields (``label_agreement=0.6``,
    ``overconfidence=(2.0, 1.5)``, ``sequence_share``, ...). Another ``seed`` draws fresh
    traffic from the same distribution; pass ``segments=()`` for no segment column.
    """
    spec = TokenSpec(n_exits=n_exits, vocab_size=vocab_size, top_k=top_k, segments=tuple(segments), **params)
    return spec.sample(n_sequences, seq_len, seed=seed)


# ---------------------------------------------------------------------- internals


@functools.lru_cache(maxsize=8)
def _vocabulary(vocab_size: int, exponent: float) -> tuple[np.ndarray, np.ndarray]:
    """(Zipf CDF over frequency ranks, rank -> token id permutation), fixed for a vocabulary."""
    weights = np.arange(1, vocab_size + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    perm = np.random.default_rng(_PERMUTATION_SEED).permutation(vocab_size).astype(np.int32)
    return cdf, perm


def _segment_cdf(levels: int) -> np.ndarray:
    """Segment level probabilities w_j ∝ (j + 1)^(-1/2), cumulated (the last entry exactly 1)."""
    w = 1.0 / np.sqrt(np.arange(1, levels + 1))
    cum = np.cumsum(w / w.sum())
    cum[-1] = 1.0
    return cum


def _confidence(spec: TokenSpec, observed: np.ndarray) -> np.ndarray:
    """The top probability: the posterior P(agree | observed margin), made over-confident.

    With d's segment mixture approximated by a normal, M ~ N(m0_k, v) and O = M + s o, so
    P(M > 0 | O) = Phi(z), z = (m0 + g (O - m0)) / sqrt(g s^2), g = v / (v + s^2); the confidence is
    sigmoid(T_k logit(Phi(z)) + bias): temperature T_k > 1 and a positive bias over-state it.
    """
    beta, s = spec.difficulty_weight, spec.confidence_noise
    mean_shift = var_shift = 0.0
    if spec.segments and spec.segments[0][1] > 1:
        cdf = _segment_cdf(spec.segments[0][1])
        w = 1.0 - cdf[-2]  # probability of the hard (last) level
        mean_shift, var_shift = spec.hard_shift * w, spec.hard_shift**2 * w * (1.0 - w)
    v = beta**2 * (1.0 + var_shift) + 1.0
    m0 = (spec.margins - beta * mean_shift)[None, :]
    g = v / (v + s**2)
    z = (m0 + g * (observed - m0)) / np.sqrt(g * s**2) if s > 0 else np.where(observed > 0, 40.0, -40.0)
    logit = log_ndtr(z) - log_ndtr(-z)
    return expit(spec.temperatures[None, :] * logit + spec.confidence_bias)


def _zipf(rng: np.random.Generator, cdf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, rng.random(shape), side="right"), len(cdf) - 1).astype(np.int32)


def _other(rng: np.random.Generator, cdf: np.ndarray, avoid: np.ndarray) -> np.ndarray:
    """A Zipf-drawn rank per entry of ``avoid``, never equal to it."""
    r = _zipf(rng, cdf, avoid.shape)
    return np.where(r == avoid, (r + 1) % len(cdf), r).astype(np.int32)


def _chunk(
    spec: TokenSpec, seed: int, chunk: int, n_seq: int, seq_len: int,
    values: np.ndarray, indices: np.ndarray, lse: np.ndarray, labels: np.ndarray,
) -> dict[str, np.ndarray]:
    """Fill one chunk of whole sequences in place; return the per-sequence segment codes.

    Every kind of draw has its own stream, drawn in row order: a chunk's first rows do not depend
    on how many rows it has (so the first sequences do not depend on ``n_sequences``).
    """
    def rng(stream: str) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(chunk, _STREAMS.index(stream))))

    m, k_exits, top = values.shape
    vocab = spec.vocab_size
    cdf, perm = _vocabulary(vocab, spec.zipf_exponent)
    # ---- sequences: segments and the shared difficulty
    seg: dict[str, np.ndarray] = {}
    shift = np.zeros(n_seq)
    uniforms = rng("segments").random((n_seq, max(1, len(spec.segments))))
    for j, (name, levels) in enumerate(spec.segments):
        seg[name] = np.searchsorted(_segment_cdf(levels), uniforms[:, j], side="right")
        if j == 0 and levels > 1:
            shift += spec.hard_shift * (seg[name] == levels - 1)
    c = spec.sequence_share
    d = np.repeat(np.sqrt(c) * rng("sequence").standard_normal(n_seq) + shift, seq_len)
    d += np.sqrt(1.0 - c) * rng("token").standard_normal(m)
    # ---- answers, agreement and confidence per (token, exit)
    answer = _zipf(rng("answer"), cdf, (m,))
    rho = spec.noise_corr
    noise = np.sqrt(rho) * rng("shared").standard_normal((m, 1))
    noise = noise + np.sqrt(1.0 - rho) * rng("exit").standard_normal((m, k_exits))
    margin = spec.margins[None, :] - spec.difficulty_weight * d[:, None] + noise
    agree = margin > 0
    agree[:, -1] = True
    observed = margin + spec.confidence_noise * rng("observe").standard_normal((m, k_exits))
    top_p = np.clip(_confidence(spec, observed), 0.02, 0.995)
    other = _other(rng("other"), cdf, np.broadcast_to(answer[:, None], (m, k_exits)))
    pred = np.where(agree, answer[:, None], other)
    # ---- probabilities (per row and exit, float64): the top one, the geometric rest of the top-k, the tail
    _fill_values(spec, rng, top_p, values, lse)
    # ---- ids: prediction first, then distractors of increasing frequency rank, the answer among them
    ranks = np.empty((m, k_exits, top), dtype=np.int32)
    ranks[:, :, 0] = pred
    if top > 1:
        start = np.floor(rng("start").exponential(3.0, (m, k_exits))).astype(np.float32)
        spread = rng("spread").uniform(0.5, 4.0, (m, k_exits)).astype(np.float32)
        steps = np.arange(top - 1, dtype=np.float32)
        distract = ranks[:, :, 1:]
        pattern = spread[:, :, None] * steps**1.5
        pattern += start[:, :, None]
        np.floor(pattern, out=pattern)
        np.minimum(pattern, np.float32(vocab - top), out=pattern)
        pattern += steps  # strictly increasing, in [0, V - 2]
        distract[...] = pattern
        distract += distract >= pred[:, :, None]  # skip the prediction: distinct ranks in [0, V)
        place = ~agree & (rng("place").random((m, k_exits)) < spec.answer_in_topk)
        slot = 1 + np.minimum(np.floor(rng("slot").exponential(1.5, (m, k_exits))), top - 2).astype(np.int64)
        i, k = np.nonzero(place)
        present = (distract[i, k] == answer[i, None]).any(axis=-1)
        i, k = i[~present], k[~present]
        ranks[i, k, slot[i, k]] = answer[i]
    indices[...] = perm[ranks]  # (fancy indexing: np.take with out= is ~10x slower here)
    # ---- labels: the true next token
    keep = rng("label").random(m) < spec.label_agreement
    labels[...] = perm[np.where(keep, answer, _other(rng("label_other"), cdf, answer))]
    return seg


def _fill_values(
    spec: TokenSpec, rng: Callable[[str], np.random.Generator], top_p: np.ndarray, values: np.ndarray, lse: np.ndarray
) -> None:
    """Top-k logits and lse of every (row, exit) from the top probability ``top_p`` (m, K).

    p_2 = u top_p and p_j = p_2 r^((j-2)/(k-2)) (r = p_k / p_2), scaled down so the top-k leave the
    tail at least a ``tail_share`` of 1 - top_p; the tail is capped at (V - k) p_k (no tail token
    above the k-th) and everything is renormalised. Per element only ``base + step * j`` (float32).
    """
    m, k_exits, top = values.shape
    vocab = spec.vocab_size
    lo, hi = spec.tail_share
    budget = (1.0 - top_p) * (1.0 - rng("tail").uniform(lo, hi, (m, k_exits)))  # for the top-k after the first
    if top > 1:
        p2 = top_p * rng("second").uniform(0.1, 1.0, (m, k_exits))
        ratio = rng("ratio").uniform(np.log(0.03), np.log(0.5), (m, k_exits))  # log(p_k / p_2)
        step = ratio / max(1, top - 2)  # < 0: log p_{j+1} - log p_j
        rest = p2 * (np.expm1(step * (top - 1)) / np.expm1(step))  # p_2 (1 - q^(k-1)) / (1 - q), q = e^step
        scale = np.minimum(1.0, budget / rest)
        p2 *= scale
        rest *= scale
        last = p2 * np.exp(step * (top - 2))
    else:
        p2 = step = rest = np.zeros_like(top_p)
        last = top_p
    tail = np.minimum(1.0 - top_p - rest, (vocab - top) * last)
    total = top_p + rest + tail
    offset = 14.0 + 3.0 * rng("offset").standard_normal((m, k_exits))  # lse: the logits' scale varies by row
    values[:, :, 0] = offset + np.log(top_p / total)
    if top > 1:
        np.multiply(step.astype(np.float32)[:, :, None], np.arange(top - 1, dtype=np.float32), out=values[:, :, 1:])
        values[:, :, 1:] += (offset + np.log(p2 / total)).astype(np.float32)[:, :, None]
    lse[...] = offset
