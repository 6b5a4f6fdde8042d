"""Training-step time of the cognate-25m Forge model vs a LlamaForCausalLM of equal parameter count, same batch.

    OMP_NUM_THREADS=1 python benchmarks/throughput.py                  # batch 4 x 512 tokens, AdamW
    python benchmarks/throughput.py --batch 2 --length 256 --repeats 2  # quicker

Prints tokens/s and each variant's step-time ratio to Llama (goal <= 1.5 for the full model: TRM and memory on),
plus ablations (deep supervision off, no recursion, no memory) measured in the same run.
"""

import argparse

import torch
from _timing import time_it
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_forge import ForgeConfig, ForgeForCausalLM


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_llama(target: int, forge: ForgeConfig) -> LlamaForCausalLM:
    """A Llama with Forge's width, heads, vocab and tied head; depth and MLP width chosen to match `target`."""
    best = None
    for layers in range(4, 16):
        for ff in range(512, 2049, 32):
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
    args = parser.parse_args()
    torch.manual_seed(0)
    base = ForgeConfig.from_preset("cognate-25m")
    variants = {
        "forge (TRM 3 steps + memory, deep supervision)": {},
        "forge, deep supervision on 25% of positions": {"deep_supervision_fraction": 0.25},
        "forge, no detaching between TRM steps": {"trm_detach_between_steps": False},
        "forge, final-step supervision only": {"deep_supervision": False},
        "forge, no recursion (trm_max_steps=0)": {"trm_max_steps": 0},
        "forge, ema memory instead of neural": {"memory_type": "ema"},
        "forge, no memory (attention only)": {"memory_type": "none"},
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
    llama = matched_llama(n_params(forge), base).train()
    results = {}
    print(f"batch {args.batch} x {args.length} tokens, threads {torch.get_num_threads()}, AdamW, fp32")
    for name, model in (("llama (equal parameters)", llama),):
        results[name] = (
            n_params(model),
            time_it(train_step(model, torch.optim.AdamW(model.parameters())), repeats=args.repeats),
        )
    for name, overrides in variants.items():
        model = (
            forge if not overrides else ForgeForCausalLM(ForgeConfig.from_preset("cognate-25m", **overrides)).train()
        )
        results[name] = (
            n_params(model),
            time_it(train_step(model, torch.optim.AdamW(model.parameters())), repeats=args.repeats),
        )
    reference = results["llama (equal parameters)"][1]
    for name, (count, seconds) in results.items():
        print(f"{name:>48}: {count / 1e6:5.2f}M params  {seconds:6.2f} s/step  {tokens / seconds:7.0f} tok/s  "
              f"ratio {seconds / reference:4.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
