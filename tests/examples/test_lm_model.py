"""The LM example's early-exit decoding (examples/lm/model.py) on a tiny random model.

Float64 so that no argmax is decided by rounding. References are computed without the code
under test's decoding loop: full forward passes over the whole prefix (no cache).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lm_example_model", ROOT / "examples" / "lm" / "model.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look the module up by name
    spec.loader.exec_module(mod)
    return mod


lm = _load()
N_LAYER, VOCAB, PROMPT, NEW, BATCH = 4, 64, 5, 9, 6


@pytest.fixture(scope="module")
def model() -> lm.ExitLM:
    torch.manual_seed(0)
    m = lm.ExitLM(lm.LMConfig(vocab_size=VOCAB, n_layer=N_LAYER, d_model=32, n_head=2, context=32)).double()
    with torch.no_grad():  # larger weights than the init so the exits disagree with each other
        for p in m.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    return m.eval()


@pytest.fixture(scope="module")
def prompts() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))


def never(layer: int, logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros(logits.shape[0], dtype=torch.bool)


def always(layer: int, logits: torch.Tensor) -> torch.Tensor:
    return torch.ones(logits.shape[0], dtype=torch.bool)


def test_never_exiting_is_full_depth_greedy(model: lm.ExitLM, prompts: torch.Tensor) -> None:
    out, stats = lm.generate_early_exit(model, prompts, NEW, never)
    reference = lm.greedy_generate_nocache(model, prompts, NEW)
    assert torch.equal(out, reference)
    assert torch.equal(out, lm.greedy_generate(model, prompts, NEW))
    assert (stats.exit_layer == N_LAYER - 1).all()
    assert stats.compute_fraction == 1.0
    assert int(stats.backfill_blocks.sum()) == 0


def test_exit_at_first_layer_backfills_every_layers_cache(model: lm.ExitLM, prompts: torch.Tensor) -> None:
    cache = model.new_cache(BATCH, PROMPT + NEW)
    out, stats = lm.generate_early_exit(model, prompts, NEW, always, cache=cache)
    seq = torch.cat([prompts, out], dim=1)
    assert (stats.exit_layer == 0).all()
    assert stats.compute_fraction == pytest.approx(1 / N_LAYER)
    assert (stats.backfill_blocks == N_LAYER - 1).all()
    # every emitted token is the first exit's argmax of the full forward on its prefix
    with torch.no_grad():
        first_exit = model(seq)[0]
    assert torch.equal(out, first_exit[:, PROMPT - 1:-1].argmax(-1))
    # the cache: every layer (the last included) holds what a full-depth prefill of the same tokens computes
    ref = model.new_cache(BATCH, PROMPT + NEW)
    with torch.no_grad():
        model.prefill(seq[:, :-1], ref)
    n = PROMPT + NEW - 1
    for layer in range(N_LAYER):
        for got, want in zip(cache[layer], ref[layer], strict=True):
            assert float((got[:, :, :n] - want[:, :, :n]).abs().max()) < 1e-10 * float(want.abs().max())
    # and early exits changed the text: the test would not see a backfill bug otherwise
    assert not torch.equal(out, lm.greedy_generate_nocache(model, prompts, NEW))


def test_mixed_exits_emit_the_argmax_of_their_exit(model: lm.ExitLM, prompts: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(2)

    def coin(layer: int, logits: torch.Tensor) -> torch.Tensor:
        return torch.rand(logits.shape[0], generator=gen) < 0.4

    out, stats = lm.generate_early_exit(model, prompts, NEW, coin, track_final=True)
    seq = torch.cat([prompts, out], dim=1)
    with torch.no_grad():
        logits = model(seq)  # (L, B, T, V)
    for b in range(BATCH):
        for s in range(NEW):
            layer = int(stats.exit_layer[b, s])
            assert int(out[b, s]) == int(logits[layer, b, PROMPT - 1 + s].argmax())
    # the last exit's argmax for the same prefix, read after the backfill
    assert torch.equal(stats.final_token, logits[-1, :, PROMPT - 1:-1].argmax(-1))
    assert bool((stats.final_token != out).any())
    assert len(set(stats.exit_layer.flatten().tolist())) > 1
    assert 1 / N_LAYER < stats.compute_fraction < 1.0
    assert torch.equal(stats.blocks + stats.backfill_blocks, torch.full_like(stats.blocks, N_LAYER))


def test_decide_with_the_wrong_number_of_rows_is_an_error(model: lm.ExitLM, prompts: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="decisions for"):
        lm.generate_early_exit(model, prompts, 2, lambda layer, logits: torch.ones(1, dtype=torch.bool))
