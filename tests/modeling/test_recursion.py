"""TRM recursion and ACT halting: causal context use, cache, halting by masking, gradients, loss targets, export."""

import pytest
import torch
import torch.nn.functional as F

from modeling_forge import ForgeForCausalLM


def _model(config, seed=0, spread_halting=True):
    """A model whose refiner does something (random output projections) and whose Q-head halts a spread of positions
    at different steps (random weights, zero bias): the cases an untrained, zero-initialised refiner cannot show."""
    torch.manual_seed(seed)
    model = ForgeForCausalLM(config).eval()
    with torch.no_grad():
        refiner = model.model.recursion.refiner
        refiner.block.down_proj.weight.normal_(0, 0.3)
        if refiner.attn is not None:
            refiner.attn.o_proj.weight.normal_(0, 0.3)
        if spread_halting:
            model.model.recursion.act_head.weight.normal_(0, 0.15)
            model.model.recursion.act_head.bias.zero_()
    return model


def _x(batch=3, length=25, seed=0):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("norm", ["pre", "post", "post_latent"])
def test_an_untrained_refiner_is_the_identity_so_every_step_starts_as_the_backbone_lm(tiny_config, norm):
    torch.manual_seed(0)
    model = ForgeForCausalLM(tiny_config(trm_norm=norm)).eval()
    with torch.no_grad():
        out = model(_x(), output_step_logits=True, act_halting=False)
    for logits in out.step_logits[1:]:
        torch.testing.assert_close(logits, out.step_logits[0], rtol=0, atol=1e-5)
    assert torch.sigmoid(model.model.recursion.act_head.bias).item() < 0.2  # the Q-head starts at "continue"


@pytest.mark.parametrize("norm", ["pre", "post", "post_latent"])
@pytest.mark.parametrize("attention", [True, False])
def test_a_recursion_step_reads_earlier_positions_causally(tiny_config, attention, norm):
    """Changing the features of one position changes later positions' refined states only with the attention refiner,
    and never earlier positions'."""
    model = _model(tiny_config(trm_attention=attention, sliding_window=64, trm_norm=norm), spread_halting=False)
    recursion = model.model.recursion
    h = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(0))
    h2 = h.clone()
    h2[0, 5] += 1.0
    positions = torch.arange(12)[None]
    rope = model.model.rotary_emb(h, positions)
    with torch.no_grad():
        a = recursion(h, rope, None, None, keep_steps=True, halting=False)
        b = recursion(h2, rope, None, None, keep_steps=True, halting=False)
    for step in range(1, len(a.step_hidden_states)):
        diff = (a.step_hidden_states[step] - b.step_hidden_states[step]).abs().amax(-1)[0]
        assert diff[:5].max() == 0  # the past never sees the future
        assert diff[5] > 1e-3
        assert (diff[6:].min() > 1e-6) == attention  # later positions read it only through attention


def _spread_halting_bias(model, x) -> None:
    """Set the Q-head bias so that the non-halting run's first threshold crossings spread over every step.

    Random Q-head weights alone leave the spread to chance (the refiner moves the logits little per step, so some
    draws halt every position at step 0 or never); choosing the bias from the model's own logits makes the spread a
    property of the setup, whatever the memory type or the weights' random draw."""
    head = model.model.recursion.act_head
    with torch.no_grad():
        head.bias.zero_()
        logits = model.model(x, output_step_states=True, act_halting=False).halting_logits  # (B, T, K)
    cut = torch.logit(torch.tensor(model.config.act_threshold)).item()
    last = logits.shape[-1] - 1

    def step_counts(bias: float) -> list[int]:
        crossed = logits + bias > cut
        steps = torch.where(crossed.any(-1), crossed.long().argmax(-1), last)
        return sorted(torch.bincount(steps.flatten(), minlength=last + 1).tolist())

    candidates = (cut - logits[..., 1:] + 1e-4).flatten().tolist()  # each makes some position cross at a later step
    with torch.no_grad():
        head.bias.fill_(max(candidates, key=step_counts))  # the fullest least-used step wins


@pytest.mark.parametrize("memory_type", ["neural", "ema", "none"])
def test_halted_positions_keep_their_state_and_output_their_halting_step(tiny_config, memory_type):
    model = _model(tiny_config(memory_type=memory_type))
    x = _x()
    _spread_halting_bias(model, x)
    with torch.no_grad():
        out = model.model(x, output_step_states=True, act_halting=True)
    states, halt = out.step_hidden_states, out.halt_steps
    assert halt.unique().numel() > 2  # a spread of halting steps
    for step, state in enumerate(states):
        frozen = (halt < step)[..., None]
        torch.testing.assert_close(torch.where(frozen, states[-1], state), state)  # frozen = its final state
        assert torch.equal(out.last_hidden_state[halt == step], state[halt == step])
    probs = torch.sigmoid(out.halting_logits)
    first = (probs > model.config.act_threshold).long().argmax(-1)
    never = ~(probs > model.config.act_threshold).any(-1)
    assert torch.equal(halt, torch.where(never, torch.full_like(first, len(states) - 1), first).clamp(max=3))


def test_thresholds_change_how_many_steps_run(tiny_config):
    x = _x(4, 32)
    mean_steps = {}
    for threshold in (0.3, 0.5, 0.7):
        model = _model(tiny_config(act_threshold=threshold))
        with torch.no_grad():
            mean_steps[threshold] = model(x).halt_steps.float().mean().item()
    assert mean_steps[0.3] < mean_steps[0.5] < mean_steps[0.7] < 3.0


@pytest.mark.parametrize(
    "memory_type, norm", [("ema", "pre"), ("none", "pre"), ("none", "post"), ("none", "post_latent")]
)
def test_cached_decoding_with_halting_equals_one_forward(tiny_config, memory_type, norm):
    """Pieces of 1-12 tokens through the cache (window 8) give the uncached logits in float64, with halting on: a
    one-token piece that halts early takes the eager shortcut that writes its frozen keys/values once per slot."""
    model = _model(tiny_config(memory_type=memory_type, trm_norm=norm)).double()
    x = _x(2, 40, seed=9)
    with torch.no_grad():
        full = model(x)
        out = model(x[:, :13], use_cache=True)
        pieces, cache = [out.logits], out.past_key_values
        for start in range(13, 40):
            out = model(x[:, start : start + 1], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
            cache = out.past_key_values
    assert full.halt_steps.unique().numel() > 1
    steps = model.config.trm_max_steps * model.config.trm_micro_steps
    assert len(cache.layers) == model.config.num_hidden_layers + steps  # one slot per refiner application
    torch.testing.assert_close(torch.cat(pieces, dim=1), full.logits, rtol=0, atol=1e-10)


def test_post_norm_refiner_keeps_its_states_at_unit_scale_where_the_residual_one_grows(tiny_config):
    """With strong refiner weights the residual ("pre") latent grows step after step (on the depth probe its
    attention output reached 9x the features' scale and the readout shut); TRM's post-norm form keeps every state
    at the norm's scale (weights 1 here: root mean square 1)."""
    scales = {}
    for norm in ("pre", "post"):
        model = _model(tiny_config(trm_norm=norm, trm_max_steps=3), spread_halting=False)
        with torch.no_grad():
            for layer in (model.model.recursion.refiner.attn.o_proj, model.model.recursion.refiner.block.down_proj):
                layer.weight.normal_(0, 1.0)
        recursion, seen = model.model.recursion, []
        original = recursion._cycle

        def spy(*args, _original=original, _seen=seen):
            y, z = _original(*args)
            _seen.append((z.pow(2).mean(-1).sqrt().mean().item(), y.pow(2).mean(-1).sqrt().mean().item()))
            return y, z

        recursion._cycle = spy
        with torch.no_grad():
            model(_x(), act_halting=False)
        scales[norm] = seen
    for z_rms, y_rms in scales["post"]:
        assert abs(z_rms - 1.0) < 1e-3 and abs(y_rms - 1.0) < 1e-3
    pre_z = [z for z, _ in scales["pre"]]
    assert pre_z[0] > 1.2 and pre_z[-1] > 3.0 * pre_z[0]  # the check fires on the unbounded form (1.3, 2.8, 4.7)


def test_fewer_inference_steps_and_trm_cycles(tiny_config):
    model = _model(tiny_config(), spread_halting=False)
    x = _x()
    with torch.no_grad():
        full = model(x, act_halting=False, output_step_logits=True)
        two = model(x, act_halting=False, recursion_steps=2)
        torch.testing.assert_close(two.logits, full.step_logits[2])
        with pytest.raises(ValueError, match="recursion_steps"):
            model(x, recursion_steps=5)
    cycled = _model(tiny_config(trm_cycles=2), spread_halting=False)
    with torch.no_grad():
        assert (cycled(x, act_halting=False).logits - full.logits).abs().max() > 1e-4  # the extra cycle computes


def test_detach_rule_between_supervision_steps(tiny_config):
    """With deep supervision the carry is detached between steps (TRM): the last step's loss does not reach what
    only step 1 computed (`z_0 = P_z h`), but still trains the backbone through `h`; without detaching it reaches
    both. The grad-free earlier cycle (trm_cycles=2) gives `z_init` nothing either."""
    x = _x(2, 20)
    backbone = "model.layers.0.self_attn.q_proj.weight"
    cases = (({}, False), ({"trm_detach_between_steps": False}, True), ({"trm_max_steps": 1, "trm_cycles": 2}, False))
    for overrides, reaches_step_one in cases:
        model = _model(tiny_config(**overrides), spread_halting=False).train()
        out = model(x, act_halting=False)
        F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1)).backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        assert grads[backbone] is not None and grads[backbone].abs().sum() > 0
        z_init = grads["model.recursion.refiner.z_init.weight"]
        assert (z_init is not None and z_init.abs().sum() > 0) == reaches_step_one, overrides


def test_eval_mode_with_grad_and_no_labels_trains_the_backbone(tiny_config):
    """The earlier inference path ran under no_grad: logits required grad (tied head) but the backbone got none."""
    model = _model(tiny_config())
    out = model(_x())  # eval mode, ACT on, gradients enabled, no labels
    assert out.halt_steps.unique().numel() > 1
    out.logits.logsumexp(-1).sum().backward()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.recursion.refiner.block.up_proj.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_shift_labels_are_used_as_the_targets(tiny_config):
    model = _model(tiny_config(deep_supervision=False))
    x = _x(2, 16)
    shifted = F.pad(x, (0, 1), value=-100)[:, 1:]
    other = torch.roll(shifted, 1, dims=1)
    other[:, 0] = -100
    with torch.no_grad():
        by_labels = model(x, labels=x)
        by_shift = model(x, shift_labels=shifted)
        by_other = model(x, shift_labels=other)
    torch.testing.assert_close(by_shift.loss, by_labels.loss)
    manual = F.cross_entropy(by_other.logits.reshape(-1, 97), other.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(by_other.lm_loss, manual)
    assert (by_other.loss - by_labels.loss).abs() > 0.01


def test_act_target_is_step_correctness_and_halted_positions_are_not_supervised_again(tiny_config):
    model = _model(tiny_config(act_loss_weight=1.0, act_exploration=0.0, deep_supervision=True, act_target="correct"))
    x = _x(2, 16)
    with torch.no_grad():
        out = model(x, labels=x, output_step_logits=True)
    targets = x[:, 1:]
    halt = out.halt_steps[:, :-1]
    probs = out.halting_probs[:, :-1]
    steps = len(out.step_logits)
    act, terms = 0.0, []
    for step, logits in enumerate(out.step_logits):
        correct = (logits[:, :-1].argmax(-1) == targets).float()
        refining = (halt >= step).float()
        bce = F.binary_cross_entropy(probs[..., step].double(), correct.double(), reduction="none")
        act = act + (bce * refining).sum() / steps
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, 97), targets.reshape(-1), reduction="none").view_as(correct)
        terms.append((ce if step == steps - 1 else ce * refining).sum() / targets.numel())
    torch.testing.assert_close(out.act_loss.double(), act / targets.numel(), rtol=1e-4, atol=1e-6)
    weights = torch.tensor(model.config.trm_step_weights)
    torch.testing.assert_close(out.lm_loss, (weights * torch.stack(terms)).sum() / weights.sum(), rtol=1e-5, atol=0)


def test_exploration_keeps_some_positions_refining_in_training_with_labels_only(tiny_config):
    model = _model(tiny_config(act_exploration=0.5, act_halting_in_training=True), spread_halting=False)
    with torch.no_grad():
        model.model.recursion.act_head.bias.fill_(12.0)  # q ~ 1: halts at step 0 unless exploring
        x = _x(4, 32)
        assert model(x).halt_steps.max() == 0
        assert model.train()(x).halt_steps.max() == 0  # no labels, no ACT loss: nothing to explore for
        explored = model(x, labels=x).halt_steps
    share = (explored > 0).float().mean()
    assert 0.3 < share < 0.7  # about half the positions explore a random minimum step in 1..3
    assert set(explored.unique().tolist()) == {0, 1, 2, 3}


def test_the_forward_exports_with_halting(tiny_config):
    """ACT by masking has no data-dependent control flow under torch.export (the eager shortcut is skipped)."""
    model = _model(tiny_config(), spread_halting=True)
    x = _x(3, 25)
    with torch.no_grad():
        exported = torch.export.export(model, (x,), kwargs={"use_cache": False})
        expected = model(x, use_cache=False)
        got = exported.module()(x, use_cache=False)
    assert expected.halt_steps.unique().numel() > 1
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.halt_steps, expected.halt_steps)


def _saturated_act_loss(step_logits, targets, probs, halt, margin):
    """Reference ACT loss for `act_target="saturated"`: BCE of q_t against "no later step lowers this token's loss by
    more than the margin", on the positions that ran step t+1, averaged over the K-1 deciding steps."""
    ces = torch.stack(
        [F.cross_entropy(s[:, :-1].reshape(-1, 97), targets.reshape(-1), reduction="none") for s in step_logits], -1
    )  # (N, K)
    steps = ces.shape[-1]
    total = 0.0
    for step in range(steps - 1):
        later = ces[:, step + 1 :].min(-1).values
        target = (later > ces[:, step] - margin).double()
        ran_next = (halt.reshape(-1) > step).double()
        bce = F.binary_cross_entropy(probs[..., step].reshape(-1).double(), target, reduction="none")
        total = total + (bce * ran_next).sum() / (steps - 1)
    return total / targets.numel(), ces


@pytest.mark.parametrize("halting", [False, True])
def test_saturated_act_target_is_whether_a_later_step_still_lowers_the_loss(tiny_config, halting):
    margin = 0.002  # small enough that the random refiner's step-to-step changes cross it both ways
    model = _model(tiny_config(act_loss_weight=1.0, act_exploration=0.0, act_target="saturated",
                               act_saturation_margin=margin))  # fmt: skip
    x = _x(2, 16)
    if halting:
        _spread_halting_bias(model, x)
    with torch.no_grad():
        out = model(x, labels=x, output_step_logits=True, act_halting=halting)
    halt = out.halt_steps[:, :-1]
    assert (halt.unique().numel() > 2) == halting  # halted positions are left out of the targets of later steps
    expected, ces = _saturated_act_loss(out.step_logits, x[:, 1:], out.halting_probs[:, :-1], halt, margin)
    torch.testing.assert_close(out.act_loss.double(), expected, rtol=1e-4, atol=1e-6)
    # Both targets occur: the random refiner lowers some tokens' loss by more than the margin and raises others'.
    later_best = ces[:, 1:].min(-1).values
    assert (later_best < ces[:, 0] - margin).any() and (later_best > ces[:, 0] - margin).any()


def test_training_runs_every_step_unless_act_halting_in_training_and_reports_the_would_halt_step(tiny_config):
    """With `act_halting_in_training=False` a training forward with labels runs every step on every position (the
    logits are the non-halting ones) and reports where ACT would halt; with it on, training halts by masking."""
    x = _x(3, 20)
    for in_training in (False, True):
        model = _model(tiny_config(act_halting_in_training=in_training, act_exploration=0.0))
        _spread_halting_bias(model, x)
        with torch.no_grad():
            every = model(x, act_halting=False, output_step_logits=True)
            halting = model(x)
            trained = model.train()(x, labels=x)
        assert halting.halt_steps.unique().numel() > 2
        if in_training:
            torch.testing.assert_close(trained.logits, halting.logits)
            assert torch.equal(trained.halt_steps, halting.halt_steps)
        else:
            torch.testing.assert_close(trained.logits, every.logits)
            crossed = every.halting_probs > model.config.act_threshold
            would = torch.where(crossed.any(-1), crossed.long().argmax(-1), 3)
            assert torch.equal(trained.halt_steps, would)
            assert (trained.logits - halting.logits).abs().max() > 1e-4  # inference does halt


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"act_target": "right"}, "act_target"),
        ({"act_saturation_margin": -0.1}, "act_saturation_margin"),
        ({"trm_norm": "sandwich"}, "trm_norm"),
        ({}, None),
    ],
)
def test_act_target_fields_are_validated(tiny_config, overrides, field):
    if field is None:
        assert tiny_config(act_target="saturated", act_saturation_margin=0.0).act_target == "saturated"
        return
    with pytest.raises(ValueError, match=rf"ForgeConfig\.{field} .* Fix: "):
        tiny_config(**overrides)


def test_act_threshold_calibration_picks_the_lowest_threshold_within_the_budget(tiny_config):
    """`calibrate_act_threshold` keeps the lowest candidate whose ACT loss on every source is within the relative
    budget of running every step, sets it on the config, counts steps on real tokens only, and with no candidate
    within budget leaves the threshold as it was."""
    model = _model(tiny_config())
    x, y = _x(3, 25), _x(3, 25, seed=1)
    _spread_halting_bias(model, x)
    labels = y.clone()
    labels[:, :10] = -100  # unlabelled positions must not count
    sources = {"a": (x, x), "b": (y, labels)}
    candidates = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    table = model.calibrate_act_threshold(sources, max_loss_increase=1e9, candidates=candidates)["table"]
    assert model.config.act_threshold == 0.3  # everything is within an unbounded budget
    worst = {value: max(increase for _, increase in row.values()) for value, row in table.items()}
    assert len({round(v, 6) for v in worst.values()}) > 2  # the thresholds do change the loss
    budget = sorted(worst.values())[len(worst) // 2]
    result = model.calibrate_act_threshold(sources, max_loss_increase=budget, candidates=candidates)
    expected = min(value for value in candidates if worst[value] <= budget)
    assert result["threshold"] == expected == model.config.act_threshold
    # Steps are counted on real tokens: the halting forward's mean over labelled positions only.
    model.config.act_threshold = expected
    with torch.no_grad():
        halts = model(y, act_halting=True).halt_steps[:, 9:-1].float().mean()  # positions predicting labels 10..
    assert result["table"][expected]["b"][0] == pytest.approx(float(halts))
    none = model.calibrate_act_threshold(sources, max_loss_increase=min(worst.values()) - 1e-3, candidates=candidates)
    assert none["threshold"] is None and model.config.act_threshold == expected  # unchanged
    with pytest.raises(ValueError, match="sources` is empty"):
        model.calibrate_act_threshold({})
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        model.calibrate_act_threshold(sources, candidates=(0.5, 1.0))
