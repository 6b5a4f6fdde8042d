"""Depth probe: does the TRM recursion buy serial depth where depth is the bottleneck? (issue 14)

    python benchmarks/depth_probe.py                     # 2,000 steps, 1-3 lookups, the four models below
    python benchmarks/depth_probe.py --models 0 --set trm_max_steps=4 --seed 1
    python benchmarks/depth_probe.py --curriculum --lr-for 2=1e-3 3=1e-3   # levels in order; deeper models slower

The task is the built-in `variable_chain` family: shuffled single-letter assignments (`m=k`, `k=2`, ...) in two
chains, then a question `m=` whose answer is the digit the variable resolves to. Level L takes L successive lookups
by content with no written step in between (level 1: the variable holds a digit; level 2: one link above it), so a
model's depth (layers, or recursion steps that attend over the context) bounds how many it can follow. The answer is
one digit: a model that knows only "one of the digits shown" scores log 2 = 0.693 nats, uniform over digits 2.303.

Models, trained on the same batches in the same order with the same optimizer (AdamW, loss on the answers only):
0. Forge tiny with its recursion (`--set` overrides apply to this model only);
1. the same Forge with `trm_max_steps=0` (equal parameters, no recursion);
2. Forge without recursion but with as many layers as match model 0's per-token matmul work (depth instead of
   recursion, compute-matched; more parameters);
3. a compute-matched Llama of Forge's width (as in `benchmarks/recursion.py`).
Reported on held-out test examples, per number of lookups: answer CE and accuracy (argmax is the digit); for model 0
also the same at 0, 1, ... T inference steps (ACT off), final - step 0 with its paired standard error, and with ACT on
the mean steps run at the answer position per number of lookups (does ACT spend more steps on longer chains?).

`--curriculum` trains the levels in order: the run is cut into as many equal stages as there are levels, and stage i
mixes levels LOW..LOW+i in equal shares (the earlier levels stay in, so they are not forgotten). `--lr-for I=LR` gives
model I its own peak learning rate: one rate does not suit every depth (the 7-layer Forge answers two lookups at
0.81 with 1e-3 and at chance with 3e-3), so a comparison at one rate can handicap a control.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import random
import time

import torch
import torch.nn.functional as F
from recursion import forge_matmul_macs, matched_llama, paired_gain, parse_overrides, tiny_forge, train_step

from evaluation.corpus import corpus_texts
from evaluation.tasks import get_task_family
from modeling_forge import ForgeForCausalLM
from modeling_forge.tokenization import build_tokenizer
from trainers.data import pack_examples

FAMILY = "variable_chain"
MAX_PER_LEVEL = 40_000
logger = logging.getLogger("depth_probe")


def train_blocks(tokenizer, levels: range, n_blocks: int, length: int, seed: int) -> list:
    """`n_blocks` packed blocks of training examples, levels in equal shares of the tokens, shuffled: at most
    `MAX_PER_LEVEL` distinct examples per level (one lookup has ~190,000 problems in the train split, and drawing
    close to all of them by rejection is slow), repeated when a level needs more."""
    family = get_task_family(FAMILY)
    texts = []
    for level in levels:
        example = family.generate("train", 1, seed=seed, difficulty=level)[0]
        tokens = len(tokenizer(example.prompt + example.target)["input_ids"]) + 1
        wanted = math.ceil(1.05 * n_blocks * length / tokens / len(levels))
        drawn = family.generate("train", min(wanted, MAX_PER_LEVEL), seed=seed, difficulty=level)
        texts += [(e.prompt, e.target) for e in (drawn * math.ceil(wanted / len(drawn)))[:wanted]]
    random.Random(seed).shuffle(texts)
    blocks = pack_examples(texts, tokenizer, length, prompt_loss=False)  # the assignments' letters are random
    return [blocks[i % len(blocks)] for i in range(n_blocks)]


def curriculum_blocks(tokenizer, levels: range, n_blocks: int, length: int, seed: int, order_seed: int) -> list:
    """`n_blocks` blocks in stages of (about) equal length: stage i mixes the first i + 1 levels in equal shares of
    its tokens, each stage in its own `order_seed` order (the stages keep their order, a curriculum)."""
    blocks = []
    for stage in range(len(levels)):
        size = n_blocks * (stage + 1) // len(levels) - n_blocks * stage // len(levels)
        stage_blocks = train_blocks(tokenizer, levels[: stage + 1], size, length, seed=seed + stage)
        order = torch.randperm(size, generator=torch.Generator().manual_seed(order_seed + stage)).tolist()
        blocks += [stage_blocks[i] for i in order]
    return blocks


def held_out_examples(tokenizer, levels: range, n: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per number of lookups: (n, T) held-out prompt + answer ids, right-padded (a causal model's logits at the answer
    do not see the padding after it), and each example's answer position."""
    family = get_task_family(FAMILY)
    out = {}
    for level in levels:
        rows = []
        for example in family.generate("test", n, seed=1, difficulty=level):
            target = tokenizer(example.target, add_special_tokens=False)["input_ids"]
            rows.append(tokenizer(example.prompt)["input_ids"] + target)
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        out[level] = (ids, torch.tensor([len(row) - 1 for row in rows]))
    return out


@torch.no_grad()
def answer_scores(model, examples: dict, **kwargs) -> dict[int, dict]:
    """Per number of lookups: per-example CE of the answer digit, accuracy (argmax), and the ACT steps run there."""
    out = {}
    for level, (ids, where) in examples.items():
        output = model(ids, **kwargs)
        rows = torch.arange(len(ids))
        logits = output.logits[rows, where - 1].float()
        targets = ids[rows, where]
        scores = {
            "ce": F.cross_entropy(logits, targets, reduction="none").tolist(),
            "correct": (logits.argmax(-1) == targets).float().tolist(),
        }
        if getattr(output, "halt_steps", None) is not None:
            scores["steps"] = output.halt_steps[rows, where - 1].float().tolist()
        out[level] = scores
    return out


def summary(scores: dict[int, dict]) -> dict:
    """Mean CE and accuracy per number of lookups and over all of them."""
    mean = lambda values: round(sum(values) / len(values), 4)  # noqa: E731
    out = {str(level): {"ce": mean(s["ce"]), "acc": mean(s["correct"])} for level, s in scores.items()}
    out["all"] = {"ce": mean([v for s in scores.values() for v in s["ce"]]),
                  "acc": mean([v for s in scores.values() for v in s["correct"]])}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--levels", type=int, nargs=2, default=[1, 3], metavar=("LOW", "HIGH"),
                        help="numbers of lookups to train and test on (variable_chain difficulty)")  # fmt: skip
    parser.add_argument("--eval-examples", type=int, default=200, help="held-out examples per number of lookups")
    parser.add_argument("--seed", type=int, default=0, help="seed of the models' initialisation and the batch order")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="ForgeConfig overrides (JSON) of the recursive Forge, e.g. trm_max_steps=4")  # fmt: skip
    parser.add_argument("--base", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="ForgeConfig overrides (JSON) of every Forge model, e.g. num_hidden_layers=1 for a "
                        "backbone too shallow to follow one lookup alone")  # fmt: skip
    parser.add_argument("--models", type=int, nargs="*",
                        help="train only these models (0: Forge, 1: no recursion, 2: deeper Forge without "
                        "recursion, 3: Llama); data and seeds do not depend on the choice")  # fmt: skip
    parser.add_argument("--curriculum", action="store_true",
                        help="train the levels in order, in equal stages that add one level each")  # fmt: skip
    parser.add_argument("--lr-for", nargs="*", default=[], metavar="I=LR",
                        help="peak learning rate of model I instead of --lr, e.g. 2=1e-3")  # fmt: skip
    parser.add_argument("--eval-every", type=int, default=0,
                        help="also score the held-out answers every this many steps (a learning curve)")  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    low, high = args.levels
    if not 1 <= low <= high <= 10:
        parser.error(f"--levels must satisfy 1 <= LOW <= HIGH <= 10, got {low} {high}")
    if args.eval_examples < 2:
        parser.error(f"--eval-examples must be >= 2 (a standard error needs two), got {args.eval_examples}")
    learning_rates = {}
    for item in args.lr_for:
        index, _, value = item.partition("=")
        try:
            index, rate = int(index), float(value)
        except ValueError:
            index, rate = -1, 0.0  # reported below
        if not (0 <= index <= 3 and rate > 0):
            parser.error(f"--lr-for takes I=LR with a model index 0-3 and a positive learning rate, e.g. 2=1e-3; "
                         f"got {item!r}")  # fmt: skip
        learning_rates[index] = rate
    levels = range(low, high + 1)
    torch.manual_seed(0)
    tokenizer = build_tokenizer(corpus_texts("train", max_chars=300_000), vocab_size=512)
    n_blocks = args.steps * args.batch
    if args.curriculum:
        train = curriculum_blocks(tokenizer, levels, n_blocks, args.length, seed=0, order_seed=args.seed)
    else:
        train = train_blocks(tokenizer, levels, n_blocks, args.length, seed=0)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
        train = [train[i] for i in order]
    held_out = held_out_examples(tokenizer, levels, args.eval_examples)

    base = parse_overrides(args.base)

    def forge(**overrides):
        return tiny_forge(tokenizer, args.length, **{**base, **overrides})

    torch.manual_seed(args.seed)  # `--set` changes model 0 only: the controls stay the preset (recursion.py's rule)
    recursive, flat = forge(**parse_overrides(args.set)), forge(trm_max_steps=0)
    per_layer = forge_matmul_macs(flat.config) / flat.config.num_hidden_layers
    deep_layers = max(flat.config.num_hidden_layers, round(forge_matmul_macs(recursive.config) / per_layer))
    models = {  # builders, so a model not asked for is not built
        "forge (recursion + ACT)": lambda: recursive,
        "forge trm_max_steps=0": lambda: flat,
        f"forge {deep_layers} layers, no recursion": lambda: forge(trm_max_steps=0, num_hidden_layers=deep_layers),
        "llama, compute-matched": lambda: matched_llama(recursive.config),
    }
    rates = {name: learning_rates.get(i, args.lr) for i, name in enumerate(models)}
    if args.models:
        models = {name: build for i, (name, build) in enumerate(models.items()) if i in args.models}
    results = {}
    for name, build in models.items():
        torch.manual_seed(args.seed)
        model = build()
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=rates[name], weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50))
        curve, seconds = {}, 0.0
        start = time.perf_counter()
        for step in range(args.steps):
            train_step(model, optimizer, schedule, train[step * args.batch : (step + 1) * args.batch])
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
                seconds += time.perf_counter() - start
                model.eval()
                kwargs = {"act_halting": False} if isinstance(model, ForgeForCausalLM) else {}
                curve[step + 1] = summary(answer_scores(model, held_out, **kwargs))["all"]
                logger.info("%s step %d: held-out answer CE / accuracy %s", name, step + 1, curve[step + 1])
                model.train()
                start = time.perf_counter()
        seconds += time.perf_counter() - start
        model.eval()
        row = {"params": sum(p.numel() for p in model.parameters()), "train_seconds": round(seconds, 1)}
        row["layers"] = model.config.num_hidden_layers
        row["lr"] = rates[name]
        if curve:
            row["curve"] = curve
        if not (isinstance(model, ForgeForCausalLM) and model.config.trm_max_steps > 0):
            row["answers"] = summary(answer_scores(model, held_out))
        else:  # every step run (ACT off) is the last of the per-step scores: score it once
            steps = model.config.trm_max_steps
            per_step = {
                k: answer_scores(model, held_out, act_halting=False, recursion_steps=k) for k in range(steps + 1)
            }
            row["answers"] = summary(per_step[steps])
            row["per_inference_steps"] = {str(k): summary(scores) for k, scores in per_step.items()}
            pooled = {k: [v for s in scores.values() for v in s["ce"]] for k, scores in per_step.items()}
            row["gain"] = paired_gain(pooled[0], pooled[steps])
            with_act = answer_scores(model, held_out, act_halting=True)
            row["act"] = {
                str(level): {
                    "mean_steps": round(sum(s["steps"]) / len(s["steps"]), 3),
                    "acc": round(sum(s["correct"]) / len(s["correct"]), 4),
                }
                for level, s in with_act.items()
            }
        results[name] = row
        print(name, json.dumps(row), flush=True)

    schedule = "in a curriculum (one level more per stage)" if args.curriculum else "mixed"
    print(f"\n{args.steps} steps x {args.batch} x {args.length} tokens of variable_chain ({low}-{high} lookups, "
          f"{schedule}), loss on the answers, AdamW, same batches for all. Answer CE (chance: one of the two digits "
          "shown 0.693, uniform 2.303) / accuracy per number of lookups")  # fmt: skip
    print(f"{'model':>34} {'params':>7} {'lr':>7} {'time':>6}  "
          + "  ".join(f"{f'{k} lookups':>13}" for k in levels) + "  all")  # fmt: skip
    for name, row in results.items():
        cells = "  ".join(f"{row['answers'][str(k)]['ce']:6.3f}/{row['answers'][str(k)]['acc']:.2f}" for k in levels)
        print(f"{name:>34} {row['params'] / 1e6:6.2f}M {row['lr']:7.1e} {row['train_seconds']:5.0f}s  {cells}  "
              f"{row['answers']['all']['ce']:.3f}/{row['answers']['all']['acc']:.3f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    row = results.get("forge (recursion + ACT)")
    if row is None or "per_inference_steps" not in row:
        return
    print("\nsame trained Forge, k recursion steps at inference (ACT off): answer CE / accuracy per number of lookups")
    for k, values in row["per_inference_steps"].items():
        cells = "  ".join(f"{values[str(level)]['ce']:6.3f}/{values[str(level)]['acc']:.2f}" for level in levels)
        print(f"  k={k}: {cells}  all {values['all']['ce']:.3f}/{values['all']['acc']:.3f}")
    curve = [values["all"]["ce"] for values in row["per_inference_steps"].values()]
    monotone = all(b < a for a, b in itertools.pairwise(curve))
    gain = row["gain"]
    print(f"  final - step 0: {gain['gain']:+.4f} nats (standard error {gain['se']:.4f} over {gain['examples']} "
          f"examples); every step lower: {'yes' if monotone else 'no'}")  # fmt: skip
    act = "  ".join(
        f"{level} lookups {v['mean_steps']:.2f} steps, acc {v['acc']:.2f}" for level, v in row["act"].items()
    )
    print(f"ACT on, at the answer: {act}")


if __name__ == "__main__":
    main()
