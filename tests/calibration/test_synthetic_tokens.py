"""Synthetic token logs: valid top-k rows, an exact positive tail, seeded, and the traffic properties
the design asks for (dependent tokens within a sequence, agreement rising with depth, informative
but over-confident early exits, Zipf-like answers, labels agreeing with the final exit ~60 %)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chi2, rankdata

from exitwise.calibration.exceptions import InputError
from exitwise.calibration.synthetic_tokens import TokenSpec, synthetic_token_card, synthetic_token_logs
from exitwise.calibration.tokens import TokenLogs


@pytest.fixture(scope="module")
def logs() -> TokenLogs:
    return synthetic_token_logs(300, 40, n_exits=6, vocab_size=32000, top_k=16, seed=11)


def _agreement(logs: TokenLogs) -> np.ndarray:
    """(n, K) bool: the exit's predicted token is the final exit's."""
    return logs.indices[:, :, 0] == logs.indices[:, -1:, 0]


def _tail(logs: TokenLogs) -> np.ndarray:
    """1 - sum of the top-k probabilities, from the stored float32 numbers (float64 arithmetic)."""
    return 1.0 - np.exp(logs.values.astype(np.float64) - logs.lse[:, :, None].astype(np.float64)).sum(axis=-1)


def _assert_valid_rows(logs: TokenLogs) -> None:
    v, ids = logs.values, logs.indices
    assert v.dtype == np.float32 and ids.dtype == np.int32 and logs.lse.dtype == np.float32
    assert np.isfinite(v).all() and np.isfinite(logs.lse).all()
    assert (v[:, :, 1:] <= v[:, :, :-1]).all()
    ordered = np.sort(ids, axis=-1)
    assert not (ordered[:, :, 1:] == ordered[:, :, :-1]).any()
    assert ids.min() >= 0 and ids.max() < logs.vocab_size
    tail = _tail(logs)
    assert (tail > 0).all() and (tail < 1).all()
    # no tail token above the k-th: the tail holds at most V - k times the k-th probability
    # (1e-5: float32 rounding of values and lse moves the stored sum by a few 1e-6 at most)
    kth = np.exp(v[:, :, -1].astype(np.float64) - logs.lse.astype(np.float64))
    assert (tail <= (logs.vocab_size - logs.top_k) * kth + 1e-5).all()


def test_shapes_card_and_valid_rows(logs):
    assert (logs.n, logs.n_exits, logs.top_k, logs.vocab_size) == (12000, 6, 16, 32000)
    card = logs.card
    assert card.token_level and card.group_column == "sequence_id" and card.position_column == "position"
    np.testing.assert_array_equal(card.costs, np.arange(1.0, 7.0))
    assert card == synthetic_token_card(6, 32000)
    np.testing.assert_array_equal(logs.groups, np.repeat(np.arange(300), 40))
    np.testing.assert_array_equal(logs.group_levels, np.arange(300))
    np.testing.assert_array_equal(logs.positions, np.tile(np.arange(40), 300))
    assert logs.labels is not None and logs.labels.dtype == np.int64
    assert logs.labels.min() >= 0 and logs.labels.max() < 32000
    assert list(logs.segments) == ["domain"]
    assert logs.segments["domain"].levels == ("domain_0", "domain_1", "domain_2", "domain_3")
    seg = logs.segments["domain"].codes.reshape(300, 40)
    assert (seg == seg[:, :1]).all()  # a sequence's tokens share its segment
    assert logs.ts is not None and (np.diff(logs.ts.astype(np.int64)) > 0).all()
    _assert_valid_rows(logs)


def test_tail_mass_is_plausible(logs):
    tail = _tail(logs)
    assert tail.min() > 1e-4  # resolvable in float32, far above rounding
    assert 0.001 < np.median(tail) < 0.3
    assert np.quantile(tail, 0.9) > 0.05  # uncertain rows leave real mass outside the top-k


def test_deterministic_by_seed_and_prefix_stable():
    a = synthetic_token_logs(30, 9, n_exits=3, vocab_size=500, top_k=6, seed=5)
    b = synthetic_token_logs(30, 9, n_exits=3, vocab_size=500, top_k=6, seed=5)
    for name in ("values", "indices", "lse", "labels", "positions", "groups"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = synthetic_token_logs(30, 9, n_exits=3, vocab_size=500, top_k=6, seed=6)
    assert not np.array_equal(a.values, c.values)
    assert not np.array_equal(a.indices[:, :, 0], c.indices[:, :, 0])
    big = synthetic_token_logs(2000, 9, n_exits=3, vocab_size=500, top_k=6, seed=5)  # several chunks
    np.testing.assert_array_equal(big.values[: a.n], a.values)
    np.testing.assert_array_equal(big.indices[: a.n], a.indices)


def _dispersion(agree: np.ndarray, seq_len: int) -> float:
    """Variance of the per-sequence disagreement rate over its binomial variance (1 if tokens are independent)."""
    rates = (~agree).reshape(-1, seq_len).mean(axis=1)
    p = rates.mean()
    return float(rates.var(ddof=1) / (p * (1 - p) / seq_len))


def test_tokens_of_a_sequence_are_dependent(logs):
    agree = _agreement(logs)[:, 1]
    ratio = _dispersion(agree, 40)
    # under independence (n_seq - 1) * ratio ~ chi2(n_seq - 1): ratio > 1.5 has p < 1e-9 for 300 sequences
    assert ratio > 1.5 and chi2.sf(299 * ratio, 299) < 1e-9


def test_without_a_sequence_latent_tokens_are_independent():
    flat = synthetic_token_logs(300, 40, n_exits=4, vocab_size=2000, top_k=8, seed=2, segments=(),
                                sequence_share=0.0)
    ratio = _dispersion(_agreement(flat)[:, 1], 40)
    assert 0.7 < ratio < 1.35  # chi2(299)/299 lies in (0.82, 1.2) with probability 0.998


def test_agreement_rises_with_depth_and_confidence_is_informative_but_over_confident(logs):
    agree = _agreement(logs)
    rate = agree.mean(axis=0)
    assert (np.diff(rate) > 0).all() and rate[-1] == 1.0 and rate[0] < 0.6
    conf = np.exp(logs.values[:, :, 0].astype(np.float64) - logs.lse)
    for k in range(logs.n_exits - 1):
        a, c = agree[:, k], conf[:, k]
        ranks = rankdata(c)
        auroc = (ranks[a].sum() - a.sum() * (a.sum() + 1) / 2) / (a.sum() * (~a).sum())
        assert 0.75 < auroc < 0.99
        assert c.mean() > a.mean()  # over-confident on average
        confident = c > 0.8
        assert c[confident].mean() > a[confident].mean() + 0.02  # ... and where it is confident


def test_answers_are_zipf_like_and_labels_agree_sixty_percent(logs):
    final = logs.indices[:, -1, 0]
    _, counts = np.unique(final, return_counts=True)
    top_share = counts.max() / final.size
    expected = 1.0 / (np.arange(1, 32001, dtype=np.float64) ** -1.1).sum()  # P(rank 1) of Zipf(1.1) over 32000
    assert abs(top_share - expected) < 0.02
    assert len(counts) < final.size / 3  # frequent tokens repeat
    agree = (logs.labels == final).mean()
    assert abs(agree - 0.6) < 0.03
    disagree = ~_agreement(logs)[:, 0]
    in_topk = (logs.indices[disagree, 0, :] == final[disagree, None]).any(axis=-1).mean()
    assert 0.75 < in_topk < 0.95  # the final answer is usually among a wrong exit's top-k


def test_hard_domain_disagrees_more(logs):
    early = ~_agreement(logs)[:, 1]
    codes = logs.segments["domain"].codes
    hard = early[codes == 3].mean()
    easy = early[codes == 0].mean()
    assert hard > easy + 0.05


@settings(max_examples=20, deadline=None)
@given(
    n_seq=st.integers(1, 6),
    seq_len=st.integers(1, 12),
    n_exits=st.integers(2, 5),
    vocab=st.integers(2, 3000),
    top_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**20),
)
def test_rows_are_valid_for_any_parameters(n_seq, seq_len, n_exits, vocab, top_frac, seed):
    top = 1 + int(top_frac * (min(vocab - 1, 40) - 1))
    logs = synthetic_token_logs(n_seq, seq_len, n_exits=n_exits, vocab_size=vocab, top_k=top, seed=seed, segments=())
    assert logs.values.shape == (n_seq * seq_len, n_exits, top)
    _assert_valid_rows(logs)
    assert (_agreement(logs)[:, -1]).all()


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"top_k": 32000}, "top_k must be in 1..vocab_size - 1"),
        ({"top_k": 0}, "top_k must be in"),
        ({"n_exits": 1}, "n_exits must be >= 2"),
        ({"vocab_size": 1}, "vocab_size must be in"),
        ({"label_agreement": 1.5}, "label_agreement must be in [0, 1]"),
        ({"tail_share": (0.0, 0.5)}, "tail_share"),
        ({"segments": (("domain", 0),)}, "needs a name and >= 1 levels"),
    ],
)
def test_bad_parameters(kwargs, expected):
    with pytest.raises(InputError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        synthetic_token_logs(2, 3, **kwargs)
    with pytest.raises(InputError, match="n_sequences and seq_len must be >= 1"):
        TokenSpec().sample(0, 5)
