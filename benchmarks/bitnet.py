"""BitNet b1.58 (Phase 4): checkpoint size, CPU speed, and quality after STE fine-tuning vs quantization alone.

    OMP_NUM_THREADS=1 python benchmarks/bitnet.py --part size-speed          # cognate-25m, untrained weights
    OMP_NUM_THREADS=1 python benchmarks/bitnet.py --part accuracy            # tiny model trained here (~10 min)
    OMP_NUM_THREADS=1 python benchmarks/bitnet.py                            # both

size-speed: whole-checkpoint bytes of the packed model per embedding precision vs the fp32 checkpoint (goal >= 8x,
SPEC minimum 6x); the "packed" C++ kernel alone (GEMV GB/s of weights read, next to the machine's memory bandwidth
measured here); and CPU tokens/s of fp32 vs the packed model per kernel ("float": PyTorch only, fp32 ternary cache
and fp32 LM head; "int8": int8 cache + bitsandbytes' int8 GEMM; "packed": the C++ kernel on the 2-bit weights and
the LM head read from the embedding's codes; "packed, fp32 head": that kernel with the fp32 LM head) for batch-1
decoding, batch-8 decoding and a 512-token prefill, at 1 and 2 threads, all models measured in alternation (the
median of --repeats; the machine may be shared, so compare ratios within one run). Greedy tokens must be
identical across the packed kernels.
accuracy: trains a tiny model on the corpus/task mixture, runs Phase 4 on it (`run_phase4`), and fine-tunes an
fp32 copy with the same data, steps and distillation as a control, so the quantization cost is separated from the
gain of training longer. Prints perplexity and next-token accuracy of each, and the drops (goal < 10%).
"""

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import time_it
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, default_data_collator, set_seed

from modeling_forge import ForgeConfig, ForgeForCausalLM
from modeling_forge.bitnet import (
    BitLinear,
    BitNetLayout,
    bitnet_candidates,
    convert_to_bitnet,
    lane_pack,
    pack_bitnet,
    pack_ternary,
    set_bitnet_kernel,
)
from trainers.bitnet_config import BitNetConfig
from trainers.bitnet_trainer import BitNetTrainer, checkpoint_breakdown, evaluate_quality, mixture_blocks, run_phase4
from trainers.data import CurriculumStage, build_curriculum

MIXTURE = {"corpus": 0.5, "arithmetic": 0.25, "kv_recall": 0.25}


def _median_rates(models: dict, fn, repeats: int) -> dict[str, float]:
    """Median of `fn(model)` (a rate) per model, alternating models each repeat (fair on a noisy shared machine)."""
    runs = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            runs[name].append(fn(model))
    return {name: statistics.median(values) for name, values in runs.items()}


def _decode(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        return model.generate(prompt, **kwargs)


def _decode_rate(model, prompt: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    _decode(model, prompt, new_tokens)
    return prompt.shape[0] * new_tokens / (time.perf_counter() - start)


def _prefill_rate(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model(input_ids=ids)
    return ids.numel() / (time.perf_counter() - start)


def memory_bandwidth(threads: int, mbytes: int = 512, repeats: int = 5) -> float:
    """Read bandwidth (GB/s): a sum over an fp32 buffer far larger than the caches, median of `repeats`."""
    torch.set_num_threads(threads)
    buffer = torch.ones(mbytes * 2**20 // 4)
    rate = buffer.numel() * 4 / time_it(buffer.sum, repeats=repeats) / 1e9
    del buffer
    return rate


def _gemv_row(label: str, packed_s: float, packed_bytes: int, dense_s: float, dense_bytes: int) -> str:
    packed = f"packed {packed_s * 1e6:7.1f} us = {packed_bytes / packed_s / 1e9:5.2f} GB/s"
    dense = f"fp32 {dense_s * 1e6:7.1f} us = {dense_bytes / dense_s / 1e9:5.2f} GB/s"
    return f"    {label:<26} {packed}   {dense}   ({dense_s / packed_s:.2f}x)"


def kernel_alone(model, fp32, threads: int, repeats: int) -> None:
    """GEMV (one token) time and GB/s of weights read: the packed kernel on each ternary shape of the model and the
    LM head from the embedding's codes, next to fp32 F.linear on the same shapes and the measured memory bandwidth."""
    torch.set_num_threads(threads)
    ops = torch.ops.forge_bitnet
    qmax = 2 ** (model.config.bitnet["activation_bits"] - 1) - 1
    shapes = {}
    for name, module in model.model.named_modules():
        if isinstance(module, BitLinear):
            shapes.setdefault((module.out_features, module.in_features), name)
    print(f"  kernel alone, {threads} thread(s), one token (GEMV), median of {repeats} x 20 calls:")
    for (out_f, in_f), name in sorted(shapes.items(), key=lambda item: -item[0][0] * item[0][1]):
        layer, x = model.model.get_submodule(name), torch.randn(1, in_f)
        weight = fp32.model.get_submodule(name).weight.detach()
        lanes, scale = layer.weight_lanes, layer.weight_scale

        def packed_calls(x=x, lanes=lanes, scale=scale, out_f=out_f):
            for _ in range(20):
                ops.bitlinear(x, lanes, scale, None, out_f, qmax, 1e-5)

        def dense_calls(x=x, weight=weight):
            for _ in range(20):
                F.linear(x, weight)

        packed_s, dense_s = time_it(packed_calls, repeats=repeats) / 20, time_it(dense_calls, repeats=repeats) / 20
        print(_gemv_row(f"{out_f} x {in_f}", packed_s, lanes.numel(), dense_s, weight.numel() * 4))
    # A layer far larger than the model's (256 MB in fp32, 16 MB packed): the memory-bound regime of bigger models.
    big_w = torch.randint(-1, 2, (8192, 8192), dtype=torch.int8)
    big_lanes = lane_pack(pack_ternary(big_w), 8192)
    big_dense, big_scale, x = big_w.float(), torch.ones(1), torch.randn(1, 8192)
    packed_s = time_it(lambda: ops.bitlinear(x, big_lanes, big_scale, None, 8192, qmax, 1e-5), repeats=repeats)
    dense_s = time_it(lambda: F.linear(x, big_dense), repeats=repeats)
    print(_gemv_row("8192 x 8192 (fp32: 256 MB)", packed_s, big_lanes.numel(), dense_s, big_dense.numel() * 4))
    dense_rate = big_dense.numel() * 4 / dense_s / 1e9
    embedding = model.model.embed_tokens
    if getattr(embedding, "bits", 32) in (8, 4):
        h, codes, scales = torch.randn(1, embedding.embedding_dim), embedding.weight_codes, embedding.weight_scales
        head_s = time_it(
            lambda: ops.lowbit_linear(h, codes, scales, embedding.bits, embedding.group_size), repeats=repeats
        )
        dense_s = time_it(lambda: F.linear(h, fp32.lm_head.weight), repeats=repeats)
        stored = codes.numel() * codes.element_size() + scales.numel() * scales.element_size()
        label = f"LM head {embedding.num_embeddings} x {embedding.embedding_dim}, {embedding.bits}-bit"
        print(_gemv_row(label, head_s, stored, dense_s, fp32.lm_head.weight.numel() * 4))
    ternary_mib = sum(m.weight_lanes.numel() for m in model.modules() if isinstance(m, BitLinear)) / 2**20
    bandwidth = max(memory_bandwidth(threads), dense_rate)
    print(f"    measured memory read bandwidth ({threads} thread(s); the best of torch.sum over 512 MB and the 256 MB "
          f"fp32 GEMV): {bandwidth:.2f} GB/s. The model's ternary weights together are {ternary_mib:.1f} MiB and stay "
          "in cache when decoding")  # fmt: skip


def size_and_speed(args) -> None:
    torch.manual_seed(0)
    config = ForgeConfig.from_preset(args.preset, eos_token_id=None, pad_token_id=0)
    fp32 = ForgeForCausalLM(config).eval()
    n_params = fp32.num_parameters()
    names = bitnet_candidates(fp32)
    print(f"{args.preset}: {n_params / 1e6:.2f}M parameters, {len(names)} linear layers made ternary "
          f"({sum(fp32.model.get_submodule(n).weight.numel() for n in names) / n_params:.1%} of the parameters), "
          f"threads {torch.get_num_threads()}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        fp32.save_pretrained(Path(tmp) / "fp32")
        fp32_file = checkpoint_breakdown(Path(tmp) / "fp32")["file_bytes"]
        print(f"  fp32 checkpoint file {fp32_file:,} bytes (fp16 would be {n_params * 2:,})")
        packed = {}
        for bits in (32, 16, 8, 4):
            model = copy.deepcopy(fp32)
            convert_to_bitnet(model, BitNetLayout(embedding_bits=bits, embedding_group_size=64))
            pack_bitnet(model)
            folder = Path(tmp) / f"packed{bits}"
            model.save_pretrained(folder)
            sizes = checkpoint_breakdown(folder)
            parts = ", ".join(f"{k} {v:,}" for k, v in sizes["components"].items() if v)
            print(f"  packed, embedding {bits:>2} bits: {sizes['file_bytes']:>11,} bytes = "
                  f"{fp32_file / sizes['file_bytes']:5.2f}x smaller than fp32, "
                  f"{n_params * 2 / sizes['file_bytes']:5.2f}x than fp16   [{parts}]")  # fmt: skip
            packed[bits] = folder
        start = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(Path(tmp) / "fp32")
        fp32_load = time.perf_counter() - start
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(packed[args.speed_embedding_bits]).eval()
        packed_load = time.perf_counter() - start
        print(f"  from_pretrained: fp32 {fp32_load:.2f} s, packed {packed_load:.2f} s (includes unpacking once)")
    kernel = set_bitnet_kernel(model, "auto")
    print(f"  from_pretrained chose kernel {kernel!r}" + (f" ({torch.ops.forge_bitnet.isa()})" if kernel == "packed"
                                                             else " (the C++ kernel did not build here)"))  # fmt: skip
    models = {"fp32": fp32}
    for name in ("float", "int8", "packed"):
        if name == "int8" and torch.backends.cpu.get_cpu_capability() != "AVX512":
            continue  # bitsandbytes' CPU int8 GEMM needs AVX-512
        if name == "packed" and kernel != "packed":
            continue
        variant = copy.deepcopy(model)
        set_bitnet_kernel(variant, name)
        variant.lm_head.read_codes = name == "packed"  # "float" and "int8": the PyTorch-only model as before
        models[name] = variant
    if "packed" in models:
        models["packed, fp32 head"] = copy.deepcopy(models["packed"])
        models["packed, fp32 head"].lm_head.read_codes = False
    torch.manual_seed(1)
    vocab = config.vocab_size
    prompts = {1: torch.randint(1, vocab, (1, 16)), 8: torch.randint(1, vocab, (8, 16))}
    tokens = {name: _decode(m, prompts[8], args.new_tokens // 2) for name, m in models.items() if name != "fp32"}
    same = all(torch.equal(t, tokens["float"]) for t in tokens.values())
    print(f"  greedy tokens, batch 8 x {args.new_tokens // 2}: identical across {list(tokens)}: {same}")
    cases = [
        ("decode, batch 1", lambda m: _decode_rate(m, prompts[1], args.new_tokens)),
        ("decode, batch 8", lambda m: _decode_rate(m, prompts[8], args.new_tokens // 2)),
        ("prefill 1x512", lambda m: _prefill_rate(m, torch.randint(1, vocab, (1, 512)))),
    ]
    for threads in args.threads:
        if "packed" in models:
            kernel_alone(models["packed"], fp32, threads, args.repeats)
        torch.set_num_threads(threads)
        print(f"  CPU speed, {threads} thread(s), tokens/s (median of {args.repeats}, models alternating; embedding "
              f"{args.speed_embedding_bits} bits in the packed models):")  # fmt: skip
        for label, fn in cases:
            for m in models.values():  # warm-up
                fn(m)
            rates = _median_rates(models, fn, args.repeats)
            ratios = ", ".join(f"{k} {rates[k] / rates['fp32']:.2f}x" for k in models if k != "fp32")
            print(f"    {label:<16} " + "  ".join(f"{k} {v:7.1f}" for k, v in rates.items()) + f"   vs fp32: {ratios}")


def _train_tiny(folder: Path, tokenizer_texts_chars: int, steps: int, seed: int) -> None:
    """A tiny Forge model trained on the Phase 4 mixture (train split), saved as a phase folder."""
    from evaluation.corpus import corpus_texts
    from evaluation.tasks import get_task_family
    from modeling_forge.tokenization import build_tokenizer
    from trainers.base import ForgeTrainer
    from trainers.phase_output import save_phase_output

    set_seed(seed)
    texts = corpus_texts("train", max_chars=tokenizer_texts_chars)
    for name in ("arithmetic", "kv_recall"):
        family = get_task_family(name)
        texts += [family.training_text(e) for e in family.generate("train", 300, seed=0, difficulty=2)]
    tokenizer = build_tokenizer(texts, 1024)
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}  # fmt: skip
    model = ForgeForCausalLM(ForgeConfig.from_preset("tiny", vocab_size=len(tokenizer), **ids))
    stage = CurriculumStage(name="pretrain", end=1.0, seq_len=128, mixture=MIXTURE, difficulty=(1, 3))
    train = build_curriculum([stage], tokenizer, max_steps=steps, global_batch_size=16, seed=seed + 100)
    args = TrainingArguments(output_dir=str(folder.parent / "pretrain-work"), max_steps=steps,
                             per_device_train_batch_size=16, learning_rate=3e-3, lr_scheduler_type="cosine",
                             warmup_steps=20, save_strategy="no", report_to="none", use_cpu=True, seed=seed,
                             logging_steps=100, disable_tqdm=True)  # fmt: skip
    ForgeTrainer(model=model, args=args, train_dataset=train.dataset, data_collator=default_data_collator).train()
    save_phase_output(folder, model=model, tokenizer=tokenizer, phase=1, phase_name="cognate",
                      config={"benchmark": "tiny", "steps": steps}, seed=seed, wall_time_s=0.0)  # fmt: skip


def _fp_control(tmp: Path, tokenizer, teacher, config: BitNetConfig, steps: int, lr: float) -> dict:
    """The same fine-tuning (data, steps, lr, optimizer, distillation) on an fp32 copy; its quality."""
    control = copy.deepcopy(teacher)
    train_args = BitNetConfig(model_name_or_path="control", output_dir=str(tmp / f"control-{steps}"),
                              data_mixture=MIXTURE, max_steps=steps, report_to="none", use_cpu=True,
                              disable_tqdm=True, learning_rate=lr)  # fmt: skip
    stage = CurriculumStage(name="ste", end=1.0, seq_len=config.block_size, mixture=MIXTURE,
                            difficulty=tuple(config.task_difficulty))  # fmt: skip
    batch = train_args.per_device_train_batch_size
    train = build_curriculum([stage], tokenizer, max_steps=steps, global_batch_size=batch, seed=config.seed)
    BitNetTrainer(model=control, args=train_args, train_dataset=train.dataset, data_collator=default_data_collator,
                  teacher=teacher, distill_weight=config.distill_weight).train()  # fmt: skip
    eval_sets = {
        source: mixture_blocks(tokenizer, {source: 1.0}, n_blocks=config.eval_blocks, block_size=config.block_size,
                               split="validation", seed=0, difficulty=config.task_difficulty)[source]
        for source in MIXTURE
    }  # fmt: skip
    return evaluate_quality(control.eval(), tokenizer, eval_sets, config)


def accuracy(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.time()
        _train_tiny(tmp / "phase1", 1_000_000, args.pretrain_steps, seed=0)
        print(f"tiny model pretrained {args.pretrain_steps} steps in {time.time() - started:.0f} s")
        teacher = AutoModelForCausalLM.from_pretrained(tmp / "phase1").eval()
        tokenizer = AutoTokenizer.from_pretrained(tmp / "phase1")
        for steps in args.ste_steps:
            config = BitNetConfig(model_name_or_path=str(tmp / "phase1"), output_dir=str(tmp / f"phase4-{steps}"),
                                  data_mixture=MIXTURE, max_steps=steps, report_to="none", use_cpu=True,
                                  disable_tqdm=True, speed_new_tokens=0,
                                  embedding_bits=args.embedding_bits)  # fmt: skip
            started = time.time()
            report = run_phase4(config)["report"]
            print(f"Phase 4 ({steps} STE steps) in {time.time() - started:.0f} s; defaults from size: "
                  f"{report['filled_from_size_defaults']}")  # fmt: skip
            control = _fp_control(tmp, tokenizer, teacher, config, steps, report["fine_tuning"]["learning_rate"])
            _print_accuracy(steps, report, control)


def _print_accuracy(steps: int, report: dict, control: dict) -> None:
    """One STE step count's quality table and drops."""
    q = report["quality"]
    rows = [("full precision (input)", q["full_precision"]),
            ("ternary, quantization only (PTQ)", q["post_training_quantization"]),
            (f"ternary + {steps} STE steps (Phase 4 output)", q["bitnet"]),
            (f"fp32 + the same {steps} steps (control)", control)]  # fmt: skip
    print(f"\n{'model':<44} {'perplexity':>10} {'token acc':>10} {'val loss':>9}")
    for label, values in rows:
        print(f"{label:<44} {values['perplexity']:10.3f} {values['token_accuracy']:10.4f} {values['loss']:9.4f}")
    fp, ptq, ste = q["full_precision"], q["post_training_quantization"], q["bitnet"]
    for label, ref in (("input", fp), ("control", control)):
        print(f"vs {label:<8}: PTQ perplexity {ptq['perplexity'] / ref['perplexity'] - 1:+.1%}, token accuracy "
              f"{ptq['token_accuracy'] / ref['token_accuracy'] - 1:+.1%};  STE perplexity "
              f"{ste['perplexity'] / ref['perplexity'] - 1:+.1%}, token accuracy "
              f"{ste['token_accuracy'] / ref['token_accuracy'] - 1:+.1%}")  # fmt: skip
    storage, ternary = report["storage"], report["ternary"]
    print(f"checkpoint {storage['checkpoint_file_bytes']:,} bytes ({storage['compression_vs_fp32']:.2f}x vs "
          f"fp32, embedding {storage['embedding_bits']} bits, first choice "
          f"{storage['embedding_bits_before_fallbacks']}); ternary layers {ternary['layers']}, fallbacks "
          f"{ternary['fallback_layers'] or 'none'}, zeros {ternary['sparsity']:.1%}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["size-speed", "accuracy", "all"], default="all")
    parser.add_argument("--preset", default="cognate-25m")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--speed-embedding-bits", type=int, default=4, choices=[32, 16, 8, 4])
    parser.add_argument("--pretrain-steps", type=int, default=800)
    parser.add_argument("--ste-steps", type=int, nargs="+", default=[200, 600])
    parser.add_argument("--embedding-bits", type=int, default=None, choices=[32, 16, 8, 4])
    args = parser.parse_args()
    if args.part in ("size-speed", "all"):
        size_and_speed(args)
    if args.part in ("accuracy", "all"):
        accuracy(args)


if __name__ == "__main__":
    main()
