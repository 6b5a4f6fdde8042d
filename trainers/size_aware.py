"""Model-size-aware defaults: ONE function from a parameter count to every phase's size-dependent settings.

    defaults = size_defaults(model.num_parameters())
    threshold = config.sensitivity_threshold if config.sensitivity_threshold is not None else \\
        defaults.bitnet_sensitivity_threshold          # explicit config always wins

The specification asks each phase to adapt to model size (batch sizes, compression targets, thought counts,
thresholds). Phases read their fields from the `SizeDefaults` this returns and use them only where their own
config leaves a field unset. Only the BitNet (Phase 4) fields exist so far; other phases add theirs here, as
fields of `SizeDefaults` filled per size band, never as `if n_params > ...` branches in their own code.
The numbers are starting defaults chosen by reasoning (smaller models are more sensitive to ternary weights and
need more fine-tuning per parameter), not tuning results; each is documented where it is set.
"""

from dataclasses import dataclass

# (upper bound on parameters, band name); the last band is open-ended.
SIZE_BANDS: tuple[tuple[float, str], ...] = (
    (2e6, "tiny"),
    (10e6, "small"),
    (50e6, "base"),
    (float("inf"), "large"),
)


@dataclass(frozen=True)
class SizeDefaults:
    """Per-phase defaults for one model size (read-only; a phase's explicit config always wins)."""

    n_params: int
    band: str
    # Phase 4, BitNet b1.58
    bitnet_compression_target: float  # whole-checkpoint size ratio vs fp32 the embedding precision is chosen for
    bitnet_sensitivity_threshold: float  # relative calibration-loss increase above which a layer stays fp
    bitnet_finetune_steps: int  # STE fine-tuning optimizer steps
    bitnet_learning_rate: float  # peak lr of the STE fine-tuning (MuGrokfast, Muon group)


# Per band: (compression target, sensitivity threshold, fine-tuning steps, learning rate).
# - Target: SPEC asks >= 6x; from 2M parameters up the goal of 8x (at 25M it needs a 4-bit embedding,
#   the embedding being 42% of the parameters). Tiny models keep the 6x minimum.
# - Threshold: one ternary layer of a tiny model moves the loss more than one of 8 layers of a 25M model, so the
#   allowance per layer shrinks with size.
# - Steps / lr: measured at tiny scale (benchmarks/bitnet.py, an 800-step 0.2M model): 200 STE steps left the
#   perplexity +20% above the input, 600 steps +7% (next-token accuracy -2.5%); larger models get more steps at a
#   lower lr (not measured yet).
_BITNET_BY_BAND: dict[str, tuple[float, float, int, float]] = {
    "tiny": (6.0, 0.10, 600, 2e-3),
    "small": (8.0, 0.05, 500, 1e-3),
    "base": (8.0, 0.03, 1000, 5e-4),
    "large": (8.0, 0.02, 2000, 3e-4),
}


def size_defaults(n_params: int) -> SizeDefaults:
    """The size-dependent defaults of every phase for a model with `n_params` parameters."""
    if n_params <= 0:
        raise ValueError(f"size_defaults needs a positive parameter count, got {n_params}.")
    band = next(name for bound, name in SIZE_BANDS if n_params < bound)
    target, threshold, steps, lr = _BITNET_BY_BAND[band]
    return SizeDefaults(
        n_params=int(n_params),
        band=band,
        bitnet_compression_target=target,
        bitnet_sensitivity_threshold=threshold,
        bitnet_finetune_steps=steps,
        bitnet_learning_rate=lr,
    )


__all__ = ["SIZE_BANDS", "SizeDefaults", "size_defaults"]
