"""Grokking on modular addition (p = 97): iterations to 95% validation accuracy, AdamW vs the Grokfast filter.

Task: all 97^2 pairs (a, b) -> (a + b) mod 97, split once at random into train / validation (30/70 and 50/50).
Model: an MLP (a 128-d embedding per operand, concatenated, 512 ReLU hidden units, 97 logits), minibatches of 512,
AdamW lr 1e-3, betas (0.9, 0.98), decoupled weight decay. "grokfast" is MuGrokfast's filter in front of that same
AdamW (every parameter in one `adamw` group), so the filter is the only difference; "mugrokfast" additionally puts the
hidden matrix under Muon (embedding and output layer stay on AdamW). Each run stops at 95% validation accuracy or
at its iteration cap, which is reported as "not reached by N".

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/grokking.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/grokking.py --quick     # a 1-minute smoke run
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from trainers.mugrokfast import MuGrokfast, MuGrokfastConfig, create_mugrokfast

P = 97

# (train fraction, weight decay, iteration cap, optimizer, Grokfast lambda, Grokfast alpha)
SETTINGS = (
    (0.3, 1.0, 10_000, "adamw", 0.0, 0.98),
    (0.3, 1.0, 10_000, "grokfast", 2.0, 0.98),
    (0.3, 1.0, 10_000, "grokfast", 5.0, 0.98),
    (0.3, 1.0, 10_000, "mugrokfast", 2.0, 0.98),
    (0.5, 1.0, 6_000, "adamw", 0.0, 0.98),
    (0.5, 1.0, 6_000, "grokfast", 2.0, 0.98),
)


class ModularMLP(nn.Module):
    """Embed both operands, concatenate, one ReLU hidden layer, logits over the 97 residues."""

    def __init__(self, dim: int = 128, hidden: int = 512) -> None:
        super().__init__()
        self.emb = nn.Embedding(P, dim)
        self.fc1 = nn.Linear(2 * dim, hidden)
        self.fc2 = nn.Linear(hidden, P)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.emb(pairs).flatten(1))))  # (N, P)


def split(fraction: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Train / validation pairs and labels: a fixed random split of all P^2 pairs."""
    a, b = torch.meshgrid(torch.arange(P), torch.arange(P), indexing="ij")
    pairs = torch.stack([a.flatten(), b.flatten()], dim=1)
    labels = pairs.sum(1) % P
    order = torch.randperm(P * P, generator=torch.Generator().manual_seed(seed))
    n_train = int(fraction * P * P)
    train, val = order[:n_train], order[n_train:]
    return pairs[train], labels[train], pairs[val], labels[val]


def build(kind: str, model: nn.Module, weight_decay: float, lam: float, alpha: float) -> torch.optim.Optimizer:
    """AdamW, AdamW behind the Grokfast filter, or MuGrokfast (Muon on fc1)."""
    params = list(model.parameters())
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.98), weight_decay=weight_decay)
    config = MuGrokfastConfig(
        lr=1e-3,
        betas=(0.9, 0.98),
        weight_decay=weight_decay,
        fallback_weight_decay=weight_decay,
        grokfast_lambda=lam,
        grokfast_alpha=alpha,
        qk_clip_tau=None,
        fallback_patterns=(r"^emb\.", r"^fc2\."),
    )
    if kind == "grokfast":
        return MuGrokfast([{"params": params, "kind": "adamw", "weight_decay": weight_decay}], config)
    return create_mugrokfast(model, config)


def run(fraction: float, weight_decay: float, cap: int, kind: str, lam: float, alpha: float, seed: int) -> dict:
    """Train until 95% validation accuracy or `cap` iterations; accuracy is checked every 100 iterations."""
    x_train, y_train, x_val, y_val = split(fraction, seed)
    torch.manual_seed(seed)
    model = ModularMLP()
    optimizer = build(kind, model, weight_decay, lam, alpha)
    batches = torch.Generator().manual_seed(seed)
    memorised = grokked = None
    val_acc = 0.0
    start = time.perf_counter()
    for it in range(1, cap + 1):
        idx = torch.randint(0, len(x_train), (512,), generator=batches)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if it % 100 == 0:
            with torch.no_grad():
                val_acc = float((model(x_val).argmax(-1) == y_val).float().mean())
                if memorised is None and float((model(x_train).argmax(-1) == y_train).float().mean()) >= 0.95:
                    memorised = it
            if val_acc >= 0.95:
                grokked = it
                break
    return {"memorised": memorised, "grokked": grokked, "val_acc": val_acc, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="two short runs (cap 1,000)")
    args = parser.parse_args()
    settings = [(0.5, 1.0, 1_000, "adamw", 0.0, 0.98), (0.5, 1.0, 1_000, "grokfast", 2.0, 0.98)]
    settings = settings if args.quick else SETTINGS
    print(f"# Grokking, (a + b) mod {P}: MLP 2x128 -> 512 -> {P}, batch 512, AdamW lr 1e-3, seed {args.seed}\n")
    print("| train frac | wd | optimizer | lambda | alpha | train acc 95% at | val acc 95% at | final val acc | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    baseline: dict[float, int | None] = {}
    results = []
    for fraction, weight_decay, cap, kind, lam, alpha in settings:
        out = run(fraction, weight_decay, cap, kind, lam, alpha, args.seed)
        results.append((fraction, kind, lam, out))
        if kind == "adamw":
            baseline[fraction] = out["grokked"]
        grokked = f"{out['grokked']}" if out["grokked"] else f"not reached by {cap}"
        print(
            f"| {fraction} | {weight_decay} | {kind} | {lam if kind != 'adamw' else '-'} | "
            f"{alpha if kind != 'adamw' else '-'} | {out['memorised']} | {grokked} | {out['val_acc']:.3f} | "
            f"{out['seconds']:.0f} |",
            flush=True,
        )
    print("\nspeed-up in iterations to 95% validation accuracy over AdamW at the same split:")
    for fraction, kind, lam, out in results:
        if kind == "adamw":
            continue
        base = baseline.get(fraction)
        if base and out["grokked"]:
            print(f"  frac {fraction} {kind} lambda {lam}: x{base / out['grokked']:.2f}")
        else:
            print(f"  frac {fraction} {kind} lambda {lam}: not comparable (one of the runs hit its cap)")


if __name__ == "__main__":
    main()
