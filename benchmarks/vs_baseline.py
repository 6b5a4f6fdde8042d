"""End to end: the tiny Forge vs an equal-size sliding-window MistralForCausalLM on the built-in corpus, equal
parameters, tokens, batches and optimizer, with ablations in the same run (issue 14's evidence).

    OMP_NUM_THREADS=1 nice python benchmarks/vs_baseline.py               # 600 steps x 8 x 256 tokens, ~1 h shared
    python benchmarks/vs_baseline.py --steps 200                           # quicker (not the goal's budget)
    python benchmarks/vs_baseline.py --steps 200 --only --variants 'raw={"mag_mix": "raw"}'   # Mistral + extra rows

Models: Forge `tiny` (recursion + ACT + memory), Forge without recursion (`trm_max_steps=0`), Forge without memory
(`memory_type="none"`), Forge with the position-wise refiner (`trm_attention=False`), and a Mistral with Forge's width,
heads and sliding window whose depth and feed-forward width are chosen to match the full Forge's parameter count.
Reported: validation perplexity on the held-out corpus split (ACT on for Forge, as deployed), training time, and
each model's perplexity relative to Mistral's (goal: Forge at least 5% better). `--variants NAME=JSON` adds Forge rows
with those config fields (with `--variants` alone: Mistral, the default Forge and the variants run; `--only` names the
built-in rows to keep, none when empty); `--forge-overrides` applies to every Forge row. A vocabulary of 1,024 BPE
tokens fitted on 300k characters of the training split; AdamW lr 3e-3 with 50 warm-up steps, gradient clipping 1.0,
the same seed and batch order.
"""

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from transformers import MistralConfig, MistralForCausalLM

from evaluation.corpus import corpus_texts
from modeling_forge import ForgeConfig, ForgeForCausalLM
from modeling_forge.tokenization import build_tokenizer
from trainers.data import pack_texts


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_mistral(target: int, forge: ForgeConfig) -> MistralForCausalLM:
    """Forge's width, heads, vocabulary, window and tied head; depth and feed-forward width matched to `target`."""
    best = None
    d = forge.hidden_size
    for layers in range(1, 13):
        for ff in range(d, 8 * d + 1, 8):
            count = forge.vocab_size * d + layers * (4 * d * d + 3 * d * ff + 2 * d) + d
            if best is None or abs(count - target) < abs(best[0] - target):
                best = (count, layers, ff)
    config = MistralConfig(
        vocab_size=forge.vocab_size,
        hidden_size=d,
        intermediate_size=best[2],
        num_hidden_layers=best[1],
        num_attention_heads=forge.num_attention_heads,
        num_key_value_heads=forge.num_attention_heads,
        head_dim=forge.head_dim,
        sliding_window=forge.sliding_window,
        max_position_embeddings=forge.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=forge.pad_token_id,
    )
    return MistralForCausalLM(config)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch):
        ids = blocks[start : start + batch]
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-blocks", type=int, default=64)
    parser.add_argument("--only", nargs="*", help="run only these model names (Mistral and --variants always run)")
    parser.add_argument("--forge-overrides", default="{}", help="JSON ForgeConfig fields applied to every Forge row")
    parser.add_argument(
        "--variants",
        nargs="*",
        default=[],
        metavar="NAME=JSON",
        help='extra Forge rows, e.g. \'raw={"mag_mix": "raw"}\' (on top of --forge-overrides)',
    )
    args = parser.parse_args()
    tokenizer = build_tokenizer(corpus_texts("train", max_chars=300_000), vocab_size=1024)
    train = torch.tensor(pack_texts(corpus_texts("train"), tokenizer, args.length)["input_ids"])
    valid = torch.tensor(pack_texts(corpus_texts("validation"), tokenizer, args.length)["input_ids"])
    valid = valid[: args.eval_blocks]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    batches = [train[order[(i * args.batch) % len(train) :][: args.batch]] for i in range(args.steps)]

    common = json.loads(args.forge_overrides)

    def forge(**overrides) -> ForgeForCausalLM:
        config = ForgeConfig.from_preset("tiny", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         max_position_embeddings=args.length, **{**common, **overrides})  # fmt: skip
        return ForgeForCausalLM(config)

    torch.manual_seed(0)
    full = forge()
    builders = {
        "mistral (sliding window, equal parameters)": lambda: matched_mistral(n_params(full), full.config),
        "forge (recursion + ACT + memory)": lambda: full,
        "forge, no recursion": lambda: forge(trm_max_steps=0),
        "forge, no memory": lambda: forge(memory_type="none"),
        "forge, position-wise refiner": lambda: forge(trm_attention=False),
    }
    for variant in args.variants:
        label, _, fields = variant.partition("=")
        fields = json.loads(fields)
        builders[f"forge, {label}"] = lambda fields=fields: forge(**fields)
    variant_names = [f"forge, {variant.partition('=')[0]}" for variant in args.variants]
    if args.only is None and args.variants:  # the default Forge row stays the reference for the variants
        args.only = ["forge (recursion + ACT + memory)"]
    results = {}
    for index, (name, build) in enumerate(builders.items()):
        if index and args.only is not None and name not in args.only + variant_names:
            continue
        torch.manual_seed(0)
        model = build().train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50))
        start = time.perf_counter()
        for ids in batches:
            model(input_ids=ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        results[name] = (n_params(model), seconds, perplexity(model, valid, args.batch))
        print(f"{name}: {results[name]}", flush=True)

    print(f"\n{args.steps} steps x {args.batch} x {args.length} tokens, AdamW lr {args.lr}, same batches for all")
    reference = results["mistral (sliding window, equal parameters)"]
    for name, (count, seconds, ppl) in results.items():
        print(f"{name:>44}: {count / 1e6:5.2f}M params  {seconds:6.0f} s ({seconds / reference[1]:4.2f}x)  "
              f"validation perplexity {ppl:7.2f} ({100 * (ppl / reference[2] - 1):+5.1f}% vs Mistral)")  # fmt: skip


if __name__ == "__main__":
    main()
