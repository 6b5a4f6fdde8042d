"""AdamW vs Muon (+AdamW fallback) vs MuGrokfast on the tiny Forge LM, and the optimizer's share of step time.

Same data (the built-in Shakespeare corpus, byte-level BPE 512), same batches, same seed and step budget for every
optimizer; each optimizer gets its own small lr sweep and is judged at its best lr. Reported: validation loss (CE of
the final recursion step, eval mode, no ACT early exit) on a fixed held-out set, the steps each optimizer needs to
reach AdamW's final validation loss, and optimizer.step() time as a share of the whole step (forward + backward +
step) for the tiny run and for the cognate-25m preset at 2,048 tokens and, extrapolated, at the 16,384 tokens per
step of the Phase 1 recipe (batch 32 x 512).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/optimizers.py
    ... benchmarks/optimizers.py --quick          # a 1-minute smoke run
"""

import argparse
import math
import statistics
import time

import torch

from evaluation.corpus import corpus_texts
from modeling_forge import ForgeConfig, ForgeForCausalLM
from modeling_forge.tokenization import build_tokenizer
from trainers.data import pack_texts
from trainers.mugrokfast import MuGrokfastConfig, create_mugrokfast, muon_only, zeropower_via_newtonschulz

OPTIMIZERS = ("adamw", "muon", "mugrokfast")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--lrs", type=str, default="1e-3,3e-3,1e-2,3e-2", help="lr grid, the same per optimizer")
    parser.add_argument("--seeds", type=str, default="0", help="seeds of the lr sweep")
    parser.add_argument("--confirm-seeds", type=str, default="1,2", help="extra seeds run at each best lr")
    parser.add_argument("--train-chars", type=int, default=600_000)
    parser.add_argument("--val-blocks", type=int, default=48)
    parser.add_argument("--smooth", type=int, default=3, help="trailing window (evaluations) of the loss curves")
    parser.add_argument("--skip-25m", action="store_true", help="skip the cognate-25m timing")
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 steps, one lr, no 25M timing")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.lrs, args.confirm_seeds, args.skip_25m = 40, "3e-3", "", True
    return args


def build_optimizer(kind: str, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW (decay on >=2-D weights), Muon + AdamW fallback, or MuGrokfast (Phase 1 preset), all at `lr`."""
    if kind == "adamw":
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    config = MuGrokfastConfig.for_phase(1, lr=lr)
    return create_mugrokfast(model, muon_only(config) if kind == "muon" else config)


@torch.no_grad()
def validation_loss(model: ForgeForCausalLM, val: torch.Tensor, batch_size: int) -> float:
    """Mean final-step cross-entropy over the fixed validation blocks (eval mode, every recursion step run)."""
    model.eval()
    losses = []
    for start in range(0, len(val), batch_size):
        batch = val[start : start + batch_size]
        losses.append(float(model(input_ids=batch, labels=batch, act_halting=False).step_losses[-1]))
    model.train()
    return sum(losses) / len(losses)


def train_run(kind: str, lr: float, seed: int, data: dict, args: argparse.Namespace) -> dict:
    """One run; returns the validation curve and the time split between forward/backward and optimizer.step()."""
    torch.manual_seed(seed)
    model = ForgeForCausalLM(ForgeConfig.from_preset("tiny", vocab_size=data["vocab_size"]))
    optimizer = build_optimizer(kind, model, lr)
    qk_clip = getattr(optimizer, "qk_clip_enabled", False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup))
    order = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(seed))
    curve, fwd_bwd, opt_time, ratios, clips = [], [], [], [], 0
    for step in range(1, args.steps + 1):
        idx = order[((step - 1) * args.batch_size + torch.arange(args.batch_size)) % len(order)]
        batch = data["train"][idx]
        t0 = time.perf_counter()
        outputs = model(input_ids=batch, labels=batch, output_attention_logit_max=qk_clip)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t1 = time.perf_counter()
        if qk_clip:
            optimizer.record_attention_logit_max(outputs.attention_logit_max)
        optimizer.step()
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        fwd_bwd.append(t1 - t0)
        opt_time.append(t2 - t1)
        metrics = getattr(optimizer, "last_metrics", {})
        clips += int(metrics.get("optim/qk_clip_count", 0))
        if "optim/grad_ema_ratio" in metrics:
            ratios.append(metrics["optim/grad_ema_ratio"])
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, validation_loss(model, data["val"], args.batch_size)))
        if not math.isfinite(float(outputs.loss.detach())):
            break
    skip = min(5, len(fwd_bwd) - 1)  # the first steps include allocation and lazy-init costs
    fb, op = sum(fwd_bwd[skip:]), sum(opt_time[skip:])
    return {
        "kind": kind,
        "lr": lr,
        "seed": seed,
        "curve": curve,
        "final": curve[-1][1],
        "opt_share": op / (fb + op),
        "step_s": (fb + op) / len(fwd_bwd[skip:]),
        "grad_ema_ratio": statistics.mean(ratios) if ratios else None,
        "qk_clips": clips,
    }


def print_row(run: dict) -> None:
    """One markdown row of the per-run table."""
    ratio = f"{run['grad_ema_ratio']:.3f}" if run["grad_ema_ratio"] else "-"
    print(
        f"| {run['kind']} | {run['lr']:g} | {run['seed']} | {run['final']:.4f} | {run['opt_share']:.1%} | "
        f"{run['step_s']:.3f} | {ratio} | {run['qk_clips']} |",
        flush=True,
    )


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step (linearly interpolated between evaluations) at which the validation loss is <= target."""
    previous = None
    for step, loss in curve:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return float(step)
            (s0, l0) = previous
            return s0 + (step - s0) * (l0 - target) / (l0 - loss)
        previous = (step, loss)
    return None


def time_25m(tokens: int = 2048, seq_len: int = 512) -> None:
    """Optimizer share of step time for the cognate-25m preset (fwd+bwd measured at `tokens`, scaled to 16,384)."""
    torch.manual_seed(0)
    config = ForgeConfig.from_preset("cognate-25m")
    model = ForgeForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    batch = torch.randint(0, config.vocab_size, (tokens // seq_len, seq_len))
    fwd = []
    for _ in range(2):
        t0 = time.perf_counter()
        out = model(input_ids=batch, labels=batch, output_attention_logit_max=True)
        out.loss.backward()
        fwd.append(time.perf_counter() - t0)
    grads = {p: p.grad.clone() for p in model.parameters()}
    logit_max = out.attention_logit_max
    results = {}
    for kind in OPTIMIZERS:
        optimizer = build_optimizer(kind, model, 1e-3)
        times = []
        for _ in range(3):
            for p, g in grads.items():
                p.grad = g.clone()
            if kind == "mugrokfast":
                optimizer.record_attention_logit_max(logit_max)
            t0 = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - t0)
        results[kind] = min(times[1:])
    muon_shapes = [p.shape for p in build_optimizer("muon", model, 1e-3).param_groups[0]["params"]]
    ns = {}
    for dtype in (torch.float32, torch.bfloat16):
        mats = [torch.randn(s) for s in muon_shapes]
        t0 = time.perf_counter()
        for m in mats:
            zeropower_via_newtonschulz(m, dtype=dtype)
        ns[dtype] = time.perf_counter() - t0
    fb = min(fwd)
    print(f"\n## cognate-25m ({n_params / 1e6:.1f}M params, {len(muon_shapes)} Muon matrices)")
    print(f"forward+backward at {tokens} tokens: {fb:.2f} s (x8 -> {8 * fb:.1f} s at 16,384 tokens, extrapolated)")
    print(f"Newton-Schulz over all Muon matrices: fp32 {ns[torch.float32]:.2f} s, bf16 {ns[torch.bfloat16]:.2f} s")
    print("| optimizer | step() s | share at 2,048 tok | share at 16,384 tok (extrapolated) |")
    print("|---|---|---|---|")
    for kind, t in results.items():
        print(f"| {kind} | {t:.2f} | {t / (fb + t):.1%} | {t / (8 * fb + t):.1%} |")


def main() -> None:
    args = parse_args()
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    start = time.perf_counter()
    texts = corpus_texts("train", max_chars=args.train_chars)
    tokenizer = build_tokenizer(texts, vocab_size=512)
    train = torch.tensor(pack_texts(texts, tokenizer, args.block_size)["input_ids"])
    val_texts = corpus_texts("validation", max_chars=200_000)
    val = torch.tensor(pack_texts(val_texts, tokenizer, args.block_size)["input_ids"][: args.val_blocks])
    data = {"train": train, "val": val, "vocab_size": len(tokenizer)}
    tokens = args.batch_size * args.block_size
    print(f"# Optimizer benchmark: tiny Forge LM, {len(train)} train / {len(val)} val blocks of {args.block_size}")
    print(f"{args.steps} steps x {tokens} tokens, warmup {args.warmup} then constant lr, grad clip 1.0")
    print(f"lr sweep per optimizer: {lrs} on seeds {seeds}, then seeds {args.confirm_seeds} at each best lr")
    print("AdamW: betas (0.9, 0.95), wd 0.1 on >=2-D; Muon: Muon + AdamW fallback (same lr, wd 0.1);")
    print("MuGrokfast: Phase 1 preset (lambda 0.3, alpha 0.98, tau 30, wd 0.1) at the swept lr\n")
    print("| optimizer | lr | seed | final val loss | opt share | s/step | mean grad_ema_ratio | QK clips |")
    print("|---|---|---|---|---|---|---|---|")
    runs = []
    for kind in OPTIMIZERS:
        for lr in lrs:
            for seed in seeds:
                runs.append(train_run(kind, lr, seed, data, args))
                print_row(runs[-1])

    def mean_curve(kind: str, lr: float) -> list[tuple[int, float]]:
        """Seed-averaged validation curve, smoothed by a trailing mean over `--smooth` evaluations."""
        curves = [r["curve"] for r in runs if r["kind"] == kind and r["lr"] == lr]
        mean = [(step, statistics.mean(c[i][1] for c in curves)) for i, (step, _) in enumerate(curves[0])]
        window = args.smooth
        return [(step, statistics.mean(v for _, v in mean[max(0, i - window + 1) : i + 1])) for i, (step, _) in
                enumerate(mean)]  # fmt: skip

    best = {kind: min(lrs, key=lambda lr, k=kind: mean_curve(k, lr)[-1][1]) for kind in OPTIMIZERS}
    confirm = [int(x) for x in args.confirm_seeds.split(",") if x]
    for kind in OPTIMIZERS:  # more seeds at each optimizer's best lr (chosen on the sweep seeds)
        for seed in confirm:
            if seed not in seeds:
                runs.append(train_run(kind, best[kind], seed, data, args))
                print_row(runs[-1])
    curves = {kind: mean_curve(kind, best[kind]) for kind in OPTIMIZERS}
    target = curves["adamw"][-1][1]
    n_seeds = len({r["seed"] for r in runs if r["kind"] == "adamw" and r["lr"] == best["adamw"]})
    print(
        f"\n## At each optimizer's best lr ({n_seeds} seeds averaged, trailing mean of {args.smooth} evaluations);"
        f" target = AdamW's final smoothed validation loss {target:.4f}"
    )
    print("| optimizer | best lr | final smoothed val loss | per-seed final val loss | steps to target | x AdamW |")
    print("|---|---|---|---|---|---|")
    adamw_steps = steps_to_reach(curves["adamw"], target)
    for kind in OPTIMIZERS:
        finals = ", ".join(f"{r['final']:.3f}" for r in runs if r["kind"] == kind and r["lr"] == best[kind])
        reached = steps_to_reach(curves[kind], target)
        shown = "not reached" if reached is None else f"{reached:.0f}"
        factor = f"{reached / adamw_steps:.2f}" if reached and adamw_steps else "-"
        print(f"| {kind} | {best[kind]:g} | {curves[kind][-1][1]:.4f} | {finals} | {shown} | {factor} |")
    print("\nseed-averaged, smoothed validation curves at the best lr (step: loss):")
    for kind in OPTIMIZERS:
        curve = curves[kind]
        points = curve[:: max(1, len(curve) // 10)]
        points += [] if points[-1] == curve[-1] else [curve[-1]]
        print(f"  {kind:10s} " + "  ".join(f"{s}:{v:.3f}" for s, v in points))
    if not args.skip_25m:
        time_25m()
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
