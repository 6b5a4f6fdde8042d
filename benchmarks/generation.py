"""Cached vs uncached greedy decoding (sliding-window KV + memory state in the cache vs full recompute).

    OMP_NUM_THREADS=1 python benchmarks/generation.py                      # cognate-25m, 512 new tokens
    python benchmarks/generation.py --preset tiny --new-tokens 256

Prints tokens/s of both and the ratio (goal >= 10x); checks that both produce the same tokens.
"""

import argparse
import time

import torch

from modeling_forge import ForgeConfig, ForgeForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cognate-25m")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = ForgeConfig.from_preset(args.preset, eos_token_id=None, pad_token_id=0, initializer_range=0.1)
    model = ForgeForCausalLM(config).eval()
    prompt = torch.randint(1, config.vocab_size, (1, args.prompt_tokens))
    kwargs = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}
    results = {}
    for use_cache in (True, False):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, use_cache=use_cache, **kwargs)
        results[use_cache] = (time.perf_counter() - start, out)
    (t_cached, cached), (t_full, full) = results[True], results[False]
    size = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{args.preset}: {size:.1f}M params, prompt {args.prompt_tokens}, {args.new_tokens} new tokens, "
          f"window {config.sliding_window}, threads {torch.get_num_threads()}")  # fmt: skip
    print(f"  cached:   {t_cached:7.2f} s  ({args.new_tokens / t_cached:7.1f} tok/s)")
    print(f"  uncached: {t_full:7.2f} s  ({args.new_tokens / t_full:7.1f} tok/s)")
    print(f"  speed-up: {t_full / t_cached:.1f}x   same tokens: {torch.equal(cached, full)}")


if __name__ == "__main__":
    main()
