"""An inference loop that exits early with the policy served by exitwise (``exitwise.policies.runtime``).

    .venv/bin/python examples/inference_loop.py            # self-contained demo, ~1 minute
    .venv/bin/python examples/inference_loop.py --url http://127.0.0.1:8000 --token "$TOKEN"

The model is a small multi-exit classifier in numpy: 10 classes, inputs of 96 features in
4 blocks; stage k reads block k (a 24x24 matmul) and its exit head scores every class with the
evidence of blocks 0..k, so deeper exits are more accurate and cost more (cumulative cost
1, 2, 3, 4 units). Inputs come in two "capture" segments; "phone" inputs are noisier.

The demo does what a team would do, each step with the real tools:

1. record full-depth exit logs of the model on calibration traffic (NPZ + model card);
2. ``exitwise solve`` certified thresholds (disagreement <= 2% with 95% confidence);
3. store the policy (author), approve it (a second principal), activate it in production;
4. ``exitwise serve`` the API on loopback;
5. run the inference loop with :class:`exitwise.policies.runtime.PolicyClient`: each batch runs stage
   by stage, and the samples the policy lets exit stop there (their later stages are never
   computed); a ``shadow()`` share also runs at full depth to monitor the disagreement;
6. print the realised compute fraction and accuracy against full depth, then flip the kill
   switch and show that the loop falls back to full depth at the next poll.

With ``--url`` it skips 1-4 and 6 and runs the loop against a server that serves a policy for
``--model`` (the policy must have 4 exits and 10 classes; e.g. the one the demo stores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from exitwise.policies.runtime import PolicyClient  # noqa: E402

CLASSES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]
MODEL = "toy-multi-exit"
SEGMENTS = np.array(["studio", "phone"])


@dataclass(frozen=True)
class MultiExitModel:
    """Stage k: h_k = x_k @ W_k (orthogonal, 24x24); exit k: Gaussian class scores from h_0..h_k."""

    prototypes: np.ndarray  # (C, blocks, d) class means in feature space
    rotations: np.ndarray  # (blocks, d, d)
    noise: float

    @classmethod
    def build(cls, seed: int = 0, blocks: int = 4, d: int = 24, c: int = 10) -> MultiExitModel:
        rng = np.random.default_rng(seed)
        rotations = np.stack([np.linalg.qr(rng.normal(size=(d, d)))[0] for _ in range(blocks)]).astype(np.float32)
        return cls(prototypes=(rng.normal(size=(c, blocks, d)) * 0.45).astype(np.float32), rotations=rotations,
                   noise=1.0)

    @property
    def n_exits(self) -> int:
        return self.rotations.shape[0]

    @property
    def costs(self) -> list[float]:
        return [float(k + 1) for k in range(self.n_exits)]  # cumulative: stage k + its head

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Inputs (n, blocks, d), labels (n,), segments (n,): phone captures are noisier."""
        y = rng.integers(0, self.prototypes.shape[0], size=n)
        seg = rng.choice(SEGMENTS, size=n, p=[0.6, 0.4])
        scale = np.where(seg == "phone", 1.35, 1.0)[:, None, None] * self.noise
        x = self.prototypes[y] + rng.normal(size=(n, *self.prototypes.shape[1:])) * scale
        x = np.einsum("nbd,bde->nbe", x, self.rotations)  # what the sensor sees
        return x.astype(np.float32), y, seg

    def stage(self, k: int, x: np.ndarray, evidence: np.ndarray) -> np.ndarray:
        """Run stage k on the rows given; returns the updated class evidence = exit k's logits."""
        h = x[:, k, :] @ self.rotations[k].T  # undo the sensor rotation: the stage's real work
        diff = h[:, None, :] - self.prototypes[None, :, k, :]
        return evidence - 0.5 * np.einsum("ncd,ncd->nc", diff, diff) / self.noise**2

    def full_depth_logits(self, x: np.ndarray) -> np.ndarray:
        """Every exit's logits (n, K, C), as recorded in exit logs."""
        evidence = np.zeros((x.shape[0], self.prototypes.shape[0]), dtype=np.float32)
        out = []
        for k in range(self.n_exits):
            evidence = self.stage(k, x, evidence)
            out.append(evidence)
        return np.stack(out, axis=1)


@dataclass
class LoopStats:
    n: int = 0
    compute: float = 0.0
    correct: int = 0
    correct_full: int = 0
    agree: int = 0
    shadowed: int = 0
    shadow_disagree: int = 0
    exits: np.ndarray | None = None


def infer_batch(model: MultiExitModel, client: PolicyClient, x: np.ndarray, seg: np.ndarray,
                stats: LoopStats) -> np.ndarray:
    """Answer a batch stage by stage; rows the policy lets exit are not computed further."""
    policy = client.policy  # one snapshot for the whole batch
    n, k_total = x.shape[0], model.n_exits
    answer = np.empty(n, dtype=np.int64)
    exit_at = np.empty(n, dtype=np.int64)
    pending = np.arange(n)
    evidence = np.zeros((n, len(CLASSES)), dtype=np.float32)
    for k in range(k_total):
        evidence_k = model.stage(k, x[pending], evidence[pending])
        evidence[pending] = evidence_k
        stop = np.ones(pending.size, dtype=bool) if k == k_total - 1 else policy.decide(k, evidence_k, seg[pending])
        answer[pending[stop]] = evidence_k[stop].argmax(axis=1)
        exit_at[pending[stop]] = k
        pending = pending[~stop]
        if pending.size == 0:
            break
    costs = np.asarray(model.costs)
    stats.n += n
    stats.compute += float(costs[exit_at].sum() / costs[-1])
    stats.exits = np.bincount(exit_at, minlength=k_total) + (0 if stats.exits is None else stats.exits)
    for i in np.flatnonzero([policy.shadow() for _ in range(n)]):  # monitoring: also run at full depth
        full = model.full_depth_logits(x[i:i + 1])[0, -1].argmax()
        stats.shadowed += 1
        stats.shadow_disagree += int(full != answer[i])
    return answer


def run_loop(model: MultiExitModel, client: PolicyClient, batches: int, batch: int, seed: int) -> LoopStats:
    rng = np.random.default_rng(seed)
    stats = LoopStats()
    for _ in range(batches):
        x, y, seg = model.sample(batch, rng)
        answer = infer_batch(model, client, x, seg, stats)
        full = model.full_depth_logits(x)[:, -1].argmax(axis=1)  # for the printout only
        stats.correct += int((answer == y).sum())
        stats.correct_full += int((full == y).sum())
        stats.agree += int((answer == full).sum())
    return stats


def report(stats: LoopStats, label: str) -> dict[str, float]:
    out = {"samples": stats.n, "compute_fraction": stats.compute / stats.n, "accuracy": stats.correct / stats.n,
           "accuracy_full_depth": stats.correct_full / stats.n, "disagreement": 1 - stats.agree / stats.n,
           "exit_rate": [round(float(v) / stats.n, 4) for v in (stats.exits if stats.exits is not None else [])],
           "shadowed": stats.shadowed, "shadow_disagreement": stats.shadow_disagree}
    print(f"{label}: compute {out['compute_fraction']:.1%} of full depth, accuracy {out['accuracy']:.2%} "
          f"(full depth {out['accuracy_full_depth']:.2%}), disagreement {out['disagreement']:.2%}, "
          f"exit rates {out['exit_rate']}, shadowed {stats.shadowed}")
    return out


def _run(cmd: list[str], env: dict[str, str], **kw: object) -> str:
    return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, **kw).stdout.strip()


def demo(args: argparse.Namespace) -> int:
    exitwise = str(Path(sys.executable).with_name("exitwise"))
    tmp = Path(tempfile.mkdtemp(prefix="exitwise-example-"))
    env = {**os.environ, "EXITWISE_DATA_DIR": str(tmp / "data"), "MLFLOW_DISABLE_TELEMETRY": "true",
           "EXITWISE_MLFLOW_SYNC": "off"}  # this example is about the runtime; make demo shows MLflow
    env.pop("EXITWISE_DATABASE_URL", None)
    server = None
    try:
        model = MultiExitModel.build(seed=0)
        x, y, seg = model.sample(args.calibration_rows, np.random.default_rng(1))
        np.savez(tmp / "calibration.npz", logits=model.full_depth_logits(x), labels=y, seg_capture=seg)
        (tmp / "card.json").write_text(json.dumps({
            "model": MODEL, "exits": [{"name": f"stage{k + 1}", "cost": c} for k, c in enumerate(model.costs)],
            "classes": CLASSES, "segment_columns": ["capture"]}))
        print(f"1. recorded {args.calibration_rows} full-depth exit logs -> {tmp / 'calibration.npz'}")
        _run([exitwise, "solve", str(tmp / "calibration.npz"), "--card", str(tmp / "card.json"), "--risk",
              "disagreement", "--eps", "0.02", "--delta", "0.05", "--segment-key", "capture", "--shadow-rate",
              "0.02", "--no-baselines", "--out", str(tmp / "policy.json"), "--json"], env)
        doc = json.loads((tmp / "policy.json").read_text())
        print(f"2. solved: certified={doc['guarantee']['certified']}, expected compute "
              f"{doc['expected']['compute_fraction']:.1%} at disagreement <= {doc['guarantee']['eps']:.0%}")
        _run([exitwise, "db", "upgrade"], env)
        admin = _run([exitwise, "principal", "add", "admin", "--role", "admin", "--quiet"], env)
        tokens = {name: _run([exitwise, "principal", "add", name, "--role", role, "--quiet"],
                             {**env, "EXITWISE_TOKEN": admin})
                  for name, role in (("alice", "author"), ("bob", "approver"), ("runtime", "reader"))}
        _run([exitwise, "policy", "create", str(tmp / "policy.json")], {**env, "EXITWISE_TOKEN": tokens["alice"]})
        bob = {**env, "EXITWISE_TOKEN": tokens["bob"]}
        _run([exitwise, "policy", "approve", MODEL, "1", "--reason", "example"], bob)
        _run([exitwise, "policy", "activate", MODEL, "1", "--env", "production", "--reason", "example"], bob)
        print("3. stored by alice, approved and activated in production by bob")
        port = args.port
        server = subprocess.Popen([exitwise, "serve", "--host", "127.0.0.1", "--port", str(port),
                                   "--log-level", "warning"], env=env)
        url = f"http://127.0.0.1:{port}"
        _wait(url)
        print(f"4. serving on {url}")
        client = PolicyClient(url, MODEL, "production", tokens["runtime"], cache_dir=tmp / "policy-cache",
                              poll_interval=0.2, seed=0, n_exits=model.n_exits, n_classes=len(CLASSES))
        client.start()
        print(f"5. runtime client has policy v{client.policy.version} ({client.policy.source})")
        results = {"early_exit": report(run_loop(model, client, args.batches, args.batch, seed=2), "   early exit")}
        import httpx

        httpx.post(f"{url}/v1/models/{MODEL}/kill", json={"env": "production", "reason": "example: kill switch"},
                   headers={"Authorization": f"Bearer {tokens['alice']}"}, timeout=10).raise_for_status()
        deadline = time.monotonic() + 10
        while not client.policy.killed and time.monotonic() < deadline:
            time.sleep(0.05)
        print(f"6. kill switch on: the client sees killed={client.policy.killed} at its next poll")
        results["killed"] = report(run_loop(model, client, 2, args.batch, seed=3), "   killed    ")
        client.close()
        if args.json:
            print(json.dumps(results))
        return 0
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=15)
        shutil.rmtree(tmp, ignore_errors=True)


def _wait(url: str) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/healthz", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not start")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running exitwise server (skip the demo set-up)")
    ap.add_argument("--token", default=os.environ.get("EXITWISE_TOKEN"), help="reader token (EXITWISE_TOKEN)")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--env", default="production")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--calibration-rows", type=int, default=20_000)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON object")
    args = ap.parse_args(argv)
    if args.url is None:
        return demo(args)
    model = MultiExitModel.build(seed=0)
    with PolicyClient(args.url, args.model, args.env, args.token, n_exits=model.n_exits, n_classes=len(CLASSES),
                      cache_dir=Path(tempfile.gettempdir()) / "exitwise-policy-cache") as client:
        print(f"refresh: {client.refresh()}; policy v{client.policy.version} ({client.policy.source})")
        report(run_loop(model, client, args.batches, args.batch, seed=2), "early exit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
