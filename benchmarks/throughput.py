"""Training-step time of the Forge model vs a LlamaForCausalLM of equal parameter count, same batch.

    OMP_NUM_THREADS=1 python benchmarks/throughput.py                  # cognate-25m, batch 4 x 512 tokens, AdamW
    python benchmarks/throughput.py --batch 2 --length 256 --repeats 2  # quicker
    python benchmarks/throughput.py --preset tiny --vocab 512           # the test/demo preset

Prints tokens/s and each variant's step-time ratio to Llama (goal <= 1.5 for the full model: recursion, ACT, deep
supervision and memory on), plus ablations measured in the same run: every intermediate step supervised on every
position (or on 25% / 12.5% of them; the preset samples 1/16), the position-wise refiner, one micro-step, no
recursion, the ema or no memory, memory in every other layer, a refiner SwiGLU half as wide (alone and with one
micro-step) and two recursion steps.
`--only` numbers the variants from 1 in this order.
"""

import argparse
import statistics

import torch
from _timing import time_it
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_forge import ForgeConfig, ForgeForCausalLM


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_llama(target: int, forge: ForgeConfig) -> LlamaForCausalLM:
    """A Llama with Forge's width, heads, vocab and tied head; depth and MLP width chosen to match `target`."""
    best = None
    for layers in range(1, 17):
        for ff in range(forge.hidden_size, 8 * forge.hidden_size + 1, 16):
            config = LlamaConfig(
                vocab_size=forge.vocab_size,
                hidden_size=forge.hidden_size,
                intermediate_size=ff,
                num_hidden_layers=layers,
                num_attention_heads=forge.num_attention_heads,
                tie_word_embeddings=True,
                max_position_embeddings=forge.max_position_embeddings,
            )
            per_layer = 4 * forge.hidden_size**2 + 3 * forge.hidden_size * ff + 2 * forge.hidden_size
            count = forge.vocab_size * forge.hidden_size + layers * per_layer + forge.hidden_size
            if best is None or abs(count - target) < abs(best[0] - target):
                best = (count, config)
    return LlamaForCausalLM(best[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="cognate-25m")
    parser.add_argument("--vocab", type=int, default=None, help="override the preset's vocabulary size")
    parser.add_argument("--only", type=int, nargs="*", help="time only these variants (1-based), with Llama")
    args = parser.parse_args()
    torch.manual_seed(0)
    overrides = {"vocab_size": args.vocab} if args.vocab else {}
    base = ForgeConfig.from_preset(args.preset, **overrides)
    variants = {
        "forge (preset: recursion + ACT + deep supervision + memory)": {},
        "forge, intermediate steps supervised on every position": {"deep_supervision_fraction": 1.0},
        "forge, intermediate steps supervised on 25% of positions": {"deep_supervision_fraction": 0.25},
        "forge, position-wise refiner (no attention)": {"trm_attention": False},
        "forge, one micro-step": {"trm_micro_steps": 1},
        "forge, no recursion (trm_max_steps=0)": {"trm_max_steps": 0},
        "forge, ema memory instead of neural": {"memory_type": "ema"},
        "forge, no memory (attention only)": {"memory_type": "none"},
        "forge, memory in every other layer": {"memory_layers": list(range(1, base.num_hidden_layers, 2))},
        "forge, refiner SwiGLU half as wide": {"trm_intermediate_size": base.trm_intermediate_size // 2},
        "forge, refiner SwiGLU half as wide, one micro-step": {
            "trm_intermediate_size": base.trm_intermediate_size // 2,
            "trm_micro_steps": 1,
        },
        "forge, two recursion steps (trm_max_steps=2)": {"trm_max_steps": 2},
        "forge, intermediate steps supervised on 12.5% of positions": {"deep_supervision_fraction": 0.125},
    }
    batch = torch.randint(0, base.vocab_size, (args.batch, args.length))
    tokens = batch.numel()

    def train_step(model, optimizer):
        def step():
            optimizer.zero_grad(set_to_none=True)
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()

        return step

    forge = ForgeForCausalLM(base).train()
    models = {"llama (equal parameters)": matched_llama(n_params(forge), base).train()}
    base_overrides = {"vocab_size": base.vocab_size}
    for name, overrides in variants.items():
        models[name] = (
            forge
            if not overrides
            else ForgeForCausalLM(ForgeConfig.from_preset(args.preset, **base_overrides, **overrides)).train()
        )
    if args.only:
        models = {name: model for i, (name, model) in enumerate(models.items()) if i == 0 or i in args.only}
    steps = {name: train_step(model, torch.optim.AdamW(model.parameters())) for name, model in models.items()}
    print(f"batch {args.batch} x {args.length} tokens, threads {torch.get_num_threads()}, AdamW, fp32")
    # Interleaved rounds (one step of every model per round, medians over rounds), so a shared machine's drifting load
    # hits every model alike; the ratios are what to read.
    times = {name: [time_it(step, warmup=1, repeats=1)] for name, step in steps.items()}
    for _ in range(args.repeats - 1):
        for name, step in steps.items():
            times[name].append(time_it(step, warmup=0, repeats=1))
    seconds = {name: statistics.median(values) for name, values in times.items()}
    reference = seconds["llama (equal parameters)"]
    for name, model in models.items():
        print(f"{name:>60}: {n_params(model) / 1e6:5.2f}M params  {seconds[name]:6.2f} s/step  "
              f"{tokens / seconds[name]:7.0f} tok/s  ratio {seconds[name] / reference:4.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
