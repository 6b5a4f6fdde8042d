"""Parallel (chunked) EMA memory scan vs per-position loops, forward + backward.

    OMP_NUM_THREADS=1 python benchmarks/memory_scan.py            # B=8, T=1024, d=512 (the issue's setting)
    python benchmarks/memory_scan.py --batch 2 --length 256        # quicker

Prints the time of each form and the speed-up of the parallel scan over each loop (goal >= 100x over the loop).
"""

import argparse

import torch
from _timing import time_it

from modeling_forge import ema_scan


def loop_index(x: torch.Tensor, decay: float) -> torch.Tensor:
    """The naive reference: index x[:, t] each step (its backward is O(T^2))."""
    state = torch.zeros_like(x[:, 0])
    out = []
    for t in range(x.shape[1]):
        state = decay * state + x[:, t]
        out.append(state)
    return torch.stack(out, 1)


def loop_unbind(x: torch.Tensor, decay: float) -> torch.Tensor:
    """The better loop: iterate over x.unbind(1)."""
    state = torch.zeros_like(x[:, 0])
    out = []
    for x_t in x.unbind(1):
        state = decay * state + x_t
        out.append(state)
    return torch.stack(out, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.length, args.width, requires_grad=True)
    weights = torch.randn_like(x)

    def run(form):
        def step():
            x.grad = None
            (form(x) * weights).sum().backward()

        return step

    forms = {
        "parallel chunked scan": lambda v: ema_scan(v, 0.99, chunk_size=args.chunk)[0],
        "loop over x.unbind(1)": lambda v: loop_unbind(v, 0.99),
        "loop indexing x[:, t]": lambda v: loop_index(v, 0.99),
    }
    with torch.no_grad():
        exact = (forms["parallel chunked scan"](x) - forms["loop over x.unbind(1)"](x)).abs().max().item()
    print(f"B={args.batch} T={args.length} d={args.width} chunk={args.chunk}, threads={torch.get_num_threads()}")
    print(f"max |parallel - loop| = {exact:.2e} (fp32)")
    times = {name: time_it(run(form), repeats=args.repeats) for name, form in forms.items()}
    base = times["parallel chunked scan"]
    for name, seconds in times.items():
        print(f"{name:>24}: {seconds * 1e3:9.1f} ms  ({seconds / base:6.1f}x the parallel scan)")


if __name__ == "__main__":
    main()
