"""MuGrokfast: each part checked against its formula or a torch reference, then QK-clip, STE, Trainer resume."""

import copy
import logging
import math
import re

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from transformers import TrainerCallback

from modeling_forge import ForgeConfig, ForgeForCausalLM
from trainers import ForgeTrainer, ForgeTrainingArguments
from trainers.mugrokfast import (
    MuGrokfast,
    MuGrokfastCallback,
    MuGrokfastConfig,
    create_mugrokfast,
    muon_lr_scale,
    split_parameters,
    zeropower_via_newtonschulz,
)

VOCAB = 97
TAU = 0.05


def tiny_forge(seed: int = 0, **overrides) -> ForgeForCausalLM:
    """A tiny Forge LM (hidden 64, 2 layers, 4 heads, vocab 97)."""
    torch.manual_seed(seed)
    values = {"vocab_size": VOCAB, "sliding_window": 8, "memory_chunk_size": 4, **overrides}
    return ForgeForCausalLM(ForgeConfig.from_preset("tiny", **values))


def no_extras(**overrides) -> MuGrokfastConfig:
    """A config with Grokfast and QK-clip off unless overridden."""
    return MuGrokfastConfig(**{"grokfast_lambda": 0.0, "qk_clip_tau": None, **overrides})


# ----------------------------------------------------------------------------------------------------------------
# Grokfast, Newton-Schulz, Muon and AdamW parts
# ----------------------------------------------------------------------------------------------------------------


def test_grokfast_filter_matches_the_formula_over_several_steps():
    """ema = a*ema + (1-a)*g (starting at g_1), g <- g + lambda*ema, fed to AdamW and Muon: checked by hand."""
    alpha, lam = 0.9, 2.0
    torch.manual_seed(0)
    vec = nn.Parameter(torch.randn(6))  # 1-D: AdamW group
    mat = nn.Parameter(torch.randn(8, 4))  # 2-D: Muon group
    ref_vec, ref_mat = nn.Parameter(vec.detach().clone()), nn.Parameter(mat.detach().clone())
    config = no_extras(grokfast_alpha=alpha, grokfast_lambda=lam, ns_dtype="bfloat16")
    opt = MuGrokfast([{"params": [mat]}, {"params": [vec], "kind": "adamw", "weight_decay": 0.0}], config)
    ref_adamw = torch.optim.AdamW([ref_vec], lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=0.0)
    ref_muon = torch.optim.Muon([ref_mat], lr=config.lr, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ema = {}
    for step in range(4):
        grads = {"vec": torch.randn(6) * (step + 1), "mat": torch.randn(8, 4)}
        filtered = {}
        for name, g in grads.items():
            ema[name] = g.clone() if step == 0 else alpha * ema[name] + (1 - alpha) * g
            filtered[name] = g + lam * ema[name]
        vec.grad, mat.grad = grads["vec"].clone(), grads["mat"].clone()
        ref_vec.grad, ref_mat.grad = filtered["vec"], filtered["mat"]
        opt.step()
        ref_adamw.step()
        ref_muon.step()
        torch.testing.assert_close(opt.state[vec]["grokfast_ema"], ema["vec"])
        torch.testing.assert_close(opt.state[mat]["grokfast_ema"], ema["mat"])
        torch.testing.assert_close(vec.detach(), ref_vec.detach())
        torch.testing.assert_close(mat.detach(), ref_mat.detach())
        raw = math.sqrt(sum(float(g.norm()) ** 2 for g in grads.values()))
        amplified = math.sqrt(sum(float(g.norm()) ** 2 for g in filtered.values()))
        assert opt.last_metrics["optim/grad_ema_ratio"] == pytest.approx(amplified / raw, rel=1e-5)
    assert opt.last_metrics["optim/grad_ema_ratio"] > 1.05  # the filter really amplified


@pytest.mark.parametrize("shape", [(64, 64), (128, 32), (32, 96), (1, 16), (16, 1)])
def test_newton_schulz_is_near_orthogonal_for_every_shape(shape):
    """Singular values land in the quintic's band [0.68, 1.2] for square, tall, wide and vector-shaped inputs."""
    torch.manual_seed(0)
    rows, cols = shape
    if rows == cols:  # a square Gaussian has near-zero singular values; use a spectrum in [0.1, 1]
        u, _ = torch.linalg.qr(torch.randn(rows, rows))
        v, _ = torch.linalg.qr(torch.randn(cols, cols))
        matrix = u @ torch.diag(torch.linspace(0.1, 1.0, rows)) @ v.T
    else:
        matrix = torch.randn(shape)
    out = zeropower_via_newtonschulz(matrix)
    assert out.shape == matrix.shape and out.dtype == torch.float32
    singular = torch.linalg.svdvals(out)
    assert singular.min() >= 0.67 and singular.max() <= 1.21, singular
    # Exactly U p(S) V^T: the input's singular vectors, each singular value through 5 steps of the quintic.
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    x = s / s.norm()
    for _ in range(5):
        x = 3.4445 * x - 4.7750 * x**3 + 2.0315 * x**5
    torch.testing.assert_close(out.double(), u @ torch.diag(x) @ vh, atol=1e-4, rtol=0)


def test_muon_branch_matches_torch_muon():
    """Same updates as torch.optim.Muon (match_rms_adamw) bit for bit in bf16, and within bf16 error in fp32."""
    torch.manual_seed(0)
    ours_bf16, ours_fp32, ref = (nn.Parameter(torch.randn(48, 96) * 0.05) for _ in range(3))
    with torch.no_grad():
        ours_fp32.copy_(ours_bf16)
        ref.copy_(ours_bf16)
    opt_bf16 = MuGrokfast([{"params": [ours_bf16]}], no_extras(ns_dtype="bfloat16"))
    opt_fp32 = MuGrokfast([{"params": [ours_fp32]}], no_extras())
    opt_ref = torch.optim.Muon([ref], lr=1e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    start = ref.detach().clone()
    for _ in range(5):
        grad = torch.randn(48, 96)
        for p in (ours_bf16, ours_fp32, ref):
            p.grad = grad.clone()
        for opt in (opt_bf16, opt_fp32, opt_ref):
            opt.step()
    assert torch.equal(ours_bf16, ref)
    moved = (ref - start).norm()
    assert (ours_fp32 - ref).norm() < 0.05 * moved


def test_parameter_groups_follow_the_spec():
    model = tiny_forge()
    split = split_parameters(model, MuGrokfastConfig())
    names = {kind: {n for n, _ in group} for kind, group in split.items()}
    every = [n for group in names.values() for n in group]
    assert sorted(every) == sorted(n for n, _ in model.named_parameters())  # each exactly once (tied head: once)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "model.embed_tokens.weight" in names["adamw"]
    for name, param in model.named_parameters():
        if param.ndim < 2:
            assert name in names["adamw_no_decay"], name
        elif re.search(r"\.gate\.|act_head|embed_tokens|memory\.conv_weight", name):
            assert name in names["adamw"], name
        else:
            assert name in names["muon"], name
    assert any(".gate.fc1.weight" in n for n in names["adamw"])
    assert "model.recursion.act_head.weight" in names["adamw"]
    expected_muon = ("q_proj", "k_proj", "v_proj", "o_proj", "memory.q_proj", "memory.o_proj", "mlp.gate_proj")
    assert "model.layers.0.memory.conv_weight" in names["adamw"]
    for part in (*expected_muon, "refiner.z_init", "refiner.attn.q_proj", "refiner.block.down_proj"):
        assert any(part in n for n in names["muon"]), part
    untied = split_parameters(tiny_forge(tie_word_embeddings=False), MuGrokfastConfig())
    assert "lm_head.weight" in {n for n, _ in untied["adamw"]}
    opt = create_mugrokfast(model, MuGrokfastConfig())
    assert [g["name"] for g in opt.param_groups] == ["muon", "adamw", "adamw_no_decay"]
    deep = split_parameters(tiny_forge(memory_type="neural", memory_deep=True), MuGrokfastConfig())  # 3-D: AdamW
    assert "model.layers.0.memory.deep_w1" in {n for n, _ in deep["adamw"]}
    assert not any("deep_w" in n for n, _ in deep["muon"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_every_muon_shape_gets_an_orthogonalised_shape_scaled_update():
    """No shape is skipped: each Muon weight moves by lr * 0.2*sqrt(max dim) * (a near-orthogonal matrix)."""
    model = tiny_forge()
    config = no_extras(weight_decay=0.0)
    opt = create_mugrokfast(model, config)
    muon_params = opt.param_groups[0]["params"]
    shapes = {tuple(p.shape) for p in muon_params}
    assert {(64, 64), (2, 64), (192, 64), (64, 192), (128, 64), (64, 128)} <= shapes  # (2, 64): memory rates
    before = [p.detach().clone() for p in muon_params]
    torch.manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    for p, old in zip(muon_params, before, strict=True):
        delta = (old - p.detach()) / (config.lr * muon_lr_scale(p.shape, "match_rms_adamw"))
        singular = torch.linalg.svdvals(delta)
        if p.shape[0] == p.shape[1]:  # square Gaussian gradients have a few near-null directions
            singular = singular[: int(0.8 * singular.numel())]
        assert singular.min() > 0.6 and singular.max() < 1.25, (tuple(p.shape), singular)


def test_weight_decay_acts_with_zero_gradients():
    model = tiny_forge()
    config = MuGrokfastConfig(lr=1e-2, weight_decay=0.5, fallback_lr=2e-2, fallback_weight_decay=0.25)
    opt = create_mugrokfast(model, config)
    before = {p: p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    factors = {"muon": 1 - 1e-2 * 0.5, "adamw": 1 - 2e-2 * 0.25, "adamw_no_decay": 1.0}
    for group in opt.param_groups:
        for p in group["params"]:
            torch.testing.assert_close(p.detach(), before[p] * factors[group["name"]])
    assert not torch.equal(model.model.embed_tokens.weight, before[model.model.embed_tokens.weight])


def test_adamw_branch_matches_torch_adamw():
    model = tiny_forge()
    reference = copy.deepcopy(model)
    config = no_extras(fallback_lr=3e-3, fallback_weight_decay=0.2, betas=(0.8, 0.95))
    opt = create_mugrokfast(model, config)
    ref_split = split_parameters(reference, config)
    ref_opt = torch.optim.AdamW(
        [
            {"params": [p for _, p in ref_split["adamw"]], "weight_decay": 0.2},
            {"params": [p for _, p in ref_split["adamw_no_decay"]], "weight_decay": 0.0},
        ],
        lr=3e-3,
        betas=(0.8, 0.95),
        eps=config.eps,
    )
    params = dict(model.named_parameters())
    ref_params = dict(reference.named_parameters())
    fallback = [n for n, _ in ref_split["adamw"] + ref_split["adamw_no_decay"]]
    for step in range(5):
        torch.manual_seed(step)
        for name in params:
            params[name].grad = torch.randn_like(params[name])
            ref_params[name].grad = params[name].grad.clone()
        opt.step()
        ref_opt.step()
    for name in fallback:
        torch.testing.assert_close(params[name], ref_params[name], rtol=0, atol=1e-7)
    assert not torch.equal(params[fallback[0]], tiny_forge().get_parameter(fallback[0]))


# ----------------------------------------------------------------------------------------------------------------
# QK-clip
# ----------------------------------------------------------------------------------------------------------------


def test_qk_clip_bounds_the_attention_logits():
    tau = 5.0
    model = tiny_forge()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():  # blow up layer 0 (heads 0 and 2 most) so its logits exceed tau
        for proj in (attn.q_proj, attn.k_proj):
            proj.weight.mul_(torch.tensor([30.0, 1.0, 60.0, 1.0]).repeat_interleave(16)[:, None])
    torch.manual_seed(1)
    batch = torch.randint(0, VOCAB, (2, 24))
    before = model(input_ids=batch, output_attention_logit_max=True).attention_logit_max
    assert before[0, 0] > tau and before[0, 2] > tau and before[1].max() < tau
    q_head1 = attn.q_proj.weight[16:32].detach().clone()
    # The clip uses this step's logits, so the step's own update may move them a little: a small lr keeps that <1%.
    opt = create_mugrokfast(model, MuGrokfastConfig(lr=1e-4, qk_clip_tau=tau))
    out = model(input_ids=batch, labels=batch, output_attention_logit_max=True)
    out.loss.backward()
    opt.record_attention_logit_max(out.attention_logit_max)
    opt.step()
    over = int((out.attention_logit_max > tau).sum())
    assert opt.last_metrics["optim/qk_clip_count"] == over >= 2
    after = model(input_ids=batch, output_attention_logit_max=True).attention_logit_max
    assert after.max() <= tau * 1.01, after
    assert after[0, 0] >= tau * 0.95  # scaled down to tau, not below it
    # An unclipped head moved only by the (tiny) optimizer update, not by a rescale.
    assert (attn.q_proj.weight[16:32] - q_head1).abs().max() < 1e-3


def test_qk_clip_needs_attention_projections():
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="self_attn.q_proj"):
        create_mugrokfast(mlp, MuGrokfastConfig(qk_clip_tau=30.0))
    opt = create_mugrokfast(mlp, MuGrokfastConfig(qk_clip_tau=None))
    assert not opt.qk_clip_enabled


# ----------------------------------------------------------------------------------------------------------------
# STE mode
# ----------------------------------------------------------------------------------------------------------------


def ternary(weight: torch.Tensor) -> torch.Tensor:
    """BitNet b1.58 absmean ternary quantization."""
    scale = weight.abs().mean().clamp(min=1e-8)
    return (weight / scale).round().clamp(-1, 1) * scale


class STELinear(nn.Linear):
    """A BitLinear stand-in: `.weight` is the fp shadow, the forward uses its ternary copy through an STE."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + (ternary(self.weight) - self.weight).detach()
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class DetachedQuantLinear(nn.Linear):
    """The bug STE mode must flag: the forward uses a detached quantized copy, so the shadow gets no gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, ternary(self.weight).detach(), self.bias)


def test_ste_mode_trains_the_shadow_weights_of_a_ternary_layer():
    torch.manual_seed(0)
    teacher = nn.Linear(16, 4)
    model = nn.Sequential(STELinear(16, 32), nn.ReLU(), STELinear(32, 4))
    # A frozen ternary cache, as a packed layer might keep: never updated, never orthogonalised.
    model[0].register_parameter("weight_ternary", nn.Parameter(ternary(model[0].weight.detach()), False))
    frozen = model[0].weight_ternary.detach().clone()
    opt = create_mugrokfast(model, MuGrokfastConfig(lr=2e-2, qk_clip_tau=None, ste_mode=True))
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]  # 2 shadows -> Muon, 2 biases -> AdamW
    x = torch.randn(256, 16)
    y = teacher(x).detach()
    shadow0 = model[0].weight.detach().clone()
    losses = []
    for _ in range(60):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.equal(model[0].weight, shadow0)
    assert model[0].weight.detach().unique().numel() > 3  # the shadow stays full precision (not ternary)
    assert not torch.equal(ternary(model[0].weight.detach()), ternary(shadow0))  # ...and moved the ternary weights
    assert torch.equal(model[0].weight_ternary, frozen)
    state = opt.state[model[0].weight]
    assert {k: v.dtype for k, v in state.items()} == {"grokfast_ema": torch.float32, "momentum_buffer": torch.float32}


def test_ste_mode_keeps_fp32_master_weights_for_bf16_shadows(tmp_path):
    torch.manual_seed(0)
    layer = STELinear(32, 32, bias=False).to(torch.bfloat16)
    opt = create_mugrokfast(layer, MuGrokfastConfig(lr=1e-4, qk_clip_tau=None, ste_mode=True, weight_decay=0.0))
    start = layer.weight.detach().float().clone()
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    for _ in range(3):
        layer(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    state = opt.state[layer.weight]
    assert all(v.dtype == torch.float32 for v in state.values())
    master = state["master"]
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight, master.to(torch.bfloat16))
    # Each step moves weights by ~lr * 0.2*sqrt(32) ~ 1e-4, below bf16's resolution: only the master records it.
    assert (master - start).abs().max() > 1e-4
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    fresh = create_mugrokfast(layer, MuGrokfastConfig(lr=1e-4, qk_clip_tau=None, ste_mode=True, weight_decay=0.0))
    fresh.load_state_dict(torch.load(tmp_path / "opt.pt"))
    assert torch.equal(fresh.state[layer.weight]["master"], master)


def test_ste_mode_warns_when_a_shadow_weight_gets_no_gradient(caplog):
    model = nn.Sequential(STELinear(8, 8), nn.ReLU(), DetachedQuantLinear(8, 2, bias=False))
    opt = create_mugrokfast(model, MuGrokfastConfig(qk_clip_tau=None, ste_mode=True))
    model(torch.randn(4, 8)).sum().backward()
    with caplog.at_level(logging.WARNING):
        opt.step()
    assert "2.weight" in caplog.text and "straight-through" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# Configuration, health monitor, Trainer integration
# ----------------------------------------------------------------------------------------------------------------


def test_phase_presets_and_validation():
    p1, p3, p5, p6 = (MuGrokfastConfig.for_phase(n) for n in (1, 3, 5, 6))
    assert (p1.lr, p1.grokfast_lambda, p1.qk_clip_tau) == (1e-3, 0.3, 30.0)
    assert (p3.lr, p3.grokfast_lambda, p3.qk_clip_tau) == (5e-4, 0.1, 25.0)
    assert (p5.lr, p5.resolved_fallback_lr, p5.grokfast_lambda, p5.qk_clip_tau, p5.ste_mode) == (
        5e-4,
        1e-4,
        2.0,
        25.0,
        True,
    )
    assert (p6.lr, p6.grokfast_lambda, p1.resolved_fallback_lr) == (1e-4, 0.2, 1e-3)
    assert MuGrokfastConfig.for_phase(7).lr < p6.lr
    assert MuGrokfastConfig.for_phase(1, lr=2e-3).lr == 2e-3
    with pytest.raises(ValueError, match="phase 2"):
        MuGrokfastConfig.for_phase(2)
    for bad, field_name in (
        ({"grokfast_alpha": 1.0}, "grokfast_alpha"),
        ({"lr": 0.0}, "lr"),
        ({"lr_scaling": "sqrt"}, "lr_scaling"),
        ({"qk_clip_tau": -1.0}, "qk_clip_tau"),
        ({"ste_mode": True, "ns_dtype": "bfloat16"}, "ns_dtype"),
    ):
        with pytest.raises(ValueError, match=rf"MuGrokfastConfig\.{field_name} .*Fix:"):
            MuGrokfastConfig(**bad)


def test_callback_warns_once_per_excursion(caplog):
    callback = MuGrokfastCallback()
    with caplog.at_level(logging.WARNING):
        assert callback.check({"optim/ortho_error": 0.3, "optim/grad_ema_ratio": 1.2}, grokfast_lambda=0.3) == []
        assert caplog.text == ""
        out = callback.check({"optim/ortho_error": 0.9, "optim/grad_ema_ratio": 3.0}, grokfast_lambda=0.3)
        assert out == ["optim/ortho_error", "optim/grad_ema_ratio"]
        assert "optim/ortho_error=0.9" in caplog.text and "optim/grad_ema_ratio=3" in caplog.text
        caplog.clear()
        callback.check({"optim/ortho_error": 0.95}, grokfast_lambda=0.3)
        assert caplog.text == ""  # still the same excursion
        assert callback.check({"optim/qk_clip_count": 7.0}, total_heads=8) == ["optim/qk_clip_count"]
        assert callback.check({"optim/effective_rank": 0.05}) == ["optim/effective_rank"]


def test_training_arguments_pick_the_optimizer(tmp_path):
    args = ForgeTrainingArguments(output_dir=str(tmp_path), mugrokfast_phase=5, report_to="none")
    assert (args.learning_rate, args.weight_decay) == (5e-4, 0.1)
    config = args.mugrokfast_config()
    assert (config.grokfast_lambda, config.resolved_fallback_lr, config.ste_mode) == (2.0, 1e-4, True)
    explicit = ForgeTrainingArguments(output_dir=str(tmp_path), mugrokfast_phase=5, learning_rate=1e-3, qk_clip=False)
    assert explicit.mugrokfast_config().lr == 1e-3 and explicit.mugrokfast_config().qk_clip_tau is None
    muon = ForgeTrainingArguments(output_dir=str(tmp_path), optimizer_type="muon").mugrokfast_config()
    assert (muon.grokfast_lambda, muon.qk_clip_tau) == (0.0, None)
    adamw = ForgeTrainingArguments(output_dir=str(tmp_path), optimizer_type="adamw", report_to="none")
    assert (adamw.learning_rate, adamw.weight_decay) == (5e-5, 0.0)
    trainer = ForgeTrainer(model=tiny_forge(), args=adamw)
    assert isinstance(trainer.create_optimizer(), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer_type"):
        ForgeTrainingArguments(output_dir=str(tmp_path), optimizer_type="sgd")


def random_tokens(n: int = 48, length: int = 16) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, length), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


class RecordLearningRates(TrainerCallback):
    """Keeps every group's learning rate after each optimizer step."""

    def __init__(self) -> None:
        self.history: list[list[float]] = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.history.append([group["lr"] for group in optimizer.param_groups])


def run_trainer(output_dir, max_steps: int, resume: str | None = None, **overrides) -> ForgeTrainer:
    args = ForgeTrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        save_strategy="steps",
        save_steps=3,
        logging_steps=1,
        lr_scheduler_type="linear",
        warmup_steps=2,
        fallback_lr=4e-3,
        learning_rate=2e-3,
        qk_clip_tau=TAU,  # the tiny model's initial logits are ~0.1: QK-clip acts from the start
        optim_metrics_interval=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **overrides,
    )
    trainer = ForgeTrainer(
        model=tiny_forge(), args=args, train_dataset=random_tokens(), callbacks=[RecordLearningRates()]
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_trainer_resume_restores_the_full_optimizer_state(tmp_path):
    """6 uninterrupted steps == 3 steps, checkpoint, resume, 3 more; with Grokfast, Muon, AdamW and QK-clip active."""
    full = run_trainer(tmp_path / "full", max_steps=6)
    checkpoint = tmp_path / "full" / "checkpoint-3"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    keys = set().union(*(s.keys() for s in state["state"].values()))
    assert {"grokfast_ema", "momentum_buffer", "exp_avg", "exp_avg_sq", "step"} <= keys
    resumed = run_trainer(tmp_path / "resumed", max_steps=6, resume=str(checkpoint))
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)

    # The scheduler (warmup, then linear decay) scaled every group alike: the fallback kept its 2x ratio.
    lrs = next(c for c in full.callback_handler.callbacks if isinstance(c, RecordLearningRates)).history
    assert len({round(muon, 9) for muon, _, _ in lrs}) >= 4
    assert all(adamw == pytest.approx(2 * muon) and no_decay == adamw for muon, adamw, no_decay in lrs)
    # Health metrics reached the logs, and QK-clip ran through compute_loss.
    logged = [entry for entry in full.state.log_history if "loss" in entry]
    assert all("optim/grad_ema_ratio" in e and "optim/qk_clip_count" in e for e in logged)
    assert any("optim/ortho_error" in e for e in logged)
    assert logged[0]["optim/qk_clip_count"] == 8  # 2 layers x 4 heads, all above tau at the start
    batch = torch.tensor(random_tokens()["input_ids"][:4])
    logits = full.model(input_ids=batch, output_attention_logit_max=True).attention_logit_max
    assert logits.max() < TAU * 1.5  # held near tau (another batch, and one step of drift, allowed)
