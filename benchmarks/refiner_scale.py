"""Scale of the TRM refiner's updates at the answer positions while it trains on the depth probe (issue 14).

    python benchmarks/refiner_scale.py --layers 1 --steps 800 --set trm_norm='"pre"'
    python benchmarks/refiner_scale.py --layers 1 --steps 800 --set trm_norm='"post"'

Trains the tiny Forge with its recursion on `variable_chain` (1-2 lookups, the depth probe's data and optimizer) and,
at a few steps, prints the root mean square over the held-out 2-lookup answer positions of: the backbone features `h`,
`z_0 = P_z h`, each application's attention output and each application's SwiGLU output (per step: the latent
micro-steps, then the answer update). A refiner whose SwiGLU outputs fall towards zero while `h` stays at 1 has shut
its only path from the latent `z` to the answer `y` (`trm_norm="pre"`: the residual latent grows instead).
"""

from __future__ import annotations

import argparse
import json
import logging

import torch
from depth_probe import held_out_examples, train_blocks
from recursion import parse_overrides, tiny_forge, train_step

from evaluation.corpus import corpus_texts
from modeling_forge.tokenization import build_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1, help="backbone layers")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--at", type=int, nargs="*", default=[1, 51, 101, 201, 401, 800],
                        help="report after these many training steps")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="ForgeConfig overrides (JSON)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tokenizer = build_tokenizer(corpus_texts("train", max_chars=300_000), vocab_size=512)
    train = train_blocks(tokenizer, range(1, 3), args.steps * 16, 128, seed=args.seed)
    ids, where = held_out_examples(tokenizer, range(1, 3), 50)[2]
    rows, positions = torch.arange(len(ids)), where - 1
    torch.manual_seed(args.seed)
    model = tiny_forge(tokenizer, 128, num_hidden_layers=args.layers, **parse_overrides(args.set))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50))
    recursion = model.model.recursion
    seen: dict[str, list[torch.Tensor]] = {}
    recording = [False]  # hooks record in the held-out forwards only

    def keep(name):
        def hook(module, inputs, output):
            if recording[0]:
                seen.setdefault(name, []).append(output.detach()[rows, positions])

        return hook

    record_h = keep("h")  # the recursion's first input is the backbone features
    recursion.register_forward_pre_hook(lambda module, inputs: record_h(module, inputs, inputs[0]))
    recursion.refiner.z_init.register_forward_hook(keep("z0"))
    recursion.refiner.block.register_forward_hook(keep("swiglu"))
    if recursion.refiner.attn is not None:
        recursion.refiner.attn.register_forward_hook(keep("attention"))

    def rms(values: torch.Tensor) -> float:
        return round(float(values.float().pow(2).mean().sqrt()), 4)

    for step in range(1, args.steps + 1):
        train_step(model, optimizer, schedule, train[(step - 1) * 16 : step * 16])
        if step in args.at:
            model.eval()
            seen.clear()
            recording[0] = True
            with torch.no_grad():
                model(ids, act_halting=False)
            recording[0] = False
            report = {name: [rms(t) for t in tensors] for name, tensors in seen.items()}
            print(step, json.dumps(report), flush=True)
            model.train()


if __name__ == "__main__":
    main()
