"""Run a phase recipe under `accelerate launch` and record, per rank, what the rank did.

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        tests/scaleout/launch_recipe.py PHASE RECORD_DIR -- <the recipe's arguments>

PHASE is `1`..`4` or `quickstart`. Each rank writes RECORD_DIR/rank<k>.json: the world size, the output folders it
wrote (`atomic_directory` entries), how many Phase 2 fitness evaluations it ran, and a sha256 of every trained model's
parameters at the end of each `Trainer.train` (in order), so a test can assert data-parallel training left equal
parameters on every rank and that searching and writing happened on the main process only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path


def main() -> None:
    phase, record_dir = sys.argv[1], Path(sys.argv[2])
    argv = sys.argv[4:] if sys.argv[3:4] == ["--"] else sys.argv[3:]
    rank = int(os.environ.get("RANK", 0))
    record = {"world_size": int(os.environ.get("WORLD_SIZE", 1)), "writes": [], "fitness_calls": 0, "trained": []}

    import transformers

    import trainers.checkpointing as checkpointing
    import trainers.evomerge as evomerge
    import trainers.phase_output as phase_output

    original_atomic = checkpointing.atomic_directory

    @contextlib.contextmanager
    def atomic_directory(final, *, overwrite=False):
        record["writes"].append(Path(final).name)
        with original_atomic(final, overwrite=overwrite) as staging:
            yield staging

    phase_output.atomic_directory = atomic_directory
    original_evaluate = evomerge.MergeFitness.evaluate

    def evaluate(self, model):
        record["fitness_calls"] += 1
        return original_evaluate(self, model)

    evomerge.MergeFitness.evaluate = evaluate

    class Digest(transformers.TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            digest = hashlib.sha256()
            for name, param in sorted(model.named_parameters()):
                digest.update(name.encode())
                digest.update(param.detach().float().cpu().numpy().tobytes())
            wrapper = type(self.trainer.model_wrapped).__name__
            record["trained"].append({"run": Path(args.output_dir).name.split("-")[0], "steps": state.global_step,
                                      "params": digest.hexdigest(), "parallel": wrapper,
                                      "param_class": type(next(model.parameters())).__name__})  # fmt: skip

    original_init = transformers.Trainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        digest = Digest()
        digest.trainer = self
        self.add_callback(digest)

    transformers.Trainer.__init__ = init

    if phase == "quickstart":
        from transformers import HfArgumentParser

        from trainers.quickstart import QuickstartConfig, run_quickstart

        (config,) = HfArgumentParser(QuickstartConfig).parse_args_into_dataclasses(args=argv)
        run_quickstart(config)
    else:
        module = __import__(f"recipes.phase{phase}", fromlist=["main", "make_parser"])
        (config,) = module.make_parser().parse_args_and_config(args=argv)
        module.main(config)
    record_dir.mkdir(parents=True, exist_ok=True)
    (record_dir / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
