"""Solving on token-level logs: buckets, group splits, group certification, one rule with the runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest

from exitwise.calibration.buckets import encode_bucket_map
from exitwise.calibration.evaluate import ScoredLogs, evaluate
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.logfiles.cards import write_card
from exitwise.calibration.logfiles.readers import load_logs
from exitwise.calibration.logfiles.writers import write_logs
from exitwise.calibration.logs import ExitSpec, ModelCard, SegmentColumn
from exitwise.calibration.pipeline import SolveSpec, prepare, solve
from exitwise.calibration.rule import CompiledPolicy, decide, first_exit
from exitwise.calibration.synthetic import synthetic_logs
from exitwise.calibration.synthetic_tokens import synthetic_token_logs
from exitwise.calibration.tokens import TokenLogs
from exitwise.calibration.topk import dense_topk
from exitwise.policies.authoring import solve_policy
from exitwise.policies.reverify import reverify


@pytest.fixture(scope="module")
def tokens() -> TokenLogs:
    return synthetic_token_logs(1500, 24, n_exits=6, vocab_size=8000, top_k=8, seed=3)


def test_split_never_cuts_a_sequence(tokens: TokenLogs) -> None:
    prep = prepare(tokens, SolveSpec(risk="sequence_disagreement", eps=0.1))
    choose = set(tokens.groups[prep.splits.choose].tolist())
    certify = set(tokens.groups[prep.splits.certify].tolist())
    assert choose and certify and not choose & certify
    assert prep.splits.choose.size + prep.splits.certify.size == tokens.n
    # the thresholds' columns are a handful of token buckets, not the vocabulary
    assert prep.vocabulary is not None and prep.n_columns == 4
    assert sum(prep.vocabulary.tokens) == tokens.vocab_size


@pytest.mark.parametrize("risk", ["disagreement", "sequence_disagreement"])
def test_group_certificate_holds_on_fresh_sequences(tokens: TokenLogs, risk: str) -> None:
    eps = 0.02 if risk == "disagreement" else 0.1
    sol = solve(tokens, SolveSpec(risk=risk, eps=eps, delta=0.05))
    assert sol.certified
    step = sol.certification.chosen_step
    result = step.results[0]
    assert result.n == sol.prepared.cert_groups.n_groups  # one unit per certify sequence
    assert result.upper_bound <= eps
    # the policy saves compute and keeps its promise on traffic it never saw
    fresh = synthetic_token_logs(3000, 24, n_exits=6, vocab_size=8000, top_k=8, seed=99)
    ev = evaluate(sol.policy, fresh, risk=risk, delta=0.05)
    assert ev.compute_fraction < 0.95
    groups = ev.groups
    realised = groups["mean_disagreement"] if risk == "disagreement" else groups["sequence_disagreement"]
    assert realised <= eps


def test_token_document_is_small_and_reverifies(tokens: TokenLogs, tmp_path) -> None:
    path = tmp_path / "tokens.npz"
    write_logs(tokens, path)
    card = write_card(tokens.card, tmp_path / "card.json")
    loaded = load_logs(path, tokens.card)
    outcome = solve_policy(loaded, SolveSpec(risk="sequence_disagreement", eps=0.1), baselines=(),
                           evidence={"logs": str(path), "card": str(card)})
    doc = outcome.document
    assert doc["guarantee"]["unit"] == "group" and doc["guarantee"]["certified"]
    assert doc["guarantee"]["n"] == doc["guarantee"]["groups"]["certify"]
    assert doc["classes"] == ["top50%", "top80%", "top95%", "rest"]
    assert doc["vocabulary"]["size"] == 8000 and doc["vocabulary"]["top_k"] == 8
    assert len(json.dumps(doc)) < 64 * 1024
    assert reverify(doc, roots=[tmp_path]).status == "reverified"
    forged = json.loads(json.dumps(doc))
    forged["guarantee"]["segments"]["__all__"]["upper_bound"] /= 2
    forged["guarantee"]["eps"] = forged["guarantee"]["segments"]["__all__"]["eps"] = \
        forged["guarantee"]["segments"]["__all__"]["upper_bound"]
    assert reverify(forged, roots=[tmp_path]).status == "failed"


def _dense_tokens(n_seq: int, length: int, vocab: int, k: int, seed: int) -> tuple[np.ndarray, TokenLogs]:
    """Dense logits (n, K, V) of a toy LM and the top-k logs taken from them."""
    rng = np.random.default_rng(seed)
    n, k_exits = n_seq * length, 4
    base = rng.standard_normal((n, vocab)) * 2.0
    hot = rng.integers(0, 50, n)
    seq_ease = np.repeat(rng.gamma(2.0, 2.0, n_seq), length)
    dense = np.empty((n, k_exits, vocab), dtype=np.float32)
    for j in range(k_exits):
        z = base + rng.standard_normal((n, vocab)) * (1.5 - 0.3 * j)
        z[np.arange(n), hot] += seq_ease * (j + 1) / 2
        dense[:, j] = z
    values = np.empty((n, k_exits, k), np.float32)
    ids = np.empty((n, k_exits, k), np.int32)
    lse = np.empty((n, k_exits), np.float32)
    for j in range(k_exits):
        v, i, s = dense_topk(dense[:, j].astype(np.float64), k)
        values[:, j], ids[:, j], lse[:, j] = v, i, s
    card = ModelCard(model="toy", exits=tuple(ExitSpec(f"l{j}", float(j + 1)) for j in range(k_exits)),
                     vocab_size=vocab, group_column="sequence_id")
    logs = TokenLogs(values=values, indices=ids, lse=lse, card=card, groups=np.repeat(np.arange(n_seq), length),
                     group_levels=np.arange(n_seq), positions=np.tile(np.arange(length), n_seq))
    return dense, logs


def test_runtime_on_dense_logits_decides_as_the_solver_routed() -> None:
    dense, logs = _dense_tokens(300, 8, 600, 8, seed=1)
    sol = solve(logs, SolveSpec(risk="disagreement", eps=0.1, calibrator="temperature"))
    assert sol.certified
    policy = sol.policy
    assert policy.top_k == 8 and policy.class_bucket is not None
    scored = ScoredLogs.from_logs(logs, policy.calibrators, policy.score)
    routed = first_exit(policy, scored.scores, scored.preds, np.zeros(logs.n, dtype=np.intp)).exit
    pending = np.ones(logs.n, dtype=bool)
    exit_at = np.full(logs.n, logs.n_exits - 1)
    for k in range(logs.n_exits - 1):
        mask = decide(policy, k, dense[:, k]) & pending
        exit_at[mask] = k
        pending &= ~mask
    assert (routed < logs.n_exits - 1).any()
    np.testing.assert_array_equal(exit_at, routed)


def test_group_column_on_classification_logs() -> None:
    logs = synthetic_logs(6000, seed=2)
    users = SegmentColumn.from_values(np.repeat(np.arange(1500), 4).astype(str))
    grouped = type(logs)(logits=logs.logits, card=ModelCard(model=logs.card.model, exits=logs.card.exits,
                                                             segment_columns=(*logs.card.segment_columns, "user")),
                         labels=logs.labels, segments={**logs.segments, "user": users}, source="users")
    sol = solve(grouped, SolveSpec(eps=0.05, group_column="user"))
    assert sol.prepared.cert_groups is not None
    assert sol.certification.steps[0].results[0].n == sol.prepared.cert_groups.n_groups
    users_of = users.codes
    assert not set(users_of[sol.prepared.splits.choose]) & set(users_of[sol.prepared.splits.certify])


def test_group_risks_need_groups_and_known_columns(tokens: TokenLogs) -> None:
    logs = synthetic_logs(2000, seed=0)
    with pytest.raises(InputError, match=r"sequence_disagreement.*--group-column"):
        prepare(logs, SolveSpec(risk="sequence_disagreement"))
    with pytest.raises(InputError, match="--group-column 'nope'"):
        prepare(logs, SolveSpec(group_column="nope"))
    with pytest.raises(InputError, match="token bucket"):
        prepare(tokens, SolveSpec(forbid_classes=("cat",)))
    with pytest.raises(InputError, match="outside the vocabulary"):
        prepare(tokens, SolveSpec(bucket_mapping={"punct": ["0-9", 999999]}))


def test_bucket_mapping_and_forbidden_bucket(tokens: TokenLogs) -> None:
    spec = SolveSpec(eps=0.05, bucket_mapping={"low": ["0-99"], "mid": ["100-999"]}, forbid_classes=("other",))
    sol = solve(tokens, spec)
    assert sol.prepared.vocabulary.names == ("low", "mid", "other")
    assert sol.prepared.vocabulary.tokens == (100, 900, tokens.vocab_size - 1000)
    # tokens of the forbidden bucket never leave early
    scored = sol.prepared.scored
    exits = first_exit(sol.policy, scored.scores, scored.preds, np.zeros(scored.n, dtype=np.intp)).exit
    answer = scored.preds[np.arange(scored.n), exits]
    early = exits < scored.n_exits - 1
    assert early.any() and (answer[early] < 1000).all()
    # the document compiles back to the same rule
    compiled = CompiledPolicy.from_document({
        "exits": [{"calibrator": c} for c in sol.policy.calibrators], "classes": ["low", "mid", "other"],
        "score": "max_prob", "thresholds": {"default": [[None if np.isnan(v) else v for v in row]
                                                        for row in sol.policy.thresholds[0]]},
        "forced_full_depth": {"classes": ["other"]},
        "vocabulary": {"size": tokens.vocab_size, "top_k": tokens.top_k,
                       "bucket_of": encode_bucket_map(sol.prepared.vocabulary.bucket_of)}})
    again = first_exit(compiled, scored.scores, scored.preds, np.zeros(scored.n, dtype=np.intp)).exit
    np.testing.assert_array_equal(again, exits)
