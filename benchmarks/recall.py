"""Can the model recall what its attention window cannot see? Multi-query associative recall (MQAR), Forge's memories
vs Llama with full and with sliding-window attention, same data, steps and optimizer (issue 13's evidence).

    OMP_NUM_THREADS=1 nice python benchmarks/recall.py                          # all models, TRM 0 and 3 steps
    python benchmarks/recall.py --models neural ema --trm-steps 0 --steps 300    # a subset, quicker
    python benchmarks/recall.py --timing                                         # chunked vs recurrent memory

Each sequence: 2 "far" key-value pairs, a filler gap longer than two stacked attention windows, 2 "near" pairs,
then a query for each of the 4 keys (in random order) whose answer is its value. Only the answers are trained on;
held-out sequences are scored separately for near pairs (inside the window: does the model know the task?) and far
pairs (beyond it: only a memory can answer). Values are drawn from 64 tokens, so guessing scores ~0.016.
`--pairs-far`, `--pairs-near`, `--keys`, `--values`, `--gap` and `--window` change the layout (every pair is always
queried; the header prints how far each kind of pair lies from its query), e.g. the task full-attention Llama learns
best at this size (README, "the 90% condition"):

    python benchmarks/recall.py --pairs-far 4 --pairs-near 4 --keys 16 --values 16 --gap 8 --window 8 --lr 1e-3

All models have the tiny preset's width and depth (d 64, 2 layers, 4 heads): Forge `neural`, `ema`, `none` (with
`trm_max_steps` as given; `--models momentum deep deep-momentum` add the neural memory with Titans' momentum and/or
deep MLP memory, chunk `--titans-chunk`), `LlamaForCausalLM` (full attention) and `MistralForCausalLM` with the same
sliding window (Mistral is Llama plus a sliding window; transformers' Llama has none). Reported: accuracy near/far,
per-layer MAG gate means on recall data (share of attention), parameters and training time (`--eval-every N` also
prints held-out near/far every N steps, to see a trend). `--timing` times the neural memory's
forward+backward at B=8, T=1024 (cognate-25m's memory shape: 5 heads of 32) in the chunked form (C=64 and 32, and
C=16 and 32 under `torch.compile`), transformers' torch form of the same algorithm and the per-token recurrence, with
each form's analytic FLOPs (`memory_flops`) and achieved GFLOP/s.
"""

import argparse
import json
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from _timing import time_it
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    get_cosine_schedule_with_warmup,
)

from modeling_forge import ForgeConfig, ForgeForCausalLM, gated_delta_rule_chunked, gated_delta_rule_recurrent

FILLER = range(1, 17)  # 16 filler tokens
TITANS_FLAGS = ("memory_momentum", "memory_deep")  # "forge neural+momentum+deep" turns both on


@dataclass(frozen=True)
class Task:
    """The MQAR layout: `pairs_far` pairs, a `gap` of filler, `pairs_near` pairs, then every key queried once.

    Keys are `keys` distinct tokens from 32 on, values `values` tokens after them (from 128 while they fit); the
    defaults are the task of the README's first tables (64 keys, 64 values, vocabulary 256)."""

    pairs_far: int = 2
    pairs_near: int = 2
    keys: int = 64
    values: int = 64
    gap: int = 40

    @property
    def key_start(self) -> int:
        return 32

    @property
    def value_start(self) -> int:
        return max(128, self.key_start + self.keys + 32)

    @property
    def vocab(self) -> int:
        return max(256, -(-(self.value_start + self.values) // 64) * 64)

    @property
    def length(self) -> int:
        return 4 * (self.pairs_far + self.pairs_near) + self.gap

    def distances(self, kind: str) -> tuple[int, int]:
        """Smallest and largest distance from a query's key to its pair's value, for the far or near pairs."""
        n_pairs = self.pairs_far + self.pairs_near
        first_query = 2 * n_pairs + self.gap
        last_query = first_query + 2 * (n_pairs - 1)
        if kind == "far":
            return first_query - (2 * self.pairs_far - 1), last_query - 1
        return 1, last_query - (2 * self.pairs_far + self.gap + 1)

    def check(self) -> None:
        """Clear errors for layouts the sampler cannot draw."""
        n_pairs = self.pairs_far + self.pairs_near
        if self.pairs_far < 1 or self.pairs_near < 0:
            raise ValueError(f"--pairs-far must be >= 1 and --pairs-near >= 0, got {self.pairs_far}, "
                             f"{self.pairs_near}. Fix: e.g. --pairs-far 8 --pairs-near 8.")  # fmt: skip
        if self.keys < n_pairs:
            raise ValueError(f"--keys ({self.keys}) must be >= the pairs per sequence ({n_pairs}): keys are distinct "
                             f"within a sequence. Fix: --keys {max(64, n_pairs)}.")  # fmt: skip
        if self.values < 2 or self.gap < 0:
            raise ValueError(f"--values must be >= 2 and --gap >= 0, got {self.values}, {self.gap}.")


def make_batch(batch: int, task: Task, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, is_far) for `batch` sequences; labels are -100 except at answers; is_far (B, T) marks the
    answers whose pair lies before the gap."""
    n_pairs = task.pairs_far + task.pairs_near
    keys = torch.stack([torch.randperm(task.keys, generator=generator)[:n_pairs] for _ in range(batch)])
    keys = keys + task.key_start
    values = torch.randint(task.value_start, task.value_start + task.values, (batch, n_pairs), generator=generator)
    pairs = torch.stack([keys, values], -1)  # (B, P, 2)
    filler = torch.randint(FILLER[0], FILLER[-1] + 1, (batch, task.gap), generator=generator)
    order = torch.stack([torch.randperm(n_pairs, generator=generator) for _ in range(batch)])  # (B, P)
    queries = torch.stack([keys.gather(1, order), values.gather(1, order)], -1)  # (B, P, 2)
    far = pairs[:, : task.pairs_far].reshape(batch, -1)
    near = pairs[:, task.pairs_far :].reshape(batch, -1)
    input_ids = torch.cat([far, filler, near, queries.reshape(batch, -1)], 1)
    labels = torch.full_like(input_ids, -100)
    answer_positions = input_ids.shape[1] - 2 * n_pairs + 1 + 2 * torch.arange(n_pairs)
    labels[:, answer_positions] = input_ids[:, answer_positions]
    is_far = torch.zeros_like(input_ids, dtype=torch.bool)
    is_far[:, answer_positions] = order < task.pairs_far
    return input_ids, labels, is_far


def build(name: str, window: int, trm_steps: int, task: Task, overrides: dict, init_std: float | None = None
          ) -> torch.nn.Module:  # fmt: skip
    """A tiny model of the given kind (same width/depth for all; `init_std` overrides every model's
    initializer_range, 0.02 by default)."""
    init = {} if init_std is None else {"initializer_range": init_std}
    common = {**init, "vocab_size": task.vocab, "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": task.length,
              "tie_word_embeddings": True}  # fmt: skip
    if name == "llama (full attention)":
        return LlamaForCausalLM(LlamaConfig(**common))
    if name == "mistral (sliding window)":
        return MistralForCausalLM(MistralConfig(sliding_window=window, **common))
    memory_type = name.split()[1].split("+")[0]  # "forge neural+momentum" -> "neural"
    overrides = {**overrides, **{flag: True for flag in TITANS_FLAGS if flag.split("_")[1] in name.split()[1]}}
    config = ForgeConfig.from_preset("tiny", vocab_size=task.vocab, sliding_window=window, memory_type=memory_type,
                                     max_position_embeddings=task.length, trm_max_steps=trm_steps,
                                     **init, **overrides)  # fmt: skip
    return ForgeForCausalLM(config)


def loss_of(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's own training loss (Forge: deep supervision, ACT and gate terms; Llama: shifted CE)."""
    return model(input_ids=input_ids, labels=labels).loss


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: list[tuple[torch.Tensor, ...]]) -> dict:
    """Greedy accuracy at the answer positions, near and far, and per-layer gate means (Forge with memory)."""
    model.eval()
    hits = {"near": [], "far": []}
    gates = []
    for input_ids, labels, is_far in data:
        out = model(input_ids=input_ids)
        predicted = F.pad(out.logits.argmax(-1), (1, 0))[:, :-1]  # position t predicts token t
        answers = labels != -100
        correct = predicted == labels
        hits["far"].append(correct[answers & is_far].float())
        hits["near"].append(correct[answers & ~is_far].float())
        if getattr(out, "gate_means", None) is not None:
            means = out.gate_means
            gates.append(means.mean(0) if means.dim() == 2 else means)  # (L,) or batch-shaped (B, L)
    model.train()
    result = {key: torch.cat(values).mean().item() for key, values in hits.items()}
    result["gate_means"] = [round(v, 3) for v in torch.stack(gates).mean(0).tolist()] if gates else None
    return result


def task_of(args: argparse.Namespace) -> Task:
    """The task the command line asks for, checked."""
    task = Task(pairs_far=args.pairs_far, pairs_near=args.pairs_near, keys=args.keys, values=args.values, gap=args.gap)
    task.check()
    return task


def train_and_score(name: str, args: argparse.Namespace, trm_steps: int) -> dict:
    task = task_of(args)
    torch.manual_seed(args.seed)
    overrides = json.loads(args.forge_overrides)
    if "+" in name:  # the mini-batch forms' chunk length is part of the model (gradients at the chunk start)
        overrides.setdefault("memory_chunk_size", args.titans_chunk)
    model = build(name, args.window, trm_steps, task, overrides, args.init_std).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, args.steps // 20), args.steps)
    generator = torch.Generator().manual_seed(args.seed)  # the same batches for every model
    started, recent = time.time(), []
    for step in range(1, args.steps + 1):
        input_ids, labels, _ = make_batch(args.batch, task, generator)
        loss = loss_of(model, input_ids, labels)
        recent.append(loss.item())
        if step % 100 == 0:
            print(f"  {name} step {step}: loss {sum(recent) / len(recent):.3f}", flush=True)
            recent = []
        if args.eval_every and step % args.eval_every == 0:
            probe = torch.Generator().manual_seed(20_000 + args.seed)
            r = evaluate(model, [make_batch(64, task, probe) for _ in range(2)])
            print(f"  {name} step {step}: held-out near {r['near']:.3f} far {r['far']:.3f}", flush=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    seconds = time.time() - started
    held_out = torch.Generator().manual_seed(10_000 + args.seed)
    data = [make_batch(64, task, held_out) for _ in range(args.eval_batches)]
    result = evaluate(model, data)
    result.update(params=sum(p.numel() for p in model.parameters()), train_seconds=round(seconds, 1),
                  ms_per_step=round(1e3 * seconds / args.steps))  # fmt: skip
    return result


def memory_flops(form: str, batch: int, heads: int, length: int, d_k: int, d_v: int, chunk: int = 64) -> float:
    """Analytic forward+backward FLOPs of one gated-delta-rule form, to read the timings against (not measured).

    Counted: every multiply and every add of the matrix products and of the state updates (a multiply-add is 2
    FLOPs), a triangular solve of C x C with r right-hand sides as C*C*r, and the elementwise (C, C) decay/mask
    terms as 5 per entry; not counted: exp/cumsum over (B, H, T) and other O(d) per-token terms (well under 1%).
    Backward is counted as twice the forward, the usual rule for matrix products (and a fair one for the solve,
    whose backward is one more solve and two products).
    Per token and head, forward: the recurrence decays `S` (d_k*d_v), reads `S^T k` (2*d_k*d_v), writes
    `k delta^T` (2*d_k*d_v) and reads `S^T q` (2*d_k*d_v): 7*d_k*d_v. The chunked form builds per chunk
    `diag(b) K K^T` and `Q K^T` (2*C*C*d_k each), solves for d_v+d_k right-hand sides (C*C*(d_k+d_v)), applies the
    intra-chunk matrix to the corrected values (2*C*C*d_v), and carries the state across chunks with three
    (C, d_k) x (d_k, d_v) products (6*C*d_k*d_v) plus a decay (d_k*d_v): per token
    `C*(4*d_k + d_k + d_v + 2*d_v + 5) + 6*d_k*d_v + d_k*d_v/C`. At d_k = d_v = 32 that is 7,168 (recurrence) vs
    10,400 (C=16), 14,500 (C=32) and 22,900 (C=64): the chunked form does more arithmetic than the recurrence, and
    its speed-up on a CPU is bounded by how much faster it runs per FLOP (large products vs a per-token loop)."""
    if form == "recurrent":
        forward_per_token = 7 * d_k * d_v
    elif form == "chunked":
        forward_per_token = chunk * (5 * d_k + 3 * d_v + 5) + 6 * d_k * d_v + d_k * d_v / chunk
    else:
        raise ValueError(f"form must be 'recurrent' or 'chunked', got {form!r}")
    return 3.0 * forward_per_token * batch * heads * length


def memory_timing(repeats: int, compile_chunks: tuple[int, ...] = (16, 32)) -> None:
    """Forward+backward of the neural memory, B=8, T=1024, 5 heads of 32: the chunked form (C=64, the config default,
    and C=32), the chunked form under `torch.compile` (C in `compile_chunks`; compile time printed apart, warm calls
    timed), transformers' torch reference form of the same algorithm (`torch_chunk_gated_delta_rule`, C=64, no
    document resets) and the per-token recurrence, timed in interleaved rounds (minimum of each over the rounds),
    each with its analytic FLOPs (`memory_flops`) and achieved GFLOP/s."""
    import functools

    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    torch.manual_seed(0)
    batch, heads, length, dim = 8, 5, 1024, 32
    q = torch.randn(batch, heads, length, dim, requires_grad=True)
    k = F.normalize(torch.randn(batch, heads, length, dim), dim=-1).requires_grad_()
    v = torch.randn(batch, heads, length, dim, requires_grad=True)
    g = (-torch.rand(batch, heads, length) * 0.1).requires_grad_()
    b = torch.rand(batch, heads, length).requires_grad_()
    weights = torch.randn(batch, heads, length, dim)

    def transformers_form(*tensors):  # it takes (B, T, H, ...) and scales q by d^-0.5: a timing reference only
        out, state = torch_chunk_gated_delta_rule(*(x.transpose(1, 2) for x in tensors), chunk_size=64)
        return out.transpose(1, 2), state

    def run(form):
        def step():
            for x in (q, k, v, g, b):
                x.grad = None
            (form(q, k, v, g, b)[0] * weights).sum().backward()

        return step

    forms = {  # name -> (callable, chunk for the FLOP count, or 0 for the recurrence)
        "chunked C=64": (functools.partial(gated_delta_rule_chunked, chunk_size=64), 64),
        "chunked C=32": (functools.partial(gated_delta_rule_chunked, chunk_size=32), 32),
        "transformers torch_chunk_gated_delta_rule C=64": (transformers_form, 64),
        "per-token recurrence": (gated_delta_rule_recurrent, 0),
    }
    with torch.no_grad():
        reference = gated_delta_rule_recurrent(q, k, v, g, b)[0]
        max_gaps = {name: (form(q, k, v, g, b)[0] - reference).abs().max().item()
                    for name, (form, _) in forms.items() if name.startswith("chunked")}  # fmt: skip
    compile_seconds = {}
    for chunk in compile_chunks:  # the first call (forward+backward) compiles; its output is checked too (a call
        # under no_grad would compile a second graph)
        name = f"chunked C={chunk}, torch.compile"
        compiled = torch.compile(functools.partial(gated_delta_rule_chunked, chunk_size=chunk), dynamic=False)
        started = time.perf_counter()
        out = compiled(q, k, v, g, b)[0]
        (out * weights).sum().backward()
        compile_seconds[name] = time.perf_counter() - started
        max_gaps[name] = (out.detach() - reference).abs().max().item()
        forms[name] = (compiled, chunk)
    times = {name: [] for name in forms}
    for _ in range(repeats):  # interleaved, so load on a shared machine hits every form alike
        for name, (form, _) in forms.items():
            times[name].append(time_it(run(form), warmup=0 if "recurrence" in name else 1, repeats=1))
    print(f"neural memory fwd+bwd, B={batch} T={length} {heads} heads x {dim}, threads {torch.get_num_threads()}, "
          f"max |chunked - recurrent| {max(max_gaps.values()):.1e} (fp32); best of {repeats} interleaved rounds; "
          f"GFLOP analytic (memory_flops: fwd+bwd = 3 x fwd)")  # fmt: skip
    recurrent = min(times["per-token recurrence"])
    for name, measured in times.items():
        chunk = forms[name][1]
        flops = memory_flops("chunked" if chunk else "recurrent", batch, heads, length, dim, dim, chunk or 64)
        rounds = ", ".join(f"{t * 1e3:.0f}" for t in measured)
        extra = f", compile {compile_seconds[name]:.0f} s (first call)" if name in compile_seconds else ""
        best = min(measured)
        print(f"  {name:48s} {best * 1e3:8.1f} ms  recurrence / this {recurrent / best:5.1f}x  {flops / 1e9:5.2f} "
              f"GFLOP  {flops / best / 1e9:6.2f} GFLOP/s  (rounds: {rounds} ms{extra})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["neural", "ema", "none", "llama", "mistral"],
                        help="also: momentum, deep, deep-momentum (Titans' flags on the neural memory)")  # fmt: skip
    parser.add_argument("--trm-steps", nargs="+", type=int, default=[0, 3])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--gap", type=int, default=40, help="filler tokens between the far and the near pairs")
    parser.add_argument("--pairs-far", type=int, default=2, help="key-value pairs before the gap (all queried)")
    parser.add_argument("--pairs-near", type=int, default=2, help="key-value pairs after the gap (all queried)")
    parser.add_argument("--keys", type=int, default=64, help="key vocabulary (distinct keys within a sequence)")
    parser.add_argument("--values", type=int, default=64, help="value vocabulary (chance is 1 / values)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-std", type=float, default=None,
                        help="initializer_range of all models (Llama, Mistral, Forge; default 0.02)")  # fmt: skip
    parser.add_argument("--forge-overrides", default="{}", help="JSON ForgeConfig fields for the Forge models")
    parser.add_argument("--titans-chunk", type=int, default=8,
                        help="memory_chunk_size of the momentum/deep models (there a modelling choice)")  # fmt: skip
    parser.add_argument("--eval-every", type=int, default=0, help="print held-out near/far every N steps (0: off)")
    parser.add_argument("--timing", action="store_true", help="only time the memory forms")
    parser.add_argument("--timing-rounds", type=int, default=3, help="interleaved rounds of --timing")
    args = parser.parse_args()
    if args.timing:
        memory_timing(repeats=args.timing_rounds)
        return
    names = {"neural": "forge neural", "ema": "forge ema", "none": "forge none",
             "momentum": "forge neural+momentum", "deep": "forge neural+deep",
             "deep-momentum": "forge neural+deep+momentum",
             "llama": "llama (full attention)", "mistral": "mistral (sliding window)"}  # fmt: skip
    task = task_of(args)
    far, near = task.distances("far"), task.distances("near")
    print(f"MQAR: {task.pairs_far} far + {task.pairs_near} near pairs, {task.keys} keys, {task.values} values, gap "
          f"{task.gap} (length {task.length}), window {args.window}, {args.steps} steps x {args.batch}, AdamW lr "
          f"{args.lr}, threads {torch.get_num_threads()}; chance ~{1 / task.values:.3f}; query-to-value distance "
          f"far {far[0]}-{far[1]}, near {near[0]}-{near[1]}; Forge overrides {args.forge_overrides}")  # fmt: skip
    if near[1] > args.window:
        print(f"  note: some near pairs lie up to {near[1]} tokens before their query, beyond the window {args.window}"
              f" (near is then 'after the gap', not 'inside the window'); far pairs are all beyond "
              f"{far[0]} > 2 x window: {far[0] > 2 * args.window}")  # fmt: skip
    results = {}
    for key in args.models:
        name = names[key]
        for trm_steps in args.trm_steps if name.startswith("forge") else [None]:
            label = name if trm_steps is None else f"{name}, trm_max_steps={trm_steps}"
            results[label] = train_and_score(name, args, trm_steps or 0)
            r = results[label]
            print(f"{label:>36}: near {r['near']:.3f}  far {r['far']:.3f}  gates {r['gate_means']}  "
                  f"{r['params'] / 1e3:.0f}k params  {r['train_seconds']} s ({r['ms_per_step']} ms/step)",
                  flush=True)  # fmt: skip
    print(json.dumps(results))


if __name__ == "__main__":
    main()
