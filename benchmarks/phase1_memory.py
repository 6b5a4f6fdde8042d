"""Does the long-term memory recall keys beyond the attention window? The memory specialisation vs a memory-off
ablation, same data, seed and budget (issue 4's evidence).

    OMP_NUM_THREADS=1 python benchmarks/phase1_memory.py                 # ~10 min on 2 CPU cores
    python benchmarks/phase1_memory.py --steps 100                        # quicker, noisier

Both tiny models train on key-value recall (plus corpus text) where the queried pair sits 10-100 words back, then
answer held-out examples greedily. Reported: accuracy within the attention window (does the model know the task?)
and beyond it (what only the memory can reach). A random guess among the listed pairs scores 1/num_pairs.
"""

import argparse
import json
import time

import torch
from transformers import TrainingArguments, default_data_collator

from evaluation.corpus import corpus_texts
from evaluation.tasks import get_task_family
from modeling_forge import ForgeConfig, ForgeForCausalLM
from modeling_forge.tokenization import build_tokenizer
from trainers.base import ForgeTrainer
from trainers.data import CurriculumStage, build_curriculum


def token_distance(tokenizer, example) -> int:
    """Tokens between the queried value and the end of the prompt (what attention must span)."""
    start = example.meta["value_char_span"][0]
    return len(tokenizer(example.prompt[start:], add_special_tokens=False).input_ids)


@torch.no_grad()
def recall_accuracy(model, tokenizer, examples) -> float:
    family = get_task_family("kv_recall")
    tokenizer.padding_side = "left"
    batch = tokenizer([e.prompt for e in examples], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(family.score_batch(examples, completions)) / len(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--eval-examples", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    family = get_task_family("kv_recall")
    tokenizer = build_tokenizer(
        corpus_texts("train", max_chars=500_000)
        + [family.training_text(e) for e in family.generate("train", 500, seed=0, difficulty=3)],
        1024,
    )
    stages = [CurriculumStage("recall", 1.0, 256, {"kv_recall": 0.8, "corpus": 0.2}, (1, 4))]
    data = build_curriculum(stages, tokenizer, max_steps=args.steps, global_batch_size=16, seed=0)
    near = [
        e
        for e in family.generate("validation", 400, seed=1, difficulty=1)
        if token_distance(tokenizer, e) < args.window
    ]
    far = [
        e
        for e in family.generate("validation", 400, seed=1, difficulty=4)
        if token_distance(tokenizer, e) > args.window
    ]
    near, far = near[: args.eval_examples], far[: args.eval_examples]
    results = {}
    for name, overrides in (
        ("memory (ema, decay 0.975)", {"memory_decay": 0.975}),
        ("memory off", {"memory_type": "none"}),
    ):
        config = ForgeConfig.from_preset("tiny", vocab_size=len(tokenizer), sliding_window=args.window,
                                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                         **overrides)  # fmt: skip
        torch.manual_seed(0)
        model = ForgeForCausalLM(config)
        training = TrainingArguments(output_dir="/tmp/phase1_memory_bench", max_steps=args.steps,
                                     per_device_train_batch_size=16, learning_rate=3e-3, lr_scheduler_type="cosine",
                                     warmup_steps=20, report_to=[], save_strategy="no", use_cpu=True,
                                     disable_tqdm=True, logging_steps=args.steps, seed=0)  # fmt: skip
        started = time.time()
        ForgeTrainer(model=model, args=training, train_dataset=data.dataset.remove_columns(["stage", "source"]),
                     data_collator=default_data_collator).train()  # fmt: skip
        model.eval()
        results[name] = {
            "accuracy_within_window": recall_accuracy(model, tokenizer, near),
            "accuracy_beyond_window": recall_accuracy(model, tokenizer, far),
            "train_seconds": round(time.time() - started, 1),
        }
    pairs = far[0].meta["num_pairs"]
    distances = [token_distance(tokenizer, e) for e in far]
    print(f"attention window {args.window} tokens; {len(near)} within-window and {len(far)} beyond-window examples "
          f"(beyond: {min(distances)}-{max(distances)} tokens back; chance ~{1 / pairs:.2f})")  # fmt: skip
    for name, values in results.items():
        print(f"{name:>28}: within window {values['accuracy_within_window']:.3f}, "
              f"beyond window {values['accuracy_beyond_window']:.3f}  ({values['train_seconds']} s)")  # fmt: skip
    print(json.dumps(results))


if __name__ == "__main__":
    main()
