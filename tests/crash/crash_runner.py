"""Run a phase recipe in a forked child that SIGKILLs itself at a chosen point, recording the points it passes.

The points are events every phase goes through, observed by wrapping library functions in the child only:

- `step:<trainer dir>:<n>`      after optimizer step n of a Trainer (Phase 1 specialisations, Phase 3 bake (`bake`)
                                 and RL, Phase 4 STE fine-tuning);
- `ckpt-mid:<trainer dir>:<n>`  inside `Trainer._save_checkpoint`, after the weights and before the optimizer state
                                 (a checkpoint cut half-way);
- `staging:<folder>`            inside `atomic_directory`, with the output fully written to the staging folder but
                                 not yet renamed into place;
- `gen-saved:<g>`               after Phase 2's search state of generation g was written.

`kill_at` names one such label: the child dies by `kill -9` (SIGKILL to itself, so nothing can clean up) the first
time it passes it. Forking from the test process saves the ~10 s of imports per run; the child shares nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path


def _install_hooks(kill_at: str | None, trace: Path) -> None:
    import transformers

    import trainers.checkpointing as checkpointing
    import trainers.evomerge as evomerge
    import trainers.phase_output as phase_output

    def event(label: str) -> None:
        with open(trace, "a") as handle:
            handle.write(label + "\n")
        if label == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    original_atomic = checkpointing.atomic_directory

    @contextlib.contextmanager
    def atomic_directory(final, *, overwrite=False):
        with original_atomic(final, overwrite=overwrite) as staging:
            yield staging
            event(f"staging:{Path(final).name}")

    phase_output.atomic_directory = atomic_directory

    def run_name(output_dir: str) -> str:  # prompt baking trains in a fresh mkdtemp folder: one stable name
        name = Path(output_dir).name
        return "bake" if name.startswith("forge-bake-") else name

    class StepEvents(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            event(f"step:{run_name(args.output_dir)}:{state.global_step}")

    original_init = transformers.Trainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(StepEvents())

    transformers.Trainer.__init__ = init
    original_save_optimizer = transformers.Trainer._save_optimizer_and_scheduler

    def save_optimizer(self, output_dir):
        event(f"ckpt-mid:{run_name(self.args.output_dir)}:{self.state.global_step}")
        return original_save_optimizer(self, output_dir)

    transformers.Trainer._save_optimizer_and_scheduler = save_optimizer
    original_state_save = evomerge.EvolutionState.save

    def state_save(self, path):
        original_state_save(self, path)
        event(f"gen-saved:{self.generation}")

    evomerge.EvolutionState.save = state_save


def run_forked(main: Callable, make_parser: Callable, argv: list[str], *, trace: Path, kill_at: str | None = None,
               cwd: Path | None = None) -> int:  # fmt: skip
    """Run `main(config)` of a recipe in a forked child; returns its exit status (-9 when killed, 0 when done)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            if cwd is not None:
                os.chdir(cwd)
            _install_hooks(kill_at, trace)
            (config,) = make_parser().parse_args_and_config(args=argv)
            main(config)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def read_trace(trace: Path) -> list[str]:
    """The labels a run passed, in order."""
    return trace.read_text().split() if trace.exists() else []
