"""Greedy decoding speed: no cache (full recompute each token, the baseline), the dynamic cache (sliding-window KV +
memory state), the static cache, and the static cache with a `torch.compile`d forward (prefill and decode step).

    OMP_NUM_THREADS=1 python benchmarks/generation.py                      # cognate-25m, 512 new tokens
    python benchmarks/generation.py --preset tiny --new-tokens 256
    python benchmarks/generation.py --new-tokens 2048 --skip-uncached      # the uncached baseline is O(T^2)
    python benchmarks/generation.py --new-tokens 2048 --uncached-samples 16  # ... or estimated from 16 of its steps

Prints tokens/s of each and the ratio to the uncached baseline measured in the same run (goal: static + compile
>= 10x at 512 tokens), and checks that every variant produces the same tokens. The compiled variant is timed on
its second run; the first (compilation) is reported separately. With `--uncached-samples K` the uncached baseline
is not run token by token: K of its full-sequence forward passes (evenly spaced prefix lengths) are timed and the
per-length time is interpolated linearly over all N steps; the row says "estimated" and has no token check.
"""

import argparse
import time

import torch

from modeling_forge import ForgeConfig, ForgeForCausalLM


def _generate(model: ForgeForCausalLM, prompt: torch.Tensor, **kwargs) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, **kwargs)
    return time.perf_counter() - start, out


def _estimate_uncached(model: ForgeForCausalLM, prompt_tokens: int, new_tokens: int, samples: int) -> float:
    """Seconds an uncached greedy run of `new_tokens` would take: step t is one full forward over `prompt_tokens + t`
    tokens plus the argmax, timed at `samples` evenly spaced t and interpolated linearly in t over every step."""
    steps = torch.linspace(0, new_tokens - 1, max(samples, 2)).round().long().unique().tolist()
    seconds = []
    with torch.no_grad():
        for t in steps:
            ids = torch.randint(1, model.config.vocab_size, (1, prompt_tokens + t))
            start = time.perf_counter()
            model(ids, use_cache=False).logits[:, -1].argmax(-1)
            seconds.append(time.perf_counter() - start)
    every = torch.arange(new_tokens, dtype=torch.float64)
    measured_at = torch.tensor(steps, dtype=torch.float64)
    slopes = torch.tensor(seconds, dtype=torch.float64)
    index = torch.searchsorted(measured_at, every, right=True).clamp(1, len(steps) - 1)
    left, right = measured_at[index - 1], measured_at[index]
    weight = (every - left) / (right - left)
    return float(((1 - weight) * slopes[index - 1] + weight * slopes[index]).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cognate-25m")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--skip-uncached", action="store_true", help="ratios against the dynamic cache instead")
    parser.add_argument("--uncached-samples", type=int, default=0,
                        help="estimate the uncached baseline from K timed forwards (0: run it all)")  # fmt: skip
    args = parser.parse_args()
    torch.manual_seed(0)
    config = ForgeConfig.from_preset(args.preset, eos_token_id=None, pad_token_id=0, initializer_range=0.1)
    model = ForgeForCausalLM(config).eval()
    prompt = torch.randint(1, config.vocab_size, (1, args.prompt_tokens))
    kwargs = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}

    size = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{args.preset}: {size:.1f}M params, prompt {args.prompt_tokens}, {args.new_tokens} new tokens, "
          f"window {config.sliding_window}, ACT halting {config.act_halting}, threads {torch.get_num_threads()}",
          flush=True)  # fmt: skip
    baseline: list[tuple[str, float]] = []
    reference: list[torch.Tensor] = []  # the first run's tokens (the dynamic cache's when uncached is estimated)

    def report(name: str, seconds: float, tokens: torch.Tensor | None) -> None:
        if not baseline:
            baseline.append((name, seconds))
        if tokens is not None and not reference:
            reference.append(tokens)
        base_name, base_seconds = baseline[0]
        same = "n/a" if tokens is None else torch.equal(tokens, reference[0])
        print(f"  {name:17s} {seconds:8.2f} s  {args.new_tokens / seconds:8.1f} tok/s  "
              f"{base_seconds / seconds:5.1f}x {base_name}  same tokens: {same}", flush=True)  # fmt: skip

    if args.uncached_samples > 0 and not args.skip_uncached:
        report("uncached (estim.)", _estimate_uncached(model, args.prompt_tokens, args.new_tokens,
                                                       args.uncached_samples), None)  # fmt: skip
    elif not args.skip_uncached:
        report("uncached", *_generate(model, prompt, use_cache=False, **kwargs))
    report("dynamic cache", *_generate(model, prompt, **kwargs))
    report("static cache", *_generate(model, prompt, cache_implementation="static", **kwargs))
    # dynamic=None: the static sliding-window cache counts its length in a Python int, which dynamo then treats as a
    # symbol after the first change instead of recompiling at every position.
    model.forward = torch.compile(model.forward, dynamic=None)
    # inductor's buffer reuse miscompiles the decode step of torch 2.13 (wrong logits from token 1, see
    # test_compiled_static_cache_decode_step_equals_eager): compile with in-place buffers off.
    with torch._inductor.config.patch(inplace_buffers=False):
        compile_time, _ = _generate(model, prompt, cache_implementation="static", **kwargs)
        print(f"  (compilation run: {compile_time:.1f} s)", flush=True)
        report("static + compile", *_generate(model, prompt, cache_implementation="static", **kwargs))


if __name__ == "__main__":
    main()
