"""Does the TRM recursion pay? Forge with recursion vs `trm_max_steps=0` vs a compute-matched deeper Llama, same data,
steps, optimizer and batches; then what ACT saves (issue 14's evidence).

    OMP_NUM_THREADS=1 nice python benchmarks/recursion.py                # tiny preset, 600 steps x 16 x 128 tokens
    python benchmarks/recursion.py --steps 300 --models 0                 # quicker: the recursive Forge only
    python benchmarks/recursion.py --steps 300 --models 0 --seed 1        # another initialisation and batch order
    python benchmarks/recursion.py --steps 300 --models 0 --set act_target='"correct"'     # a config ablation
    python benchmarks/recursion.py --steps 300 --models 0 --thresholds 0.5 0.6 0.7 0.8    # ACT under other thresholds
    python benchmarks/recursion.py --set trm_max_steps=4 --mixture arithmetic=2 code=1.5   # reasoning specialisation
    python benchmarks/recursion.py --models 0 --refiner-lr-scale 3      # levers: the recursion's own learning rate,
    python benchmarks/recursion.py --models 0 --refiner-init-std 0.02   # refiner outputs not zero at the start
    python benchmarks/recursion.py --models 0 --set trm_max_steps=0 num_hidden_layers=4    # depth without recursion

Data: the built-in multi-step arithmetic (difficulty 1-3) and code (difficulty 1-2) task families plus corpus text,
packed into 128-token blocks. Every model sees the same batches in the same order. The Llama has Forge's width and
feed-forward width and as many layers as match Forge's per-token matmul work (backbone + every refiner application),
so it is compute-matched, not parameter-matched. Reported on held-out examples:
- loss per source, and on the final-answer tokens of held-out arithmetic / code examples (teacher-forced: the worked
  solution is in context) with answer exact-match (every answer token predicted);
- the same trained Forge run for 0, 1, ... T_max steps (ACT off: every position runs exactly that many), on whole
  examples, on the final-answer tokens and on the numbers arithmetic's worked solution computes (after each `= `;
  the final answer only copies the last of them), with whether every extra step helped and final step - step 0
  (on the computed numbers also with its standard error over the held-out examples, paired per example);
- ACT on: mean steps over real tokens and the share halting at each step, per source, and the loss cost of halting
  vs running every step; the same under other thresholds (`--thresholds`, by default 0.3 / 0.7 / 0.9, as the
  specialisations set them); the threshold `calibrate_act_threshold` picks on validation blocks (the lowest within 1%
  of every step per source) and its cost on the test blocks; and the steps run at the final-answer tokens of held-out
  arithmetic / code (hard) vs the rest of those examples (template).
"""

import argparse
import itertools
import json
import re
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from evaluation.corpus import corpus_texts
from evaluation.tasks import get_task_family
from modeling_forge import ForgeConfig, ForgeForCausalLM
from modeling_forge.tokenization import build_tokenizer
from trainers.data import source_blocks

SOURCES = {"arithmetic": (1, 3), "code": (1, 2), "corpus": (1, 1)}


def forge_matmul_macs(config: ForgeConfig) -> int:
    """Per-token multiply-accumulates of Forge's linear layers, LM head excluded (one pass each, as Llama's)."""
    d, m, g = config.hidden_size, config.memory_size, config.gate_hidden_size
    layer = 4 * d * d + 3 * d * config.intermediate_size
    if config.memory_type != "none":
        layer += 2 * d * m + 2 * d * g + g * d
    f = config.trm_intermediate_size
    latent = (4 * d * d if config.trm_attention else 0) + 3 * d * f
    recursion = d * d + config.trm_max_steps * config.trm_cycles * (config.trm_micro_steps * latent + 3 * d * f)
    return config.num_hidden_layers * layer + (recursion if config.trm_max_steps else 0)


def matched_llama(config: ForgeConfig) -> LlamaForCausalLM:
    per_layer = 4 * config.hidden_size**2 + 3 * config.hidden_size * config.intermediate_size
    layers = max(1, round(forge_matmul_macs(config) / per_layer))
    llama = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=config.pad_token_id,
    )
    return LlamaForCausalLM(llama)


def answer_examples(
    tokenizer, family_name: str, n: int, seed: int, results: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, mask of the final-answer tokens) for held-out examples; the answer is the last occurrence of
    `example.answer` in the prompt + worked target. With `results`, the mask holds instead every number the worked
    solution computes (after each `= `): the arithmetic's own tokens, where the final answer only copies the last."""
    family = get_task_family(family_name)
    low, high = SOURCES[family_name]
    out = []
    for level in range(low, high + 1):
        for example in family.generate("test", n // (high - low + 1), seed=seed, difficulty=level):
            text = family.training_text(example)
            start = text.rfind(str(example.answer))
            if start < 0:
                continue
            enc = tokenizer(text, return_offsets_mapping=True)
            spans = [m.span(1) for m in re.finditer(r"= (-?\d+)", text)] if results else [(start, len(text))]
            mask = torch.tensor([e > s and any(a <= s and e <= b for a, b in spans) for s, e in enc["offset_mapping"]])
            if mask.any():
                out.append((torch.tensor(enc["input_ids"]), mask))
    return out


@torch.no_grad()
def answer_losses(model, examples, **kwargs) -> tuple[list[float], list[float]]:
    """Per example: mean CE over its answer tokens and whether every answer token is predicted (teacher-forced)."""
    losses, exact = [], []
    for ids, mask in examples:
        logits = model(ids[None], **kwargs).logits[0, :-1].float()
        targets, answer = ids[1:], mask[1:]
        ce = F.cross_entropy(logits[answer], targets[answer])
        losses.append(float(ce))
        exact.append(float((logits[answer].argmax(-1) == targets[answer]).all()))
    return losses, exact


def mean_scores(losses: list[float], exact: list[float]) -> list[float]:
    """Mean CE over answer tokens (per example, then over examples) and answer exact-match, rounded for the report."""
    return [round(sum(losses) / len(losses), 4), round(sum(exact) / len(exact), 4)]


def paired_gain(before: list[float], after: list[float]) -> dict:
    """Mean per-example change `after - before` and its standard error over the held-out examples: how much of a
    gain's spread between seeds the finite evaluation set alone would explain."""
    diffs = torch.tensor(after) - torch.tensor(before)
    se = float(diffs.std() / len(diffs) ** 0.5) if len(diffs) > 1 else float("nan")
    return {"gain": round(float(diffs.mean()), 4), "se": round(se, 4), "examples": len(diffs)}


@torch.no_grad()
def block_loss(model, blocks, **kwargs) -> float:
    ids, labels = blocks
    logits = model(ids, **kwargs).logits[:, :-1].float()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100))


@torch.no_grad()
def act_statistics(model, blocks, steps: int) -> dict:
    ids, labels = blocks
    halting = model(ids, labels=labels, act_halting=True)
    every = model(ids, labels=labels, act_halting=False)
    real = labels != -100
    halts = halting.halt_steps[real].float()
    return {
        "mean_steps": float(halts.mean()),
        "share_per_step": [round(float((halts == t).float().mean()), 3) for t in range(steps + 1)],
        "loss_act": float(halting.step_losses[-1]),
        "loss_every_step": float(every.step_losses[-1]),
    }


@torch.no_grad()
def answer_halting(model, examples, steps: int) -> dict:
    """ACT steps at the positions that predict the final-answer tokens (the hard tokens) and at the other positions of
    the same held-out examples (their easy template text)."""
    answer, other = [], []
    for ids, mask in examples:
        halts = model(ids[None], act_halting=True).halt_steps[0, :-1].float()  # position t predicts token t+1
        answer.append(halts[mask[1:]])
        other.append(halts[~mask[1:]])
    answer, other = torch.cat(answer), torch.cat(other)
    share = lambda h: [round(float((h == t).float().mean()), 3) for t in range(steps + 1)]  # noqa: E731
    return {"answer_mean_steps": float(answer.mean()), "answer_share_per_step": share(answer),
            "other_mean_steps": float(other.mean()), "other_share_per_step": share(other)}  # fmt: skip


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks with ties sharing their mean rank (Spearman's correlation over discrete halting steps needs it).
    Written here because scipy, whose `spearmanr` does this, is not a dependency of the project."""
    _, inverse, counts = values.unique(return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).float()
    return ((ends - counts.float() + 1 + ends) / 2)[inverse]


@torch.no_grad()
def halting_by_difficulty(model, held_out: dict, steps: int, bins: int = 4) -> dict:
    """ACT steps against how hard each real token is for the backbone (its loss at step 0, no refinement), pooled
    over the sources and cut into equal-count bins, easiest first: does ACT spend its steps on the hard tokens? Also
    each bin's source mix and mean gain from running every step (step-0 loss minus every-step loss)."""
    names, halts, base, full = [], [], [], []
    for index, (ids, labels) in enumerate(held_out.values()):
        real = labels[:, 1:] != -100
        targets = labels[:, 1:][real]
        halts.append(model(ids, act_halting=True).halt_steps[:, :-1][real].float())
        for losses, k in ((base, 0), (full, steps)):
            logits = model(ids, act_halting=False, recursion_steps=k).logits[:, :-1][real].float()
            losses.append(F.cross_entropy(logits, targets, reduction="none"))
        names.append(torch.full_like(targets, index))
    halts, base, full, names = torch.cat(halts), torch.cat(base), torch.cat(full), torch.cat(names)
    order = base.argsort()
    rows = []
    for chunk in order.chunk(bins):
        rows.append({
            "loss_step0": round(float(base[chunk].mean()), 4),
            "gain_every_step": round(float((base[chunk] - full[chunk]).mean()), 4),
            "mean_steps": round(float(halts[chunk].mean()), 3),
            "share_per_step": [round(float((halts[chunk] == t).float().mean()), 3) for t in range(steps + 1)],
            "sources": {s: round(float((names[chunk] == i).float().mean()), 3) for i, s in enumerate(held_out)},
        })  # fmt: skip
    spearman = float(torch.corrcoef(torch.stack([average_ranks(base), average_ranks(halts)]))[0, 1])
    return {"bins": rows, "spearman_loss_steps": round(spearman, 3)}


def tensors(blocks) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([b[0] for b in blocks]), torch.tensor([b[1] for b in blocks])


def tiny_forge(tokenizer, length: int, **overrides) -> ForgeForCausalLM:
    """The tiny preset for this tokenizer and block length, with `ForgeConfig` overrides."""
    config = ForgeConfig.from_preset("tiny", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                     max_position_embeddings=length, **overrides)  # fmt: skip
    return ForgeForCausalLM(config)


def parse_overrides(items: list[str]) -> dict:
    """`--set FIELD=VALUE ...` (JSON values) as a dict."""
    return {key: json.loads(value) for key, value in (item.split("=", 1) for item in items)}


def train_step(model, optimizer, schedule, blocks) -> None:
    """One optimizer step on a batch of blocks, gradients clipped at norm 1: every model here trains alike."""
    ids, labels = tensors(blocks)
    model(input_ids=ids, labels=labels).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-examples", type=int, default=60)
    parser.add_argument("--refiner-lr-scale", type=float, default=1.0,
                        help="learning rate of the recursion (refiner and Q-head) relative to --lr")  # fmt: skip
    parser.add_argument("--refiner-init-std", type=float, default=0.0,
                        help="start the refiner's zero-initialised output projections at this std")  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the models' initialisation and the batch order "
                        "(held-out data and tokenizer do not change); 0 reproduces the README rows")  # fmt: skip
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="ForgeConfig overrides (JSON) of the recursive Forge, e.g. trm_cycles=2")  # fmt: skip
    parser.add_argument(
        "--thresholds",
        type=float,
        nargs="*",
        default=[0.3, 0.7, 0.9],
        help="other act_threshold values to evaluate the same trained model under",
    )
    parser.add_argument("--mixture", nargs="*", default=[], metavar="SOURCE=WEIGHT",
                        help="training mix of the sources (default equal thirds), e.g. the reasoning specialisation's "
                        "arithmetic=2 code=1.5; every model trains on it")  # fmt: skip
    parser.add_argument("--models", type=int, nargs="*", help="train only these models (0: Forge, 1: no recursion, "
                        "2: Llama); data and seeds do not depend on the choice")  # fmt: skip
    args = parser.parse_args()
    if args.refiner_lr_scale <= 0:
        parser.error(f"--refiner-lr-scale must be > 0, got {args.refiner_lr_scale}; use 1 for the shared rate")
    if args.refiner_init_std < 0:
        parser.error(f"--refiner-init-std must be >= 0, got {args.refiner_init_std}; use 0 for the zero init")
    torch.manual_seed(0)
    tokenizer = build_tokenizer(corpus_texts("train", max_chars=300_000), vocab_size=512)
    n_blocks = args.steps * args.batch
    train = []
    mixture = {source: 1.0 for source in SOURCES}
    for item in args.mixture:
        source, _, weight = item.partition("=")
        if source not in SOURCES or not weight:
            parser.error(f"--mixture takes SOURCE=WEIGHT with SOURCE in {sorted(SOURCES)}, got {item!r}")
        mixture[source] = float(weight)
    for source, difficulty in SOURCES.items():
        share = round(n_blocks * mixture[source] / sum(mixture.values()))
        train += source_blocks(source, tokenizer, block_size=args.length, n_blocks=share,
                               split="train", seed=0, difficulty=difficulty)  # fmt: skip
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    train = [train[i] for i in order]
    held_out = {
        source: tensors(
            source_blocks(
                source, tokenizer, block_size=args.length, n_blocks=32, split="test", seed=1, difficulty=difficulty
            )
        )  # fmt: skip
        for source, difficulty in SOURCES.items()
    }
    calibration = {  # validation split: the data `calibrate_act_threshold` picks a threshold on
        source: tensors(
            source_blocks(
                source,
                tokenizer,
                block_size=args.length,
                n_blocks=32,
                split="validation",
                seed=2,
                difficulty=difficulty,
            )
        )
        for source, difficulty in SOURCES.items()
    }
    answers = {name: answer_examples(tokenizer, name, args.eval_examples, seed=1) for name in ("arithmetic", "code")}
    answers["arithmetic_results"] = answer_examples(tokenizer, "arithmetic", args.eval_examples, seed=1, results=True)

    def forge(**overrides):
        return tiny_forge(tokenizer, args.length, **overrides)

    torch.manual_seed(args.seed)
    recursive = forge(**parse_overrides(args.set))
    if args.refiner_init_std:
        for module in recursive.model.recursion.refiner.modules():
            if getattr(module, "forge_init", None) == 0.0:
                torch.nn.init.normal_(module.weight, std=args.refiner_init_std)
    models = {
        "forge (recursion + ACT)": recursive,
        "forge trm_max_steps=0": forge(trm_max_steps=0),
        "llama, compute-matched": matched_llama(recursive.config),
    }
    if args.models:
        models = {name: model for i, (name, model) in enumerate(models.items()) if i in args.models}
    results = {}
    for name, model in models.items():
        torch.manual_seed(args.seed)
        model.train()
        named = list(model.named_parameters())
        groups = [{"params": [p for n, p in named if not n.startswith("model.recursion.")]}]
        recursion = [p for n, p in named if n.startswith("model.recursion.")]
        if recursion:  # the refiner and the Q-head, at their own learning rate (a lever; 1.0 by default)
            groups.append({"params": recursion, "lr": args.lr * args.refiner_lr_scale})
        optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50))
        start = time.perf_counter()
        for step in range(args.steps):
            train_step(model, optimizer, schedule, train[step * args.batch : (step + 1) * args.batch])
        seconds = time.perf_counter() - start
        model.eval()
        row = {"params": sum(p.numel() for p in model.parameters()), "train_seconds": round(seconds, 1)}
        if isinstance(model, LlamaForCausalLM):
            row["layers"] = model.config.num_hidden_layers
        row["loss"] = {source: round(block_loss(model, blocks), 4) for source, blocks in held_out.items()}
        for family, examples in answers.items():
            row[f"{family}_answer"] = mean_scores(*answer_losses(model, examples))
        if isinstance(model, ForgeForCausalLM) and model.config.trm_max_steps:
            steps = model.config.trm_max_steps
            per_step, computed = {}, {}  # computed: per-example losses on the computed numbers, for the paired gain
            for k in range(steps + 1):
                kwargs = {"act_halting": False, "recursion_steps": k}
                scores = {family: answer_losses(model, examples, **kwargs) for family, examples in answers.items()}
                computed[k] = scores["arithmetic_results"][0]
                per_step[k] = {
                    "loss": {s: round(block_loss(model, b, **kwargs), 4) for s, b in held_out.items()},
                    **{f"{family}_answer": mean_scores(*pair) for family, pair in scores.items()},
                }  # fmt: skip
            row["per_inference_steps"] = per_step
            row["computed_gain"] = paired_gain(computed[0], computed[steps])
            row["act"] = {source: act_statistics(model, blocks, steps) for source, blocks in held_out.items()}
            row["act_answers"] = {family: answer_halting(model, answers[family], steps) for family in answers}
            row["act_by_difficulty"] = halting_by_difficulty(model, held_out, steps)
            threshold, row["act_thresholds"] = model.config.act_threshold, {}
            for value in args.thresholds:  # the same trained model under other specialisation thresholds
                model.config.act_threshold = value
                row["act_thresholds"][value] = {s: act_statistics(model, b, steps) for s, b in held_out.items()}
            model.config.act_threshold = threshold
            calibrated = model.calibrate_act_threshold(calibration, max_loss_increase=0.01)  # on validation blocks
            row["act_calibrated"] = {"threshold": calibrated["threshold"]}
            if calibrated["threshold"] is not None:  # its cost on the test blocks, which it has not seen
                row["act_calibrated"]["test"] = {s: act_statistics(model, b, steps) for s, b in held_out.items()}
            model.config.act_threshold = threshold
        results[name] = row
        print(name, json.dumps(row), flush=True)

    lr = f"{args.lr}" + (f" (recursion x{args.refiner_lr_scale:g})" if args.refiner_lr_scale != 1.0 else "")
    print(f"\n{args.steps} steps x {args.batch} x {args.length} tokens, AdamW lr {lr}, same batches for all")
    header = ("model", "params", "time", "arith", "code", "corpus", "ans.CE", "ans.EM")
    print(f"{header[0]:>26} " + " ".join(f"{h:>7}" for h in header[1:]))
    for name, row in results.items():
        loss = row["loss"]
        print(f"{name:>26} {row['params'] / 1e6:7.2f}M {row['train_seconds']:6.0f}s {loss['arithmetic']:7.4f} "
              f"{loss['code']:7.4f} {loss['corpus']:7.4f} {row['arithmetic_answer'][0]:7.4f} "
              f"{row['arithmetic_answer'][1]:7.3f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    row = results.get("forge (recursion + ACT)")
    if row is None or "per_inference_steps" not in row:  # not trained, or run without recursion (`trm_max_steps=0`)
        return
    print("\nsame trained Forge, k steps at inference (ACT off): loss arithmetic / code / corpus, answer CE / EM")
    for k, values in row["per_inference_steps"].items():
        loss = values["loss"]
        print(f"  k={k}: {loss['arithmetic']:.4f} / {loss['code']:.4f} / {loss['corpus']:.4f}   "
              f"{values['arithmetic_answer'][0]:.4f} / {values['arithmetic_answer'][1]:.3f}")  # fmt: skip
    print("per step (ACT off), the issue's goals: monotone (every extra step lowers the loss) and final step - step 0")
    per_step = list(row["per_inference_steps"].values())
    token_sets = {"arithmetic": "arithmetic answer tokens", "code": "code answer tokens",
                  "arithmetic_results": "arithmetic computed tokens"}  # fmt: skip
    for label, values in [(f"{s} (whole examples)", [v["loss"][s] for v in per_step]) for s in SOURCES] + [
        (token_sets[f], [v[f"{f}_answer"][0] for v in per_step]) for f in answers
    ]:
        monotone = all(b < a for a, b in itertools.pairwise(values))
        print(f"  {label:>28}: {' / '.join(f'{v:.4f}' for v in values)}  monotone {'yes' if monotone else 'no '}  "
              f"final - step 0 {values[-1] - values[0]:+.4f} nats")  # fmt: skip
    gain = row["computed_gain"]
    print(
        f"  computed tokens, final - step 0 per held-out example: {gain['gain']:+.4f} nats, standard error "
        f"{gain['se']:.4f} over {gain['examples']} examples (the evaluation set's own noise)"
    )
    print("\nACT (real tokens): mean steps, share halting at step 0..T, loss with ACT vs every step")
    for source, stats in row["act"].items():
        cost = stats["loss_act"] / stats["loss_every_step"] - 1
        print(f"  {source:>10}: {stats['mean_steps']:.2f} of {len(stats['share_per_step']) - 1}  "
              f"{stats['share_per_step']}  {stats['loss_act']:.4f} vs {stats['loss_every_step']:.4f} "
              f"({100 * cost:+.2f}%)")  # fmt: skip
    act = row["act"].values()
    mean_steps = sum(stats["mean_steps"] for stats in act) / len(row["act"])
    cost = sum(stats["loss_act"] for stats in act) / sum(stats["loss_every_step"] for stats in act) - 1
    steps = len(next(iter(act))["share_per_step"]) - 1
    print(f"  {'all':>10}: {mean_steps:.2f} of {steps} ({100 * mean_steps / steps:.0f}%), summed loss "
          f"{100 * cost:+.2f}% vs every step")  # fmt: skip
    for value, by_source in row["act_thresholds"].items():
        stats = by_source.values()
        mean_steps = sum(item["mean_steps"] for item in stats) / len(by_source)
        cost = sum(item["loss_act"] for item in stats) / sum(item["loss_every_step"] for item in stats) - 1
        per_source = " / ".join(f"{item['mean_steps']:.2f}" for item in stats)
        costs = " / ".join(f"{100 * (item['loss_act'] / item['loss_every_step'] - 1):+.1f}%" for item in stats)
        print(f"  act_threshold {value}: mean steps {per_source} (all {100 * mean_steps / steps:.0f}%), summed loss "
              f"{100 * cost:+.2f}% vs every step (per source {costs}: corpus's loss dominates the sum)")  # fmt: skip
    calibrated = row["act_calibrated"]
    if calibrated["threshold"] is None:
        print("  calibrated on validation blocks (1% per source): no candidate threshold within budget")
    else:
        stats = calibrated["test"].values()
        mean_steps = sum(item["mean_steps"] for item in stats) / len(stats)
        costs = " / ".join(f"{100 * (item['loss_act'] / item['loss_every_step'] - 1):+.2f}%" for item in stats)
        per_source = " / ".join(f"{item['mean_steps']:.2f}" for item in stats)
        print(
            f"  calibrated on validation blocks (1% per source): act_threshold {calibrated['threshold']}; test "
            f"blocks: mean steps {per_source} (all {100 * mean_steps / steps:.0f}%), loss vs every step {costs}"
        )
    print("ACT at the final-answer tokens (hard) vs the rest of the same held-out examples (template text):")
    for family, stats in row["act_answers"].items():
        print(f"  {family:>10}: answers {stats['answer_mean_steps']:.2f} {stats['answer_share_per_step']}, "
              f"rest {stats['other_mean_steps']:.2f} {stats['other_share_per_step']}")  # fmt: skip
    difficulty = row["act_by_difficulty"]
    print("ACT by difficulty: real tokens of every source pooled, in quarters by their step-0 loss (easiest first): "
          f"step-0 loss, gain from every step, mean steps, share halting at 0..T, source mix (Spearman loss vs steps "
          f"{difficulty['spearman_loss_steps']:+.3f})")  # fmt: skip
    for item in difficulty["bins"]:
        mix = " / ".join(f"{share:.2f}" for share in item["sources"].values())
        print(f"  {item['loss_step0']:7.3f}  {item['gain_every_step']:+.4f}  {item['mean_steps']:.2f}  "
              f"{item['share_per_step']}  {mix}")  # fmt: skip


if __name__ == "__main__":
    main()
