"""Quickstart: train the tiny TRM x Titans-MAG model on the built-in corpus and reload it from its folder.

python recipes/demo.py                       # the `make demo` run (~2 minutes on 2 CPU cores)
python recipes/demo.py --max_steps 50 --output_dir outputs/demo-short
accelerate launch recipes/demo.py            # same job under accelerate
"""

from transformers import HfArgumentParser

from trainers.quickstart import QuickstartConfig, run_quickstart


def main() -> None:
    (config,) = HfArgumentParser(QuickstartConfig).parse_args_into_dataclasses()
    result = run_quickstart(config)
    if not result.get("main_process", True):  # another rank measured and wrote
        return
    steps = ", ".join(f"y{t}: {loss:.3f}" for t, loss in enumerate(result["eval_step_losses"]))
    print(f"\nSaved to {result['output_dir']} and reloaded with AutoModelForCausalLM.")
    print(f"Training loss: {result['train_loss_first_window']:.3f} (first window) -> "
          f"{result['train_loss_last_window']:.3f} (last window)")  # fmt: skip
    print(f"Validation loss per TRM step: {steps}")
    print(f"Validation perplexity: {result['validation_perplexity']:.2f} over {result['validation_tokens']} tokens")
    print(f"Sample:\n{result['sample']}")
    print(f"Wall time: {result['wall_time_s']:.0f} s")


if __name__ == "__main__":
    main()
