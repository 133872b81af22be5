"""A small decoder-only transformer with an exit after every layer, and early-exit greedy decoding.

Architecture (``LMConfig`` defaults): 6 pre-LayerNorm blocks, d_model 128, 4 heads, context 128,
learned positions, GELU MLP (4x). Exit ``l`` (l = 0..5) reads the residual stream after block
``l`` through its OWN final LayerNorm ``ln_exit[l]`` and the SHARED LM head, which is tied to the
token embedding: ``logits_l = ln_exit[l](h_l) @ wte.weight.T``. The last exit is the ordinary
LM output.

``generate_early_exit`` decodes greedily with a KV cache. For every new token the blocks run one
by one; after block ``l`` the exit head's logits of the still-undecided rows go to
``decide(l, logits) -> bool`` and the rows it accepts emit their argmax from that exit. The
deeper blocks are still run for that position (the KV *backfill*), so every layer's cache holds
the keys/values of every emitted token exactly as the full model would have computed them: the
next token's attention at any depth sees a complete cache. Cost accounting (``ExitStats``):

- a token's compute = the blocks run up to and including its exit block, ``l + 1`` of ``L``
  (plus the ``l + 1`` exit heads evaluated on the way, counted separately in ``heads``);
- backfill = the ``L - l - 1`` blocks run after the decision, reported separately, NOT counted
  as the token's compute (a serving system runs them off the critical path, batched with the
  next token);
- the prompt prefill (full depth) is not counted either;
- ``decide`` is not asked at the last block: the last exit always emits.

The batch runs every block for every row (the backfill makes that the same work), and the head
is applied to every row, so with ``decide`` always False the output is bit-identical to
``greedy_generate`` (full depth, same kernels, same shapes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

Decide = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LMConfig:
    """Shape of the model; saved with the checkpoint."""

    vocab_size: int = 4096
    n_layer: int = 6
    d_model: int = 128
    n_head: int = 4
    context: int = 128
    mlp_ratio: int = 4

    def to_dict(self) -> dict[str, int]:
        """Plain dict for the checkpoint and metadata."""
        return asdict(self)


class Block(nn.Module):
    """Pre-LN transformer block: causal self-attention then a GELU MLP, both residual."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.fc2 = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                start: int = 0) -> torch.Tensor:
        """x (B, T, d) at positions start..start+T-1. With ``cache`` = (k, v) buffers of shape
        (B, H, max_len, d/H) the new keys/values are written at [start, start+T) and the queries
        attend to [0, start+T); without it, plain causal attention over x."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        if cache is None:
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            ck, cv = cache
            ck[:, :, start:start + t] = k
            cv[:, :, start:start + t] = v
            k, v = ck[:, :, :start + t], cv[:, :, :start + t]
            if t == 1:
                att = F.scaled_dot_product_attention(q, k, v)
            else:
                mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
                att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ExitLM(nn.Module):
    """Decoder-only LM with an exit (own LayerNorm + shared tied head) after every block."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_exit = nn.ModuleList(nn.LayerNorm(cfg.d_model) for _ in range(cfg.n_layer))
        self.apply(self._init)
        for blk in self.blocks:  # GPT-2: residual projections scaled down with depth
            for lin in (blk.proj, blk.fc2):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    @property
    def n_layer(self) -> int:
        """Number of blocks = number of exits."""
        return self.cfg.n_layer

    def head(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Logits of exit ``layer`` from the residual stream h (..., d) after that block."""
        return F.linear(self.ln_exit[layer](h), self.wte.weight)

    def embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Token + position embedding of idx (B, T) placed at positions start..start+T-1."""
        t = idx.shape[1]
        if start + t > self.cfg.context:
            raise ValueError(f"positions up to {start + t} exceed the context {self.cfg.context}")
        pos = torch.arange(start, start + t, device=idx.device)
        return self.wte(idx) + self.wpe(pos)

    def hidden_states(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Residual stream after every block, each (B, T, d): the inputs of the exit heads."""
        x = self.embed(idx)
        out = []
        for blk in self.blocks:
            x = blk(x)
            out.append(x)
        return out

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits of every exit for idx (B, T): a (L, B, T, V) tensor."""
        return torch.stack([self.head(i, h) for i, h in enumerate(self.hidden_states(idx))])

    def new_cache(self, batch: int, max_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Empty per-layer (k, v) buffers for decoding up to max_len positions."""
        p = self.wte.weight
        hd = self.cfg.d_model // self.cfg.n_head
        shape = (batch, self.cfg.n_head, max_len, hd)
        return [(p.new_zeros(shape), p.new_zeros(shape)) for _ in range(self.cfg.n_layer)]

    def prefill(self, idx: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Run idx (B, T) at positions 0..T-1 through every block, filling the cache."""
        x = self.embed(idx)
        for blk, c in zip(self.blocks, cache, strict=True):
            x = blk(x, c, 0)


@dataclass
class ExitStats:
    """Per generated token: the exit that emitted it and the work done (see the module docstring)."""

    exit_layer: torch.Tensor  # (B, n_new) int64, 0-based block index of the emitting exit
    n_layer: int
    prefill_blocks: int = 0  # blocks x positions of the full-depth prompt prefill (not counted)
    final_token: torch.Tensor | None = None  # (B, n_new) last exit's argmax at each step (track_final)

    @property
    def blocks(self) -> torch.Tensor:
        """Blocks run before each token's exit decision: exit_layer + 1."""
        return self.exit_layer + 1

    @property
    def heads(self) -> torch.Tensor:
        """Exit heads evaluated for each token (one per block run before the decision)."""
        return self.exit_layer + 1

    @property
    def backfill_blocks(self) -> torch.Tensor:
        """Blocks run after the decision only to fill the KV cache: L - exit_layer - 1."""
        return self.n_layer - self.exit_layer - 1

    @property
    def compute_fraction(self) -> float:
        """Mean over tokens of (blocks run until exit) / L."""
        return float(self.blocks.double().mean() / self.n_layer)

    def mac_fraction(self, block_macs: float, head_macs: float) -> float:
        """Mean over tokens of MACs until exit (blocks + heads on the way) over the full depth's
        MACs with the same heads (L blocks + L heads)."""
        used = self.blocks.double() * block_macs + self.heads.double() * head_macs
        return float(used.mean() / (self.n_layer * (block_macs + head_macs)))


@torch.no_grad()
def generate_early_exit(model: ExitLM, prompts: torch.Tensor, n_new: int, decide: Decide,
                        cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                        track_final: bool = False) -> tuple[torch.Tensor, ExitStats]:
    """Greedy decoding of n_new tokens after prompts (B, P >= 1) with an exit decision after
    every block and KV backfill. ``decide(l, logits)`` gets the (n_active, V) logits of exit l
    for the rows not yet decided at this position and returns a bool (n_active,) tensor; True
    emits the row's argmax from exit l. ``cache`` (from ``model.new_cache(B, >= P + n_new)``)
    may be passed to inspect it afterwards. ``track_final`` also records the last exit's argmax
    for the same prefix at every step (the backfill computes its hidden state anyway; the extra
    head is a diagnostic, counted nowhere). Returns (tokens (B, n_new), ExitStats)."""
    model.eval()
    b, p = prompts.shape
    if p < 1:
        raise ValueError("prompts need at least one token")
    n_layer = model.n_layer
    if cache is None:
        cache = model.new_cache(b, p + n_new)
    if p > 1:
        model.prefill(prompts[:, :-1], cache)
    out = prompts.new_zeros(b, n_new)
    exit_layer = torch.zeros(b, n_new, dtype=torch.int64)
    final = prompts.new_zeros(b, n_new) if track_final else None
    current = prompts[:, -1:]
    for step in range(n_new):
        pos = p - 1 + step
        x = model.embed(current, pos)
        decided = torch.zeros(b, dtype=torch.bool)
        token = prompts.new_zeros(b)
        for layer, (blk, c) in enumerate(zip(model.blocks, cache, strict=True)):
            x = blk(x, c, pos)  # for rows decided earlier this is the backfill
            if bool(decided.all()):
                continue  # only backfill left: no head needed
            logits = model.head(layer, x[:, 0])  # every row, so shapes match greedy_generate
            active = (~decided).nonzero().squeeze(1)
            if layer == n_layer - 1:
                accept = torch.ones(active.numel(), dtype=torch.bool)
            else:
                accept = torch.as_tensor(decide(layer, logits[active])).to(torch.bool).reshape(-1)
                if accept.numel() != active.numel():
                    raise ValueError(f"decide returned {accept.numel()} decisions for {active.numel()} rows")
            rows = active[accept]
            token[rows] = logits[rows].argmax(dim=-1)
            exit_layer[rows, step] = layer
            decided[rows] = True
        if final is not None:
            final[:, step] = model.head(n_layer - 1, x[:, 0]).argmax(dim=-1)
        out[:, step] = token
        current = token[:, None]
    return out, ExitStats(exit_layer=exit_layer, n_layer=n_layer, prefill_blocks=n_layer * b * (p - 1),
                          final_token=final)


@torch.no_grad()
def greedy_generate(model: ExitLM, prompts: torch.Tensor, n_new: int) -> torch.Tensor:
    """Plain full-depth greedy decoding with a KV cache (last exit only): the reference."""
    model.eval()
    b, p = prompts.shape
    cache = model.new_cache(b, p + n_new)
    if p > 1:
        model.prefill(prompts[:, :-1], cache)
    out = prompts.new_zeros(b, n_new)
    current = prompts[:, -1:]
    for step in range(n_new):
        pos = p - 1 + step
        x = model.embed(current, pos)
        for blk, c in zip(model.blocks, cache, strict=True):
            x = blk(x, c, pos)
        token = model.head(model.n_layer - 1, x[:, 0]).argmax(dim=-1)
        out[:, step] = token
        current = token[:, None]
    return out


@torch.no_grad()
def greedy_generate_nocache(model: ExitLM, prompts: torch.Tensor, n_new: int) -> torch.Tensor:
    """Full-depth greedy decoding recomputing the whole prefix every step (no cache): a check."""
    model.eval()
    seq = prompts
    for _ in range(n_new):
        last = model.hidden_states(seq)[-1][:, -1]
        token = model.head(model.n_layer - 1, last).argmax(dim=-1)
        seq = torch.cat([seq, token[:, None]], dim=1)
    return seq[:, prompts.shape[1]:]


def block_macs(cfg: LMConfig, context: float) -> float:
    """Multiply-accumulates of one block for one token attending to ``context`` positions:
    the four linear maps (12 d^2 at mlp_ratio 4) + scores and weighted sum (2 * context * d)."""
    d = cfg.d_model
    return (3 * d * d + d * d + 2 * cfg.mlp_ratio * d * d) + 2.0 * context * d


def head_macs(cfg: LMConfig) -> float:
    """Multiply-accumulates of one exit head for one token: the tied projection d x V
    (the LayerNorm is not counted)."""
    return float(cfg.d_model * cfg.vocab_size)


def load_model(path: str, map_location: str = "cpu") -> ExitLM:
    """Rebuild the model saved by train.py (``{"config": ..., "state_dict": ...}``)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    model = ExitLM(LMConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model
