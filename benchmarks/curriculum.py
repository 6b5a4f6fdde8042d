"""Does Phase 5 teach a small model to code? Phase 5 on a tiny Forge that already solves some code tasks.

Trains a tiny Forge on level 1-2 reference solutions of the code family (`--base-steps` with a cosine schedule, then
`--base-extra-steps` at a constant lr: the cosine run alone plateaus before the model learns to copy constants from
the docstring), then runs Phase 5 (`run_phase5`, the shipped machinery) from it with dreams on and off, per seed:
placement over `--levels` picks the start level nearest 50% pass@1 and two levels are trained from there. Prints, per
run: placement, held-out greedy pass@1 per trained level before/after, the pool size per round, backward transfer on
the first trained level (BWT, as in LAMOL: its success at the end minus right after training it), wall time and
sandbox throughput; then the dreams on-off difference of BWT per seed.

    OMP_NUM_THREADS=1 nice python benchmarks/curriculum.py --base-extra-steps 500   # ~55 min on a busy 2-core CPU
    OMP_NUM_THREADS=1 nice python benchmarks/curriculum.py --base-extra-steps 500 --seeds 0 1 2 --rounds 6
    # the hint ladder against a control of as many prose-only retries, and the rung/format probe (no training):
    OMP_NUM_THREADS=1 nice python benchmarks/curriculum.py --base-extra-steps 200 --rounds 6 --epochs 4 --lr 5e-4 \
        --seeds 0 1 --dreams on --hint-fractions 0 0.5 1 --hint-format prefix --hinted-variants
    # the training step: verified constant variants per success and an experience buffer (control: 0 variants)
    OMP_NUM_THREADS=1 nice python benchmarks/curriculum.py --base-extra-steps 200 --rounds 6 --epochs 1 --lr 1e-3 \
        --optimizer adamw --seeds 0 1 --dreams on --hint-fractions 0 0.5 1 --hint-format prefix --hinted-variants \
        --no-prose-control --levels 3 6 --success-variants 8 --experience-buffer 400
    # the setting that met +0.20 on both trained levels for 4 seeds (stratified pool, the default; dreams off)
    OMP_NUM_THREADS=1 nice python benchmarks/curriculum.py --base-extra-steps 200 --rounds 6 --epochs 1 --lr 1e-3 \
        --optimizer adamw --seeds 0 1 2 3 --dreams off --hint-fractions 0 0.5 1 --hint-format prefix \
        --hinted-variants --no-prose-control --levels 3 6 --success-variants 16 --experience-buffer 400
    # verified dreams (the defaults) against dreams off, same flags, one seed per invocation
    OMP_NUM_THREADS=1 nice python benchmarks/curriculum.py --base-extra-steps 200 --rounds 6 --epochs 1 --lr 1e-3 \
        --optimizer adamw --seeds 0 --dreams both --hint-fractions 0 0.5 1 --hint-format prefix \
        --hinted-variants --no-prose-control --levels 3 6 --success-variants 16 --experience-buffer 400
    OMP_NUM_THREADS=1 nice python benchmarks/curriculum.py --base-extra-steps 200 --probe --eval-problems 16 \
        --levels 1 4 --hint-fractions 0 0.5 1

Measured (base 400 + 500 steps, `--rounds 8 --epochs 4 --lr 2e-3`, seeds 0 and 1, a shared 2-core CPU): placement
started at L3 / L2; the pools shrank (L3 16 -> 10, L2 16 -> 1) and then stalled on tasks the model failed even with
hints; held-out pass@1 of the trained levels changed by -0.125 to +0.042 (the +0.20 goal is not met); BWT dreams on
minus off +0.042 in both seeds, i.e. one held-out problem (within noise); 56-80 s per run, 9-11 programs/s.

Measured, hint ladder (base 400 + 200 steps, reduced from 500 to fit a session; 6 rounds of 16 tasks, dreams on;
held-out greedy pass@1 of the input L1 0.625, L2 0.625, L3 0.17-0.25, L4 0; each ladder run is paired with a control
of three prose-only retries on the same base and seed; a shared 2-core CPU at load 7-9, runs under `nice`).
Probe (`--probe`, no training): among training tasks the base fails at temperature 0.8, one retry solves with the
prose hint / + half the reference / + all of it, as a code prefix: L1 1 / 1 / 11 of 11, L2 2 / 3 / 15 of 15, L3
0 / 1 / 9 of 12, L4 0 / 0 / 5 of 16; as comment lines: at most 2 per level at any rung. A tiny model continues code
but does not copy commented code, so `prefix` is the format (before the whole-solution rung kept its final newline
in the context, it extended the last line on unseen templates: L3 3 of 12, L4 0 of 16).
Phase 5, `--hint-fractions 0 0.5 1 --hinted-variants --epochs 4 --lr 5e-4`, seeds 0 / 1:
levels 1-2 and 2-3 (placement L1 / L2): hinted successes per rung 3 / 9 / 84 and 10 / 6 / 83 (control 10 / 6 / 6
and 4 / 2 / 4); unaided loop successes 75 vs 61 and 62 vs 44; pools L1 16 -> 12, L2 16 -> 9 (control 15, 11) and L2
16 -> 13, L3 16 -> 13 (control 15, 13); held-out pass@1 change L1 +0.000 (control +0.125), L2 +0.000 (+0.000); L2
+0.042 (-0.042), L3 -0.042 (-0.042). `--levels 3 6` (placement L3, levels 3-4): 90 and 84 hinted successes from
the whole-solution rung (control 0 and 1); held-out L3 +0.000 (control +0.042) and +0.000 (+0.000), L4 0 -> 0 in
every run; at `--lr 2e-3` (seed 0) 164 from that rung, L3 +0.083 (control +0.000), L4 0 -> 0. The ladder
multiplies the verified pairs on failed tasks, but held-out success does not move beyond one or two of 24 problems:
the +0.20 goal is still not met. More training hurts: at `--lr 1e-3 --epochs 8` (seed 0) the ladder lost L1 -0.250,
L2 -0.417 (control -0.042, -0.208); at `--lr 2e-3` on levels 1-3 (no `--hinted-variants`) the ladder lost -0.167
to -0.375 and the control +0.125 to -0.250. The errors are miscopied constants
(`return a + b + 976` for 966; the input got 15 of 24 L1 problems, the ladder model 9): a few epochs on a few dozen
instances per round teach their constants, not the copying. The L1-L3 runs above predate the final-newline fix
(it changes only the whole-solution rung); rerun with it (seed 0, `--dreams both`): L1 +0.000, L2 -0.125 (control
+0.125, +0.000) with dreams, L1 -0.042, L2 -0.125 (control +0.042, -0.042) without; BWT on L1 with the ladder,
dreams on minus off, +0.042 = one held-out problem (noise). Fewer passes, `--epochs 1 --lr 1e-3`, seeds 0 / 1:
L1 +0.167, L2 +0.042 (control +0.125, +0.000) and L2 +0.000, L3 -0.042 (control +0.083, +0.000), 87 and 111
hinted successes from the whole-solution rung: the best single run of the ladder, but its control gains nearly as
much and the other seed does not. 38-135 s per run, 6.8-26 programs/s (generation included; the machine's load
varied).

Measured, the training step (`success_variants`, `experience_buffer`; same base, per-seed runs of `--seeds 0` and
`--seeds 1`, dreams on, the ladder as above with `--hinted-variants --no-prose-control --levels 3 6`: placement L3,
levels 3-4 trained; input held-out L3 0.417 / 0.375, L4 0; a shared 2-core CPU, two runs at once):
    --epochs 4 --lr 5e-4 --success-variants 0 8                        L3/L4 gain -0.125/0, 0/0; with 8: -0.125/+0.042,
                                                                       +0.042/+0.042
    --epochs 2 --lr 1e-3 --optimizer adamw --success-variants 0 8      -0.208/0, -0.208/0; with 8: -0.042/+0.125,
                                                                       +0.083/+0.083
    --epochs 1 --lr 1e-3 --optimizer adamw --success-variants 8 --experience-buffer 400
                                                                       +0.250/+0.333 (seed 0), +0.125/+0.083 (seed 1)
    the same with --success-variants 0 (the buffer alone)              -0.125/0, -0.208/+0.042
Training on a round's few dozen instances lowers held-out success (their constants are learned, not the copying);
8 verified constant-rewritten variants per success (1,400-1,500 per run, >= 98% of rewrites pass) remove that loss,
and replaying the level's earlier verified pairs each round on top of them (not alone) lifts both levels: +0.20 is
met on both levels for seed 0, not for seed 1. Pools still barely shrink (16 -> 15): unaided successes at
temperature 0.8 stay rare. On levels 1-2 (`--levels 1 6`, input >= 0.71, little headroom) at `--epochs 4 --lr 5e-4`:
L1/L2 -0.042/-0.125 and -0.208/-0.042 without variants, -0.125/+0.083 and +0.000/+0.042 with 8. 400-700 s per run
with variants, 100-210 s without.

Measured, the pool and the dreams (the base rebuilt on a later main, so its inputs differ from the runs above: held-out
L3 0.500 / 0.250 / 0.292 for seeds 0 / 1 / 2, L4 0; one seed per invocation, `--seeds S`, with the common flags
`--base-extra-steps 200 --rounds 6 --hint-fractions 0 0.5 1 --hint-format prefix --hinted-variants
--no-prose-control --levels 3 6 --epochs 1 --lr 1e-3 --optimizer adamw --success-variants 8 --experience-buffer 400`;
placement L3 in every run, levels 3-4 trained). Held-out pass@1 gain L3/L4 for seeds 0, 1, 2 (one problem = 0.042):
    --pool-sampling random --dreams on (setting (c) above)      +0.167/+0.333, +0.292/+0.167, +0.083/+0.042
    --pool-sampling random --dreams on --temperature 0.5        +0.125/+0.167, +0.250/+0.250
    --dreams on (stratified pool, the default now)              +0.125/+0.292, +0.333/+0.083, +0.250/+0.167
    --dreams on --dream-temperature 1.0                         +0.208/+0.167, +0.292/+0.167
    --dreams off                                                +0.250/+0.417, +0.458/+0.208, +0.333/+0.125
    --dreams off --rounds 8                                                                   +0.333/+0.083
    --dreams off --success-variants 16                          +0.292/+0.542, +0.375/+0.292, +0.208/+0.250;
                                                                seed 3 (input L3 0.333): +0.334/+0.500
    --dreams on --success-variants 16                           +0.208/+0.167, +0.250/+0.333, +0.333/+0.125;
                                                                seed 3: +0.250/+0.417
A random pool of 16 holds 6-8 of the level's 8 templates: seed 2's misses `clamp`, which 7 of its 24 held-out L3
problems use; the stratified pool holds all 8 (seed 2: +0.083/+0.042 -> +0.250/+0.167; seeds 0 and 1 move within
noise). The dream epoch (16 replays at temperature 1.5 and 16 reference solutions, 4 steps) raised the validation
reference NLL at all 6 levels of the stratified runs (e.g. 0.153 -> 0.214, 0.265 -> 0.348) and lowered the final
held-out success: with dreams off, +0.20 is met on both levels for seeds 0 and 1, and on L3 only for seed 2 (L4 +0.125;
8 rounds: +0.083); with dreams off and 16 variants per success it is met on both levels for all 4 seeds (0-3) (the tiny
YAML now uses 16; pools L3 16 -> 11-12, L4 16 -> 12-15; 290-300 s per run, 35-39 programs/s). BWT on L3 (its success at
the end minus right after L3; L4's pool holds L3 templates, so it rises), dreams on / off: +0.083 / +0.125, +0.375 /
+0.292, +0.083 / +0.083: on minus off -0.042, +0.083, +0.000; with 16 variants +0.125 / +0.208, -0.042 / +0.000, +0.083
/ -0.042, +0.083 / +0.167 (seed 3): on minus off -0.083, -0.042, +0.125, -0.083. Dreams as built do not change BWT
beyond noise and lower held-out success: over the 7 paired runs, L3 -0.071 and L4 -0.107 on average (lower in 6 and 5
of 7); filtering the dreams through the sandbox is the next thing to measure. Pools shrink a little: L3 16 -> 12-14, L4
16 -> 15-16 (temperature 0.5: 10-11 and 14-15; 8 rounds, seed 2: L3 16 -> 9). Two runs at once on a 2-core CPU shared
with other jobs (load ~5): 435-583 s per run, 14-19 programs/s through generation and sandbox; alone on an idle machine
(the 8-round run): 208 s, 36 programs/s.

Before the verified dreams, `--dreams on` ran what is now `--dream-filter none --dream-temperature 1.5
--dream-samples-per-task 1 --dream-levels all --dream-lr-scale 1 --dream-samples 16`: every "dreams on" figure above
is of that setting.

Measured, verified dreams (the base rebuilt once more: held-out L3 0.458 / 0.417 / 0.250 / 0.417 / 0.292 / 0.333 for
seeds 0-5, L4 0; the common flags of the 16-variant runs above with `--success-variants 16 --seeds S`, and the dream
flags named; placement L3, levels 3-4 trained; one run at a time under `nice` on a 2-core CPU shared with other jobs,
load 2-5).
Dreams off: gain L3 / L4 +0.292 / +0.458, +0.250 / +0.333, +0.333 / +0.208, +0.291 / +0.458, +0.500 / +0.250, +0.292 /
+0.500; BWT on L3 +0.083, +0.125, +0.042, +0.167, +0.083, 0.000. Dreams on, minus off (L3 gain, L4 gain, BWT; one
problem = 0.042):
    --dream-levels all --dream-lr-scale 1 --dream-samples 16 (verified, seed 0)      -0.292, -0.083, -0.208
    --dream-levels earlier --dream-lr-scale 1 --dream-samples 16 (seed 0)             -0.083,  0.000, -0.083
    --dream-levels earlier --dream-lr-scale 0.3 --dream-samples 64 (the defaults)     seeds 0-5: L3 +0.125, +0.041,
        0.000, -0.041, 0.000, +0.083 (mean +0.035); L4 0, 0, 0, 0, 0, +0.083; BWT +0.125, +0.042, 0.000, -0.042,
        0.000, +0.083 (mean +0.035)
    the same with --dream-variants 4 (seeds 0-3)                                      L3 +0.042, +0.041, +0.084,
        -0.041 (mean +0.032); L4 -0.041, 0, 0, +0.042; BWT +0.042, +0.042, +0.083, -0.042 (mean +0.031)
    --dream-levels all --dream-lr-scale 0.3 --dream-samples 64 (seeds 0-3)            L3 +0.083, +0.041, 0.000,
        -0.041 (mean +0.021); L4 -0.041, -0.041, +0.042, +0.125 (mean +0.021); BWT +0.084, -0.042, -0.042, 0.000
        (mean 0.000)
A dream epoch is a few steps with a fresh AdamW state, whose first steps move every weight by about the learning rate
whatever its gradient: at the loop's rate (1e-3) even verified dreams raised the held-out reference NLL (seed 0: L3
0.089 -> 0.099, L3+L4 0.208 -> 0.219) and lowered success; at 0.3x they lowered it in 5 of 6 runs (L3 after L4, seeds
0-5: 0.016 -> 0.015, 0.056 -> 0.038, 0.021 -> 0.009, 0.068 -> 0.066, 0.113 -> 0.086, 0.122 -> 0.123; `all`, seed 0:
0.089 -> 0.038 and 0.162 -> 0.145), with variants in 3 of 4 (0.016 -> 0.010, 0.056 -> 0.043, 0.021 -> 0.007; seed 3
0.068 -> 0.076). Of 256 dreams per epoch (64 L3 tasks x 4 samples at temperature 1.0) 135-167 passed their tests and
41-51 distinct programs were kept. With `dream_levels: earlier` the two runs are identical until the dream after L4, so
on minus off is that dream's own effect: held-out success with dreams on is at least that with dreams off on average
(L3 +0.035, L4 +0.014, where the old dreams lost 0.071 and 0.107), and BWT is higher by +0.035 on average, 3 of 6 seeds
higher, 2 equal, one lower: less than one held-out problem, within noise. Re-applying the seed-0 dream to the saved
dreams-off model in a separate process gave L3 0.750 (no change) where the run gave 0.875, so a single seed's
difference of a few problems is noise too. 175-280 s per run, 33-67 programs/s (generation included).

The base is full precision (the ternary path is exercised by the tests and the demo; its learning speed is not
measured here) and the bakes are off (they are measured by the prompt-baking tests, and cost minutes on this CPU).
"""

import argparse
import json
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, default_data_collator

from evaluation.corpus import corpus_texts
from evaluation.tasks import get_task_family
from modeling_forge import ForgeConfig, ForgeForCausalLM
from modeling_forge.tokenization import build_tokenizer
from trainers.base import ForgeTrainer
from trainers.curriculum_config import CurriculumConfig
from trainers.curriculum_trainer import ModelPolicy, ladder_completion, ladder_prompt, partial_solution, run_phase5
from trainers.data import pack_examples
from trainers.phase_output import save_phase_output
from trainers.teachers import get_teacher


def train_base(folder: Path, steps: int, n_examples: int) -> None:
    """A tiny Forge trained on `n_examples` level-1 and level-2 reference solutions (prompt + body) per level."""
    family = get_task_family("code")
    examples = [e for level in (1, 2) for e in family.generate("train", n_examples, seed=100, difficulty=level)]
    texts = [family.training_text(e) for e in examples]
    tokenizer = build_tokenizer(corpus_texts("train", max_chars=200_000) + texts, 1024)
    blocks = pack_examples(texts, tokenizer, 256)
    dataset = Dataset.from_dict({"input_ids": [b[0] for b in blocks], "labels": [b[1] for b in blocks]})
    special = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
               "bos_token_id": tokenizer.bos_token_id}  # fmt: skip
    torch.manual_seed(0)
    model = ForgeForCausalLM(ForgeConfig.from_preset("tiny", vocab_size=len(tokenizer), **special))
    args = TrainingArguments(output_dir=str(folder.parent / "base-work"), max_steps=steps,
                             per_device_train_batch_size=16, learning_rate=3e-3, lr_scheduler_type="cosine",
                             warmup_steps=min(50, steps // 10), report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, logging_steps=max(steps // 5, 1), seed=0)  # fmt: skip
    ForgeTrainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator).train()
    save_phase_output(folder, model=model, tokenizer=tokenizer, phase=4, phase_name="benchmark-base",
                      config={"steps": steps, "examples_per_level": n_examples}, seed=0, overwrite=True)  # fmt: skip


def continue_base(source: Path, folder: Path, steps: int, n_examples: int) -> None:
    """`steps` more steps on the same data at a constant lr 2e-3 (the cosine run plateaus before copying constants)."""

    family = get_task_family("code")
    examples = [e for level in (1, 2) for e in family.generate("train", n_examples, seed=100, difficulty=level)]
    tokenizer = AutoTokenizer.from_pretrained(source)
    blocks = pack_examples([family.training_text(e) for e in examples], tokenizer, 256)
    dataset = Dataset.from_dict({"input_ids": [b[0] for b in blocks], "labels": [b[1] for b in blocks]})
    model = AutoModelForCausalLM.from_pretrained(source)
    args = TrainingArguments(output_dir=str(folder.parent / "base-work"), max_steps=steps,
                             per_device_train_batch_size=16, learning_rate=2e-3, lr_scheduler_type="constant",
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             logging_steps=max(steps // 5, 1), seed=1)  # fmt: skip
    ForgeTrainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator).train()
    save_phase_output(folder, model=model, tokenizer=tokenizer, phase=4, phase_name="benchmark-base",
                      config={"continued_from": str(source), "steps": steps}, inputs=[source], seed=0,
                      overwrite=True)  # fmt: skip


def run(base: Path, output: Path, seed: int, dreams: bool, args, fractions: list[float] | None = None,
        variants: int = 0) -> dict:  # fmt: skip
    """Phase 5 from `base`; `fractions` is the hint ladder (None: one prose-hint retry, the shipped default);
    `variants` is `success_variants` (verified constant-rewritten variants trained per success)."""
    ladder = {} if fractions is None else {"hint_solution_fractions": fractions,
                                           "hint_solution_format": args.hint_format,
                                           "variant_after_hinted_success": args.hinted_variants}  # fmt: skip
    config = CurriculumConfig(**ladder, success_variants=variants, replay_share=args.replay_share,
        optimizer_type=args.optimizer, experience_buffer=args.experience_buffer, pool_sampling=args.pool_sampling,
        model_name_or_path=str(base), output_dir=str(output), overwrite=True, levels=args.levels, num_levels=2,
        placement_problems=8, placement_k=2, pool_size=args.pool, attempts_per_round=args.pool,
        max_rounds=args.rounds, eval_problems=args.eval_problems, max_new_tokens=24, temperature=args.temperature,
        train_epochs=args.epochs, bake={"steps": 0}, self_model_samples=1, self_model_bands=[4, 4], dreams=dreams,
        **_dream_overrides(args), learning_rate=args.lr,
        per_device_train_batch_size=8, seed=seed, use_cpu=True,
        report_to="none", disable_tqdm=True, thinking="off", placement_target=0.5,
    )  # fmt: skip
    started = time.time()
    summary = run_phase5(config)
    report = summary["report"]
    return {"seed": seed, "dreams": dreams, "wall_s": time.time() - started, "success": report["success"],
            "pools": {r["level"]: [x["pool_active"] for x in r["rounds"]] for r in report["records"]},
            "pool_templates": {r["level"]: r["pool"]["templates"] for r in report["records"]},
            "bwt": report["backward_transfer"]["bwt"], "totals": report["totals"],
            "dreams_per_level": {r["level"]: {k: r["dreams"].get(k) for k in ("generated", "passed", "kept", "real",
                                                                             "variants")}
                                 for r in report["records"] if r["dreams"]},
            "placement": {lv: v["pass@1"] for lv, v in report["placement"]["per_level"].items()},
            "first_level": report["levels"][0], "ladder": fractions, "variants": variants,
            "variant_pairs": report["totals"]["variant_pairs_trained"],
            "variant_candidates": report["totals"]["variant_candidates"],
            "rung_successes": report["totals"]["hinted_successes_per_rung"],
            "rung_attempts": report["totals"]["hinted_attempts_per_rung"]}  # fmt: skip


def _dream_overrides(args) -> dict:
    """The dream settings given on the command line (the others keep `CurriculumConfig`'s defaults)."""
    given = {"dream_temperature": args.dream_temperature, "dream_filter": args.dream_filter,
             "dream_samples_per_task": args.dream_samples_per_task, "dream_levels": args.dream_levels,
             "dream_lr_scale": args.dream_lr_scale, "dream_variants": args.dream_variants,
             "dream_samples": args.dream_samples, "dream_real_share": args.dream_real_share}  # fmt: skip
    return {k: v for k, v in given.items() if v is not None}


def _dream_tag(args) -> str:
    """The run folder's suffix for non-default dream settings."""
    tag = f"-dt{args.dream_temperature:g}" if args.dream_temperature is not None else ""
    tag += f"-df{args.dream_filter}" if args.dream_filter is not None else ""
    tag += f"-dk{args.dream_samples_per_task}" if args.dream_samples_per_task is not None else ""
    tag += f"-dl{args.dream_levels}" if args.dream_levels is not None else ""
    tag += f"-dlr{args.dream_lr_scale:g}" if args.dream_lr_scale is not None else ""
    tag += f"-dv{args.dream_variants}" if args.dream_variants is not None else ""
    tag += f"-drs{args.dream_real_share:g}" if args.dream_real_share is not None else ""
    return tag + (f"-ds{args.dream_samples}" if args.dream_samples is not None else "")


def probe_ladder(base: Path, args) -> None:
    """Which rung format does the model use? On `--eval-problems` training-split tasks per level that it fails at
    temperature 0.8, the share solved by one retry per fraction and format (no training), before any Phase 5."""
    family = get_task_family("code", require_isolation=True)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    policy = ModelPolicy(model, tokenizer, max_new_tokens=24, think=False)
    teacher = get_teacher("procedural")
    fractions = args.hint_fractions or [0.0, 0.5, 1.0]
    for level in range(args.levels[0], args.levels[1] + 1):
        examples = family.generate("train", args.eval_problems, seed=123, difficulty=level)
        first = [c[0] for c in policy.complete([e.prompt for e in examples], temperature=0.8, num_samples=1, seed=0)]
        results = family.run(examples, first)
        failed = [(e, c, r) for e, c, r in zip(examples, first, results, strict=True) if r is None or not r.passed]
        if not failed:
            print(f"probe L{level}: no failures among {len(examples)}")
            continue
        hints = teacher.hints([f[0] for f in failed], [f[2] for f in failed], [f[1] for f in failed], family)
        bodies = teacher.solutions([f[0] for f in failed])
        cells = []
        for form in ("prefix", "comment"):
            for fraction in fractions:
                partials = [partial_solution(b, fraction) for b in bodies]
                prompts = [ladder_prompt(f[0].prompt, h, p, form) for f, h, p in zip(failed, hints, partials,
                                                                                      strict=True)]  # fmt: skip
                outs = [c[0] for c in policy.complete(prompts, temperature=0.8, num_samples=1, seed=1)]
                ran = [ladder_completion(f[0].prompt, p, o, form) for f, p, o in zip(failed, partials, outs,
                                                                                     strict=True)]  # fmt: skip
                solved = sum(1 for r in family.run([f[0] for f in failed], ran) if r is not None and r.passed)
                cells.append(f"{form} {fraction:g}: {solved}/{len(failed)}")
        print(f"probe L{level} ({len(examples) - len(failed)}/{len(examples)} solved unaided), solved on one retry "
              f"among the failed: " + "; ".join(cells), flush=True)  # fmt: skip


def _print_run(result: dict) -> None:
    success = ", ".join(f"L{lv} {v['before']:.3f} -> {v['after']:.3f}" for lv, v in result["success"].items())
    pools = "; ".join(f"L{lv} {p} ({result['pool_templates'][lv]} templates)" for lv, p in result["pools"].items())
    totals = result["totals"]
    placed = ", ".join(f"L{lv} {p:.2f}" for lv, p in result["placement"].items())
    ladder = "prose hint x1" if result["ladder"] is None else f"ladder {result['ladder']}"
    rungs = "/".join(f"{s}/{a}" for s, a in zip(result["rung_successes"], result["rung_attempts"], strict=False))
    ladder += f", success_variants {result['variants']}" if result["variants"] else ""
    print(f"seed {result['seed']} dreams {'on ' if result['dreams'] else 'off'} {ladder}: placement pass@1 {placed} "
          f"-> start L{result['first_level']}; held-out pass@1 {success}; pool per round {pools}; hinted successes "
          f"per rung (of attempts) {rungs or 'none'}; verified variants trained {result['variant_pairs']} of "
          f"{result['variant_candidates']} rewritten; dreams kept/passed/generated (+ real) per level "
          f"{_dream_counts(result)}; BWT(first level) {_signed(result['bwt'])}; "
          f"{result['wall_s']:.0f} s; {totals['programs_run']} programs, loop {totals['loop_programs_per_s']:.2f} "
          "programs/s (generation included)", flush=True)  # fmt: skip


def _dream_counts(result: dict) -> str:
    cells = [f"L{lv} {d['kept']}/{'-' if d['passed'] is None else d['passed']}/{d['generated']} (+{d['real']}"
             + (f", +{d['variants']} variants)" if d.get("variants") else ")")
             for lv, d in result["dreams_per_level"].items()]  # fmt: skip
    return ", ".join(cells) or "none"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-steps", type=int, default=400, help="base training steps (batch 16 x 256 tokens)")
    parser.add_argument("--base-examples", type=int, default=1000, help="reference solutions per level in the base")
    parser.add_argument("--base-extra-steps", type=int, default=0, help="then this many at a constant lr 2e-3")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--levels", type=int, nargs=2, default=[1, 6], help="placement range; 2 levels are trained")
    parser.add_argument("--rounds", type=int, default=4, help="Phase 5 rounds per level")
    parser.add_argument("--epochs", type=float, default=2.0, help="passes over each round's training examples")
    parser.add_argument("--pool", type=int, default=16, help="tasks per level pool (all attempted each round)")
    parser.add_argument("--eval-problems", type=int, default=24, help="held-out test problems per level")
    parser.add_argument("--lr", type=float, default=1e-3, help="Phase 5 learning rate (MuGrokfast P5 preset: 5e-4)")
    parser.add_argument("--hint-fractions", type=float, nargs="+", default=None,
                        help="the hint ladder (shares of the reference body shown per retry), e.g. 0 0.5 1; each run "
                        "is then paired with a control of as many prose-only retries (fractions 0)")  # fmt: skip
    parser.add_argument("--hint-format", choices=("prefix", "comment"), default="prefix",
                        help="how the ladder shows the partial solution")  # fmt: skip
    parser.add_argument(
        "--hinted-variants",
        action="store_true",
        help="a hinted success replaces the task by a variant (ladder and its control alike)",
    )
    parser.add_argument("--success-variants", type=int, nargs="+", default=[0],
                        help="`success_variants` settings run per seed (same base, seed and loop), e.g. 0 8: the "
                        "first is the control")  # fmt: skip
    parser.add_argument("--no-prose-control", action="store_true",
                        help="with --hint-fractions, run only the ladder (no prose-only control)")  # fmt: skip
    parser.add_argument("--optimizer", choices=("mugrokfast", "adamw"), default="mugrokfast",
                        help="Phase 5 optimizer_type (mugrokfast: P5 preset; adamw: AdamW at --lr)")  # fmt: skip
    parser.add_argument("--experience-buffer", type=int, default=0, help="Phase 5 experience_buffer")
    parser.add_argument("--replay-share", type=float, default=0.25, help="Phase 5 replay_share")
    parser.add_argument("--pool-sampling", choices=("stratified", "random"), default="stratified",
                        help="Phase 5 pool_sampling (stratified: all the level templates)")  # fmt: skip
    parser.add_argument("--temperature", type=float, default=0.8, help="Phase 5 temperature of the loop's attempts")
    parser.add_argument("--dreams", choices=("both", "on", "off"), default="both", help="dream settings run")
    parser.add_argument("--dream-temperature", type=float, default=None,
                        help="Phase 5 dream_temperature (default: CurriculumConfig's)")  # fmt: skip
    parser.add_argument("--dream-filter", choices=("verified", "none"), default=None,
                        help="Phase 5 dream_filter (default: CurriculumConfig's, 'verified')")  # fmt: skip
    parser.add_argument("--dream-samples-per-task", type=int, default=None,
                        help="Phase 5 dream_samples_per_task (default: CurriculumConfig's)")  # fmt: skip
    parser.add_argument("--dream-levels", choices=("all", "earlier"), default=None,
                        help="Phase 5 dream_levels (default: CurriculumConfig's)")  # fmt: skip
    parser.add_argument("--dream-lr-scale", type=float, default=None,
                        help="Phase 5 dream_lr_scale (default: CurriculumConfig's)")  # fmt: skip
    parser.add_argument("--dream-variants", type=int, default=None,
                        help="Phase 5 dream_variants (default: CurriculumConfig's)")  # fmt: skip
    parser.add_argument("--dream-samples", type=int, default=None,
                        help="Phase 5 dream_samples, tasks dreamed about (default: CurriculumConfig's)")  # fmt: skip
    parser.add_argument("--dream-real-share", type=float, default=None,
                        help="Phase 5 dream_real_share, the real reference solutions' share of a dream epoch "
                        "(default: the config's; near 0 isolates the dreams from the real data)")  # fmt: skip
    parser.add_argument("--probe", action="store_true",
                        help="only measure, without training, how often one retry per ladder rung and format solves "
                        "the tasks the base fails (which format a tiny model uses)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path("outputs/bench/curriculum"))
    args = parser.parse_args()
    base = args.work / f"base-{args.base_steps}"
    if not base.exists():
        started = time.time()
        train_base(base, args.base_steps, args.base_examples)
        print(f"base: {args.base_steps} steps in {time.time() - started:.0f} s -> {base}")
    if args.base_extra_steps:
        continued = args.work / f"base-{args.base_steps}+{args.base_extra_steps}"
        if not continued.exists():
            started = time.time()
            continue_base(base, continued, args.base_extra_steps, args.base_examples)
            print(f"base: {args.base_extra_steps} more steps in {time.time() - started:.0f} s -> {continued}")
        base = continued
    if args.probe:
        probe_ladder(base, args)
        return
    results = []
    dream_settings = {"both": (True, False), "on": (True,), "off": (False,)}[args.dreams]
    ladders = [None] if args.hint_fractions is None else [[0.0] * len(args.hint_fractions), args.hint_fractions]
    if args.no_prose_control:
        ladders = ladders[-1:]
    for seed in args.seeds:
        for dreams in dream_settings:
            for fractions in ladders:
                for variants in args.success_variants:
                    tag = "" if fractions is None else "-ladder" + "_".join(f"{f:g}" for f in fractions) + \
                        args.hint_format + ("-hv" if args.hinted_variants else "")  # fmt: skip
                    tag += f"-sv{variants}" if variants else ""
                    tag += f"-t{args.temperature:g}" if args.temperature != 0.8 else ""
                    tag += f"-r{args.rounds}" + ("-random" if args.pool_sampling == "random" else "")
                    tag += f"-rs{args.replay_share:g}" if args.replay_share != 0.25 else ""
                    tag += _dream_tag(args) if dreams else ""
                    result = run(base, args.work / f"phase5-seed{seed}-dreams{int(dreams)}{tag}", seed, dreams,
                                 args, fractions, variants)  # fmt: skip
                    results.append(result)
                    _print_run(result)
    if len(args.success_variants) > 1:
        control = args.success_variants[0]
        print(f"\nsuccess_variants vs {control} (same base, seed, loop settings), held-out pass@1 gain over the input "
              "per trained level:")  # fmt: skip
        for seed in args.seeds:
            for dreams in dream_settings:
                for fractions in ladders:
                    runs = [r for r in results if r["seed"] == seed and r["dreams"] == dreams
                            and r["ladder"] == fractions]  # fmt: skip
                    cells = "; ".join(f"{r['variants']}: " + ", ".join(
                        f"L{lv} {v['before']:.3f}->{v['after']:.3f} ({v['gain']:+.3f})"
                        for lv, v in r["success"].items()) for r in runs)  # fmt: skip
                    print(f"  seed {seed} dreams {'on ' if dreams else 'off'}: {cells}")
    if args.hint_fractions is not None and len(ladders) > 1:
        print(f"\nHint ladder {args.hint_fractions} ({args.hint_format}) minus its prose-only control (same base, "
              "seed, rounds), held-out pass@1 gain per trained level:")  # fmt: skip
        for seed in args.seeds:
            for dreams in dream_settings:
                control, ladder = (next(r for r in results if r["seed"] == seed and r["dreams"] == dreams
                                        and r["ladder"] == f and r["variants"] == args.success_variants[-1])
                                   for f in ladders)  # fmt: skip
                gains = ", ".join(f"L{lv} {v['gain']:+.3f} (control {control['success'][lv]['gain']:+.3f})"
                                  for lv, v in ladder["success"].items() if lv in control["success"])  # fmt: skip
                print(f"  seed {seed} dreams {'on ' if dreams else 'off'}: {gains}")
    if len(dream_settings) < 2:
        (args.work / "results.json").write_text(json.dumps(results, indent=2))
        return
    print("\nBWT on the first trained level, dreams on minus off, per seed (positive = dreams forgot less):")
    for seed in args.seeds:
        on, off = (next(r for r in results if r["seed"] == seed and r["dreams"] == d and r["ladder"] == ladders[-1]
                        and r["variants"] == args.success_variants[-1]) for d in (True, False))  # fmt: skip
        if on["bwt"] is None or off["bwt"] is None:
            print(f"  seed {seed}: one level trained, no BWT")
            continue
        print(f"  seed {seed}: {on['bwt']:+.3f} - ({off['bwt']:+.3f}) = {on['bwt'] - off['bwt']:+.3f} "
              f"(one held-out problem = {1 / args.eval_problems:.3f})")  # fmt: skip
    (args.work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
