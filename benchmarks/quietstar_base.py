"""Do Quiet-STaR thoughts help a base that can already do the task? Phase 3 on a longer-trained tiny Forge.

The demo's Phase 3 starts from models trained for 150 steps, which cannot yet reuse tokens from context, so their
thoughts cannot carry anything. This trains a tiny Forge on the arithmetic family (worked steps) for `--steps`
steps, runs the shipped Phase 3 tiny preset on it and prints the recipe's own summary: answer NLL and greedy accuracy
with and without thoughts for the input, before and after RL, and the anti-theater checks.

    OMP_NUM_THREADS=1 python benchmarks/quietstar_base.py                  # 3,000 base steps, ~13 min on 2 CPU cores
    OMP_NUM_THREADS=1 python benchmarks/quietstar_base.py --steps 300      # a smoke run

Measured (3,000 steps): the base answers 78% of the validation problems; after Phase 3, 94% with thoughts. With
`--plain-fraction 0` (step 1 bakes thought-laden examples only) it ended at 78% and the bake alone
raised the thought-free answer NLL from 0.007 to 2.25, which is why the default mixes in plain examples.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainingArguments, default_data_collator

from evaluation.corpus import corpus_texts
from evaluation.tasks import get_task_family
from modeling_forge import ForgeConfig, ForgeForCausalLM
from modeling_forge.tokenization import build_tokenizer
from recipes import phase3
from trainers.base import ForgeTrainer
from trainers.data import pack_examples


def train_base(steps: int, folder: Path) -> None:
    """Train the base on arithmetic with worked steps and save it to `folder / "base"`."""
    family = get_task_family("arithmetic")
    examples = family.generate("train", 2500, seed=0, difficulty=1)  # about all distinct difficulty-1 problems
    examples += family.generate("train", 4000, seed=1, difficulty=2)
    texts = [family.training_text(e) for e in examples]
    tokenizer = build_tokenizer(corpus_texts("train", max_chars=400_000) + texts, 1024)
    blocks = pack_examples(texts, tokenizer, 192)
    dataset = Dataset.from_dict({"input_ids": [b[0] for b in blocks], "labels": [b[1] for b in blocks]})
    special = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = ForgeConfig.from_preset("tiny", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, **special)
    torch.manual_seed(0)
    model = ForgeForCausalLM(config)
    args = TrainingArguments(output_dir=str(folder / "work"), max_steps=steps, per_device_train_batch_size=16,
                             learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=min(50, steps // 10),
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             logging_steps=max(steps // 6, 1), seed=0)  # fmt: skip
    ForgeTrainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator).train()
    model.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="base training steps (batch 16 x 192 tokens)")
    parser.add_argument("--plain-fraction", type=float, default=None, help="Phase 3 reasoning_bake_plain_fraction")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        started = time.time()
        train_base(args.steps, folder)
        print(f"base: {args.steps} steps in {time.time() - started:.0f} s (its accuracy is the summary's 'input')")
        (config,) = phase3.make_parser().parse_args_and_config(
            ["--config", "recipes/configs/phase3_tiny.yaml", "--model_name_or_path", str(folder / "base"),
             "--output_dir", str(folder / "run"), "--report_to", "none"]
            + ([] if args.plain_fraction is None else ["--reasoning_bake_plain_fraction", str(args.plain_fraction)])
        )  # fmt: skip
        phase3.main(config)  # prints answer NLL / accuracy with and without thoughts and the anti-theater checks


if __name__ == "__main__":
    main()
