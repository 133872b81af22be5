"""Synthetic exit logs whose difficulty varies like real traffic, for tests and benchmarks.

Generative model, per sample i (all draws seeded, see below):

* segment values s_i ~ Categorical(w) for each segment column, w_j ∝ (j + 1)^(-1/2);
* true class y_i ~ ``class_prior`` (uniform by default);
* latent difficulty d_i = N(0, 1) + shift(s_i); the last level of the first segment column
  is clearly harder (``hard_shift``), other levels shift by at most ±0.2;
* for exit k with depth t_k = k / (K - 1), the true class gets a margin
  m_ik = a_k - b d_i with a_k rising from ``signal[0]`` to ``signal[1]``, and a fixed
  "confuser" class (y + 1) mod C gets ``confusion`` · a_k · max(d_i, 0) (hard samples look
  like a neighbouring class, even at depth);
* z_ik = m_ik e_y + c_ik e_conf + sqrt(rho) g_i + sqrt(1 - rho) h_ik with g_i, h_ik ~ N(0, I_C):
  the noise g_i shared across exits makes a sample's answers at different depths agree;
* logits_ik = s_k T_k z_ik, where s_k is the NLL-optimal scale of exit k (fitted once on a
  fixed pilot sample) and T_k the exit's **true temperature** (``overconfidence``, > 1 means
  over-confident): temperature scaling should recover T_k;
* the recorded label is y_i, replaced by a uniformly drawn other class with probability
  ``label_noise`` (confidently wrong even at the last exit).

So easy samples are confident at exit 0, most only at depth, and some are wrong everywhere.
Draws come from per-chunk streams ``SeedSequence(seed, spawn_key=(chunk, stream))`` over fixed
chunks of 65536 rows: the output depends on (spec, n, seed) only, and the first m rows of
``sample(n)`` equal ``sample(m)``. Another seed gives an independent draw from the same
distribution ("fresh traffic"). Memory beyond the output is a few chunks.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from exitwise.calibration.logs import ExitLogs, ExitSpec, ModelCard, SegmentColumn

__all__ = ["SyntheticSpec", "synthetic_logs"]

CHUNK_ROWS = 1 << 16
_PILOT_ROWS = 1 << 14
_PILOT_SEED = 20240531
_TS_START = np.datetime64("2024-01-01T00:00:00", "us")
_STREAMS = ("segments", "labels", "difficulty", "shared", "exit", "noise", "ts")


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of the synthetic traffic distribution (see the module docstring)."""

    n_exits: int = 4
    n_classes: int = 10
    segments: tuple[tuple[str, int], ...] = (("region", 4),)
    class_prior: tuple[float, ...] | None = None
    signal: tuple[float, float] = (2.0, 5.5)
    difficulty_scale: float = 1.4
    hard_shift: float = 1.0
    confusion: float = 0.35
    noise_corr: float = 0.6
    overconfidence: tuple[float, float] = (2.0, 1.15)
    label_noise: float = 0.02
    model: str = "synthetic"
    with_ts: bool = True

    def __post_init__(self) -> None:
        if self.n_exits < 2:
            raise ValueError(f"n_exits must be >= 2, got {self.n_exits}")
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {self.n_classes}")
        for name, levels in self.segments:
            if not name or levels < 1:
                raise ValueError(f"segment {name!r} needs a name and >= 1 levels, got {levels}")
        if self.class_prior is not None:
            prior = np.asarray(self.class_prior, dtype=np.float64)
            if prior.shape != (self.n_classes,) or (prior < 0).any() or prior.sum() <= 0:
                raise ValueError(f"class_prior must be {self.n_classes} non-negative weights, got {self.class_prior}")
        if not 0.0 <= self.noise_corr < 1.0:
            raise ValueError(f"noise_corr must be in [0, 1), got {self.noise_corr}")
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise}")
        if min(self.overconfidence) <= 0:
            raise ValueError(f"overconfidence must be > 0, got {self.overconfidence}")

    # ------------------------------------------------------------------ the distribution

    @property
    def depth(self) -> np.ndarray:
        """t_k = k / (K - 1) for each exit."""
        return np.linspace(0.0, 1.0, self.n_exits)

    @property
    def true_temperatures(self) -> np.ndarray:
        """T_k per exit: the temperature that calibrates exit k (over-confident early exits)."""
        return self.overconfidence[0] + (self.overconfidence[1] - self.overconfidence[0]) * self.depth

    @property
    def class_probabilities(self) -> np.ndarray:
        """Ground-truth distribution of the true class y (before label noise), shape (C,)."""
        if self.class_prior is None:
            return np.full(self.n_classes, 1.0 / self.n_classes)
        prior = np.asarray(self.class_prior, dtype=np.float64)
        return prior / prior.sum()

    def segment_levels(self, name: str) -> tuple[str, ...]:
        levels = dict(self.segments)[name]
        return tuple(f"{name}_{j}" for j in range(levels))

    def segment_probabilities(self, name: str) -> dict[str, float]:
        """Ground-truth distribution of a segment column's values."""
        weights = _segment_weights(dict(self.segments)[name])
        return dict(zip(self.segment_levels(name), weights.tolist(), strict=True))

    @property
    def hard_segment(self) -> tuple[str, str] | None:
        """(column, value) of the clearly harder segment, or None without segments."""
        if not self.segments:
            return None
        name = self.segments[0][0]
        return name, self.segment_levels(name)[-1]

    def segment_shifts(self, name: str) -> np.ndarray:
        """Latent-difficulty shift of each level of segment column ``name``."""
        position = [s[0] for s in self.segments].index(name)
        levels = dict(self.segments)[name]
        if levels == 1:
            return np.zeros(1)
        if position == 0:
            shifts = np.linspace(-0.2, 0.2, levels - 1) if levels > 2 else np.zeros(1)
            return np.append(shifts, self.hard_shift)
        return np.linspace(-0.15, 0.15, levels)

    def costs(self) -> np.ndarray:
        """Cumulative cost per exit: backbone stages growing slightly with depth plus one head each."""
        k = np.arange(1, self.n_exits + 1, dtype=np.float64)
        backbone = 1.0e6 * k**1.1
        heads = 0.05e6 * k
        return np.round(backbone + heads, 0)

    def card(self) -> ModelCard:
        return ModelCard(
            model=self.model,
            exits=tuple(ExitSpec(name=f"stage{k + 1}", cost=float(c)) for k, c in enumerate(self.costs())),
            classes=tuple(f"class{j}" for j in range(self.n_classes)),
            segment_columns=tuple(name for name, _ in self.segments),
        )

    # ------------------------------------------------------------------ sampling

    def sample(self, n: int, seed: int = 0) -> ExitLogs:
        """n samples of synthetic exit logs (dense float32 (n, K, C)); deterministic in (self, n, seed)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        k_total, c = self.n_exits, self.n_classes
        scale = (_pilot_scales(self) * self.true_temperatures).astype(np.float32)
        logits = np.empty((n, k_total, c), dtype=np.float32)
        labels = np.empty(n, dtype=np.int64)
        codes = {name: np.empty(n, dtype=np.int32) for name, _ in self.segments}
        ts = np.empty(n, dtype="datetime64[us]") if self.with_ts else None
        for chunk, start in enumerate(range(0, n, CHUNK_ROWS)):
            stop = min(n, start + CHUNK_ROWS)
            out = logits[start:stop]
            y, seg = _latent_chunk(self, seed, chunk, out)
            out *= scale[None, :, None]
            labels[start:stop] = y
            for name in codes:
                codes[name][start:stop] = seg[name]
            if ts is not None:
                rng = _rng(seed, chunk, "ts")
                micros = np.arange(start, stop, dtype=np.int64) * 1_000_000 + rng.integers(0, 1_000_000, stop - start)
                ts[start:stop] = _TS_START + micros.astype("timedelta64[us]")
        segments = {
            name: SegmentColumn(codes=codes[name], levels=self.segment_levels(name)) for name, _ in self.segments
        }
        return ExitLogs(
            logits=logits,
            card=self.card(),
            labels=labels,
            segments=segments,
            request_ids=np.arange(n, dtype=np.int64),
            ts=ts,
            source=f"synthetic(n={n}, seed={seed})",
        )


def synthetic_logs(
    n: int,
    n_exits: int = 4,
    n_classes: int = 10,
    *,
    segments: Mapping[str, int] | None = None,
    seed: int = 0,
    **params: object,
) -> ExitLogs:
    """Synthetic exit logs from :class:`SyntheticSpec` (``segments`` defaults to ``{"region": 4}``).

    ``params`` are the other :class:`SyntheticSpec` fields (``overconfidence=(2.0, 1.15)``,
    ``hard_shift``, ``label_noise``, ...). Same arguments with another ``seed`` draw fresh
    data from the same distribution. Pass ``segments={}`` for no segment column.
    """
    seg = {"region": 4} if segments is None else dict(segments)
    spec = SyntheticSpec(
        n_exits=n_exits, n_classes=n_classes, segments=tuple(seg.items()), **params  # type: ignore[arg-type]
    )
    return spec.sample(n, seed=seed)


# ---------------------------------------------------------------------- internals


def _segment_weights(levels: int) -> np.ndarray:
    w = 1.0 / np.sqrt(np.arange(1, levels + 1, dtype=np.float64))
    return w / w.sum()


def _rng(seed: int, chunk: int, stream: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(chunk, _STREAMS.index(stream))))


def _categorical(rng: np.random.Generator, probs: np.ndarray, m: int) -> np.ndarray:
    """Prefix-stable categorical draws (one uniform per row)."""
    cum = np.cumsum(probs)
    cum[-1] = 1.0
    return np.searchsorted(cum, rng.random(m), side="right").astype(np.int32)


def _latent_chunk(
    spec: SyntheticSpec, seed: int, chunk: int, z: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Fill ``z`` (m, K, C) float32 with unscaled logits; return recorded labels (m,) and segment codes."""
    m, c = z.shape[0], z.shape[2]
    rng_seg = _rng(seed, chunk, "segments")
    seg: dict[str, np.ndarray] = {}
    shift = np.zeros(m)
    for name, levels in spec.segments:
        seg[name] = _categorical(rng_seg, _segment_weights(levels), m)
        shift += spec.segment_shifts(name)[seg[name]]
    y = _categorical(_rng(seed, chunk, "labels"), spec.class_probabilities, m).astype(np.int64)
    d = _rng(seed, chunk, "difficulty").standard_normal(m) + shift
    a = spec.signal[0] + (spec.signal[1] - spec.signal[0]) * spec.depth  # (K,)
    margin = a[None, :] - spec.difficulty_scale * d[:, None]  # (m, K)
    confuse = spec.confusion * a[None, :] * np.maximum(d, 0.0)[:, None]  # (m, K)
    rho = spec.noise_corr
    _rng(seed, chunk, "exit").standard_normal(dtype=np.float32, out=z)
    z *= np.float32(np.sqrt(1.0 - rho))
    shared = _rng(seed, chunk, "shared").standard_normal((m, c), dtype=np.float32)
    z += np.float32(np.sqrt(rho)) * shared[:, None, :]
    rows = np.arange(m)
    z[rows, :, y] += margin.astype(np.float32)
    z[rows, :, (y + 1) % c] += confuse.astype(np.float32)
    recorded = y.copy()
    if spec.label_noise > 0:
        rng_noise = _rng(seed, chunk, "noise")
        flip = rng_noise.random(m) < spec.label_noise
        other = rng_noise.integers(1, c, m)
        recorded[flip] = (y[flip] + other[flip]) % c
    return recorded, seg


@functools.lru_cache(maxsize=64)
def _pilot_scales(spec: SyntheticSpec) -> np.ndarray:
    """s_k: the NLL-optimal scale of each exit's z on a fixed pilot sample (same for every seed).

    f(s) = mean_i [logsumexp(s z_i) - s z_iy] is convex in s with f'(s) = E_p[z] - z_y and
    f''(s) = Var_p[z] (p = softmax(s z)), so a damped Newton iteration converges in a few steps.
    """
    z = np.empty((_PILOT_ROWS, spec.n_exits, spec.n_classes), dtype=np.float32)
    y, _ = _latent_chunk(spec, _PILOT_SEED, 0, z)
    rows = np.arange(y.shape[0])
    scales = np.empty(spec.n_exits)
    for k in range(spec.n_exits):
        zk = z[:, k, :].astype(np.float64)
        true = zk[rows, y]
        s = 1.0
        for _ in range(50):
            e = s * zk
            e -= e.max(axis=1, keepdims=True)
            np.exp(e, out=e)
            e /= e.sum(axis=1, keepdims=True)
            mean = (e * zk).sum(axis=1)
            grad = float(np.mean(mean - true))
            hess = float(np.mean((e * zk * zk).sum(axis=1) - mean**2))
            step = grad / max(hess, 1e-12)
            s_new = s - step if s - step > 0 else s / 2.0
            if abs(s_new - s) <= 1e-7 * s:
                s = s_new
                break
            s = s_new
        scales[k] = s
    return scales
