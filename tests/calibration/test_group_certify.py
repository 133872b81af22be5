"""Certification over groups: the Hoeffding-Bentkus p-value and bound, and why dependent tokens need it.

The simulations of issue 13 ("what must show"): tokens of one sequence share the sequence's
difficulty. A test that treats the tokens as i.i.d. rows certifies a risk above eps far more
often than delta; the test over groups keeps the rate at most delta. Run with ``-s`` to see the
measured violation rates.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq
from scipy.special import betaln
from scipy.stats import binom

from exitwise.calibration.certify import (
    ALL,
    BOUND_HB,
    Certification,
    Constraint,
    binomial_p_value,
    check_constraints,
    fixed_sequence,
    guarantee_segments,
    hb_critical_mean,
    hb_p_value,
    hb_upper_bound,
    min_groups,
    upper_bound,
)
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.groups import GroupIndex, group_losses

# ---------------------------------------------------------------- the Hoeffding-Bentkus p-value


def _hb_reference(mean: float, n: int, eps: float) -> float:
    """Bates et al. (2021), written out independently: min(Hoeffding, Bentkus, 1)."""
    a = min(mean, eps)
    h1 = (a * math.log(a / eps) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - eps))
    s = n * mean
    k = round(s) if abs(s - round(s)) < 1e-9 else math.ceil(s)
    bentkus = math.e * float(binom.pmf(np.arange(k + 1), n, eps).sum())
    return min(math.exp(-n * h1), bentkus, 1.0)


def test_hb_p_value_by_hand():
    # n = 100, mean 0.01, eps 0.05: h1 = 0.01 ln 0.2 + 0.99 ln(0.99 / 0.95) = 0.024736, Hoeffding
    # exp(-2.4736) = 0.0843; Bentkus e * (0.95^100 + 100 * 0.05 * 0.95^99) = e * 0.037081 = 0.1008
    assert hb_p_value(0.01, 100, 0.05) == pytest.approx(0.0843, abs=5e-5)
    # mean 0: the Hoeffding term is exactly (1 - eps)^n, the Bentkus term e times that
    assert hb_p_value(0.0, 100, 0.05) == pytest.approx(0.95**100, rel=1e-12)
    assert hb_p_value(0.0, 0, 0.05) == 1.0 and hb_upper_bound(0.0, 0, 0.05) is None
    assert hb_p_value(0.3, 50, 0.2) == 1.0  # a mean at or above eps never rejects
    assert hb_upper_bound(1.0, 10, 0.1) == 1.0


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 3000), frac=st.floats(0, 1), on_grid=st.booleans(), eps=st.floats(0.001, 0.999))
def test_hb_p_value_matches_the_formula(n, frac, on_grid, eps):
    mean = math.floor(frac * n) / n if on_grid else frac  # k / n (0/1 data) or any mean in [0, 1]
    assert hb_p_value(mean, n, eps) == pytest.approx(_hb_reference(mean, n, eps), rel=1e-7, abs=1e-300)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 5000), m1=st.floats(0, 1), m2=st.floats(0, 1), e1=st.floats(0.001, 0.999),
       e2=st.floats(0.001, 0.999))
def test_hb_p_value_is_monotone_in_mean_and_eps(n, m1, m2, e1, e2):
    lo_m, hi_m = sorted((m1, m2))
    lo_e, hi_e = sorted((e1, e2))
    p = hb_p_value(lo_m, n, lo_e)
    assert 0.0 <= p <= 1.0
    assert p <= hb_p_value(hi_m, n, lo_e) + 1e-12  # more loss: less evidence that the risk is small
    assert hb_p_value(lo_m, n, hi_e) <= p + 1e-12  # a looser budget: easier to certify
    if lo_m >= lo_e:
        assert p == 1.0
    else:  # never weaker than plain Hoeffding, exp(-2 n (eps - mean)^2) (Pinsker: h1 >= 2 (a - b)^2)
        assert p <= math.exp(-2 * n * (lo_e - lo_m) ** 2) * (1 + 1e-9)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 20_000), mean=st.floats(0, 1), delta=st.floats(0.001, 0.5), eps=st.floats(0.001, 0.999))
def test_the_hb_bound_inverts_the_p_value(n, mean, delta, eps):
    ub = hb_upper_bound(mean, n, delta)
    assert mean <= ub <= 1.0
    p = hb_p_value(mean, n, eps)
    if abs(ub - eps) > 1e-7:
        assert (p <= delta) == (ub <= eps)
    if ub < 1.0:
        assert hb_p_value(mean, n, ub) <= delta < hb_p_value(mean, n, max(ub - 1e-7, 1e-9))


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), frac=st.floats(0, 1), eps=st.floats(0.001, 0.999), delta=st.floats(0.001, 0.5))
def test_on_zero_one_data_hb_is_never_below_the_exact_binomial(n, frac, eps, delta):
    """Chernoff's bound and e * cdf both dominate the binomial cdf: HB pays for not assuming 0/1 losses."""
    k = int(frac * n)
    assert hb_p_value(k / n, n, eps) >= binomial_p_value(k, n, eps) * (1 - 1e-9)
    assert hb_upper_bound(k / n, n, delta) >= upper_bound(k, n, delta) - 1e-9


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 50_000), eps=st.floats(0.001, 0.5), delta=st.floats(0.001, 0.5))
def test_the_critical_mean_is_the_largest_mean_that_passes(n, eps, delta):
    crit = hb_critical_mean(n, eps, delta)
    if n < min_groups(eps, delta):
        assert crit is None
        return
    assert 0.0 <= crit < eps
    assert hb_p_value(crit, n, eps) <= delta < hb_p_value(min(crit + 1e-9, 1.0), n, eps)


def test_fewest_groups_to_certify_with_zero_loss():
    for eps, delta, expected in ((0.01, 0.05, 299), (0.05, 0.1, 45), (0.1, 0.05, 29)):
        m = min_groups(eps, delta)
        assert m == expected  # ceil(log delta / log(1 - eps)): 0.99^299 = 0.0495, 0.95^45 = 0.0994, 0.9^29 = 0.047
        assert hb_p_value(0.0, m, eps) <= delta < hb_p_value(0.0, m - 1, eps)


def test_bad_hb_input_is_named():
    with pytest.raises(InputError, match="risk budget"):
        hb_p_value(0.1, 10, 1.0)
    with pytest.raises(InputError, match=r"mean loss must lie in \[0, 1\]"):
        hb_p_value(1.5, 10, 0.1)
    with pytest.raises(InputError, match=r"mean loss must lie in \[0, 1\]"):
        hb_p_value(float("nan"), 10, 0.1)
    with pytest.raises(InputError, match="delta"):
        hb_upper_bound(0.1, 10, 0.0)
    con = [Constraint(ALL, 0.1, np.arange(3))]
    with pytest.raises(InputError, match=r"per-group losses must lie in \[0, 1\]; group 1"):
        check_constraints(np.array([0.0, -0.5, 0.2]), con, 0.1)


@pytest.mark.parametrize(("n", "eps", "conc"), [
    (30, 0.2, None),      # Bernoulli(eps) groups: the Bentkus term's worst case
    (100, 0.1, 0.05),     # nearly 0/1 group means
    (400, 0.05, 2.0),
    (2000, 0.02, 0.3),    # many groups, most near 0
])
def test_hb_is_valid_when_the_true_mean_is_eps(n, eps, conc):
    """P(p_HB <= delta) <= delta for group means in [0, 1] whose true mean is exactly eps."""
    delta, reps = 0.1, 3000
    rng = np.random.default_rng(n)
    if conc is None:
        means = rng.binomial(n, eps, reps) / n
    else:
        means = rng.beta(eps * conc, (1 - eps) * conc, (reps, n)).mean(axis=1)
    rejected = sum(hb_p_value(float(m), n, eps) <= delta for m in means)
    # power: the same groups with a third of the risk are certified most of the time
    low = rng.binomial(n, eps / 3, 300) / n if conc is None else \
        rng.beta(eps / 3 * conc, (1 - eps / 3) * conc, (300, n)).mean(axis=1)
    power = np.mean([hb_p_value(float(m), n, eps) <= delta for m in low])
    print(f"\nHB at mean = eps (n={n}, eps={eps}, concentration={conc}): rejected {rejected / reps:.4f} "
          f"(delta {delta}); at eps / 3: {power:.3f}")
    assert rejected <= binom.ppf(0.999, reps, delta)
    assert power > 0.3


def test_float_losses_report_the_hb_bound_and_bool_losses_are_unchanged():
    idx = np.arange(400)
    cons = [Constraint(ALL, 0.1, idx), Constraint("half", 0.1, idx[:200])]
    means = np.zeros(400)
    means[:40] = 0.25  # 40 groups with a quarter of their tokens lost: mean 0.025 overall, 0.05 in "half"
    step = check_constraints(means, cons, 0.05, index=3)
    res = step.result(ALL)
    assert res.bound == BOUND_HB and res.n == 400 and res.losses == 40 and res.risk == pytest.approx(0.025)
    assert res.p_value == pytest.approx(_hb_reference(0.025, 400, 0.1), rel=1e-9) and res.passed
    assert res.to_json() == {"eps": 0.1, "n": 400, "upper_bound": res.upper_bound, "certified": True,
                             "bound": "hoeffding-bentkus"}
    assert step.result("half").risk == pytest.approx(0.05) and step.index == 3
    bits = means > 0
    old = check_constraints(bits, cons, 0.05).result(ALL)  # "some token lost": 40 of 400 = eps, no pass
    assert old.to_json() == {"eps": 0.1, "n": 400, "upper_bound": upper_bound(40, 400, 0.05), "certified": False}
    assert old.losses == 40 and old.risk == 0.1 and old.p_value == binomial_p_value(40, 400, 0.1)
    ints = check_constraints(bits.astype(np.int64), cons, 0.05).result(ALL)  # integer 0/1: still binomial
    assert ints == old
    cert = fixed_sequence(lambda j: np.minimum(means * (j + 1), 1.0), 10, cons, 0.05)
    failed = Certification(chosen=None, steps=cert.steps[:1], delta=0.05, constraints=cert.constraints)
    segs = guarantee_segments(failed, cons, {"tiny": (0.1, 12)}, bound=BOUND_HB)
    assert segs["tiny"] == {"eps": 0.1, "n": 12, "upper_bound": None, "certified": False, "bound": "hoeffding-bentkus"}
    assert segs[ALL]["bound"] == "hoeffding-bentkus" and segs[ALL]["upper_bound"] is None
    assert "bound" not in guarantee_segments(failed, cons, {"tiny": (0.1, 12)})["tiny"]
    assert guarantee_segments(cert, cons, {})[ALL] == cert.chosen_step.result(ALL).to_json()


# ---------------------------------------------------------------- dependent tokens: what must show

G, L, REPS, EPS, DELTA = 1000, 50, 400, 0.05, 0.05
TOKEN_ROWS = np.repeat(np.arange(G), L)  # sequence g owns tokens g*L .. g*L + L - 1


def _difficulty(rng: np.random.Generator, mean: float, conc: float) -> np.ndarray:
    """Per-sequence token loss probability p_g ~ Beta: most sequences easy (p ~ 0), a few hard."""
    return rng.beta(mean * conc, (1 - mean) * conc, G)


def _tokens(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    """Token losses, i.i.d. Bernoulli(p_g) given the sequence's difficulty; (G * L,) bool."""
    return (rng.random((G, L)) < p[:, None]).reshape(-1)


def _ceiling(rate: float) -> int:
    """The most violations in REPS repeats consistent (at 0.999) with a violation rate of ``rate``."""
    return int(binom.ppf(0.999, REPS, rate))


def test_dependent_tokens_break_the_token_test_and_not_the_group_test():
    """True mean token risk 0.052 > eps = 0.05: every certification is a false claim."""
    index = GroupIndex.from_values(TOKEN_ROWS)
    on_tokens = [Constraint(ALL, EPS, np.arange(G * L))]
    on_groups = [Constraint(ALL, EPS, np.arange(G))]
    rng = np.random.default_rng(13)
    token_false = group_false = group_power = 0
    for _ in range(REPS):
        loss = _tokens(rng, _difficulty(rng, 0.052, 0.5))
        token_false += check_constraints(loss, on_tokens, DELTA).passed
        group_false += check_constraints(group_losses(index, loss, "disagreement"), on_groups, DELTA).passed
        easy = _tokens(rng, _difficulty(rng, 0.02, 0.5))  # true risk 0.02: a true claim
        group_power += check_constraints(group_losses(index, easy, "induced_error"), on_groups, DELTA).passed
    print(f"\ndisagreement, true risk 0.052 > eps {EPS}, delta {DELTA}, {G} sequences x {L} tokens, {REPS} repeats: "
          f"token-iid test certifies {token_false / REPS:.4f}, group HB test {group_false / REPS:.4f}; "
          f"group test at true risk 0.02 certifies {group_power / REPS:.4f}")
    assert token_false > _ceiling(3 * DELTA)
    assert group_false <= _ceiling(DELTA)
    assert group_power > 0.9 * REPS  # the group test is valid without being blind


def _seq_mean(q: float, conc: float) -> float:
    """The mean token risk m whose Beta(m c, (1 - m) c) difficulty gives P(some token of L lost) = q."""
    def any_loss(m: float) -> float:
        a, b = m * conc, (1 - m) * conc
        return 1.0 - math.exp(betaln(a, b + L) - betaln(a, b))  # 1 - E[(1 - p)^L]
    return brentq(lambda m: any_loss(m) - q, 1e-6, 0.5, xtol=1e-12)


def test_sequence_disagreement_is_an_exact_binomial_over_sequences():
    """True share of sequences with a disagreement 0.105 > eps = 0.1: violations <= delta."""
    eps, q = 0.1, 0.105
    m = _seq_mean(q, 0.5)
    index = GroupIndex.from_values(TOKEN_ROWS)
    on_groups = [Constraint(ALL, eps, np.arange(G))]
    rng = np.random.default_rng(14)
    false_claims = 0
    for _ in range(REPS):
        any_loss = group_losses(index, _tokens(rng, _difficulty(rng, m, 0.5)), "sequence_disagreement")
        false_claims += check_constraints(any_loss, on_groups, DELTA).passed
    k_crit = max(k for k in range(G) if binom.cdf(k, G, eps) <= DELTA)
    expected = binom.cdf(k_crit, G, q)  # the exact chance of a false claim under i.i.d. sequences
    print(f"\nsequence_disagreement, true 0.105 > eps {eps}: certifies {false_claims / REPS:.4f} "
          f"(exact {expected:.4f}, delta {DELTA})")
    assert false_claims <= _ceiling(DELTA)
    assert binom.ppf(0.0005, REPS, expected) <= false_claims <= binom.ppf(0.9995, REPS, expected)


def test_fixed_sequence_over_a_path_keeps_the_family_wise_rate_only_over_groups():
    """Five candidates, safe to aggressive, true risks 0.0105 .. 0.07 crossing eps = 0.05 at the 4th.

    Candidate j loses a token when U < s_j p_g (one uniform U per token, shared: nested losses).
    A violation is choosing a candidate whose true risk exceeds eps.
    """
    scale = np.array([0.15, 0.35, 0.55, 0.75, 1.0])
    base = 0.07
    true_risk = scale * base  # E[s_j p_g]
    bad = true_risk > EPS
    assert bad.tolist() == [False, False, False, True, True]
    index = GroupIndex.from_values(TOKEN_ROWS)
    on_tokens = [Constraint(ALL, EPS, np.arange(G * L))]
    on_groups = [Constraint(ALL, EPS, np.arange(G))]
    rng = np.random.default_rng(15)
    token_v = group_v = group_any = 0
    chosen = {"token-iid": [0] * (len(scale) + 1), "groups": [0] * (len(scale) + 1)}  # last: none certified
    for _ in range(REPS):
        p = _difficulty(rng, base, 0.5)
        u = rng.random((G, L))

        def tokens(j: int, p: np.ndarray = p, u: np.ndarray = u) -> np.ndarray:
            return (u < scale[j] * p[:, None]).reshape(-1)

        tok = fixed_sequence(tokens, len(scale), on_tokens, DELTA)
        grp = fixed_sequence(lambda j, tokens=tokens: group_losses(index, tokens(j), "disagreement"),
                             len(scale), on_groups, DELTA)
        token_v += tok.chosen is not None and bad[tok.chosen]
        group_v += grp.chosen is not None and bad[grp.chosen]
        group_any += grp.chosen is not None and grp.chosen >= 1
        chosen["token-iid"][-1 if tok.chosen is None else tok.chosen] += 1
        chosen["groups"][-1 if grp.chosen is None else grp.chosen] += 1
    print(f"\nfixed sequence over 5 candidates (true risks {np.round(true_risk, 4).tolist()}, eps {EPS}): "
          f"family-wise violations token-iid {token_v / REPS:.4f}, groups {group_v / REPS:.4f} (delta {DELTA}); "
          f"groups certify a candidate past the first in {group_any / REPS:.4f}; "
          f"chosen candidate counts 0..4, none: {chosen}")
    assert token_v > _ceiling(DELTA)
    assert group_v <= _ceiling(DELTA)
    assert group_any > 0.9 * REPS
