"""Worker for the CPU DDP test: `torchrun --nproc_per_node 2 ddp_worker.py OUT` trains a tiny Forge model for a
few steps with CognateTrainer and writes each rank's parameter digest to OUT/rank<k>.json."""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from evaluation.corpus import corpus_texts
from modeling_forge import ForgeConfig, ForgeForCausalLM
from modeling_forge.tokenization import build_tokenizer
from trainers.cognate_config import CognateConfig
from trainers.cognate_trainer import CognateTrainer
from trainers.data import CurriculumStage, build_curriculum


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    tokenizer = build_tokenizer(corpus_texts("train", max_chars=100_000), 320)
    stages = [CurriculumStage("only", 1.0, 64, {"corpus": 1.0})]
    args = CognateConfig(
        output_dir=str(out / "work"), max_steps=4, per_device_train_batch_size=2, logging_steps=1,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, optimizer_type="mugrokfast",
        mugrokfast_phase=1, seed=0, curriculum=[{"name": "only", "end": 1.0, "seq_len": 64,
                                                "mixture": {"corpus": 1.0}}],
    )  # fmt: skip
    world = int(os.environ.get("WORLD_SIZE", 1))
    data = build_curriculum(stages, tokenizer, max_steps=4, global_batch_size=2 * world, seed=0)
    torch.manual_seed(0)
    model = ForgeForCausalLM(ForgeConfig.from_preset("tiny", vocab_size=len(tokenizer)))
    before = [p.detach().clone() for p in model.parameters()]
    trainer = CognateTrainer(model=model, args=args, train_dataset=data.dataset, curriculum=data)
    trainer.train()
    digest = hashlib.sha256()
    for p in trainer.model.parameters():
        digest.update(p.detach().cpu().numpy().tobytes())
    changed = any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters(), strict=True))
    rank = trainer.args.process_index
    payload = {"world_size": trainer.args.world_size, "params": digest.hexdigest(), "steps": trainer.state.global_step,
               "changed": changed}  # fmt: skip
    (out / f"rank{rank}.json").write_text(json.dumps(payload))


if __name__ == "__main__":
    main()
