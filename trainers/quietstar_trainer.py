"""Phase 3 (Quiet-STaR): the model learns to think before it speaks, and to use what it thought.

Step 1, reasoning baking: a teacher (`trainers.teachers`) writes reasoning examples with thoughts in
`<think> ... </think>` spans; a supervised bake (`bake_examples`: LoRA, the thought tokens' embedding rows, merged)
teaches the model the thought language.

Step 2, Quiet-STaR RL (`QuietStarTrainer`, a `ForgeTrainer`): at sampled positions t of each training sequence the
model samples `n_thoughts` thoughts of `thought_length` tokens after `<think>` (all positions and thoughts of a batch
at once, as left-padded rows through `generate`), closes them with `</think>`, and predicts the next `n_true` true
tokens with the thought in context. The mixing head (`ForgeThoughtMixer`, part of the model) blends those
predictions with the no-thought ones. Loss = NLL of the true tokens under the mix + REINFORCE on the thought tokens'
log-probs only, with reward = the thought's NLL improvement over no thought minus the mean improvement of the
position's thoughts + `kl_weight` * KL(step-1 model || model) on the no-thought predictions.
(Zelikman et al., "Quiet-STaR: Language Models Can Teach Themselves to Think Before Speaking", 2024.)

Anti-theater checks (`AntiTheaterCallback`) run every N steps: thoughts replaced by random tokens must predict
worse, thoughts must not collapse to one string or to repetition, and the mixing weight must not pin to 0.

Inference (`generate_with_thoughts`): every visible token is chosen from the mixed distribution after a thought;
thoughts are produced, used and stripped from the returned text (`show_thoughts=True` keeps them).

Why not TRL: GRPO/RLOO score whole completions with sequence rewards; Quiet-STaR needs per-position thoughts inside
teacher-forced text, a learned mixing of two predictions and token-level REINFORCE on the thoughts only, which no
kept library implements, so `thought_forward`, `quietstar_loss` and the thought-aware decoding are written here.
Trainer provides the loop, optimizer (MuGrokfast), logging and callbacks; `generate` samples the thoughts.
"""

import copy
import json
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed
from transformers.utils import logging

from evaluation.tasks import get_task_family
from hub_cards import line_plot
from modeling_forge.modeling_forge import ForgeThoughtMixer
from modeling_forge.tokenization import STRATEGY_TOKENS, THOUGHT_END, THOUGHT_START, THOUGHT_TOKENS

from .base import ForgeTrainer
from .checkpointing import finished_output, remove_work_dir
from .inputs import check_checkpoint_folder
from .phase_output import save_phase_output
from .quietstar_config import QuietStarConfig

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Thought tokens
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThoughtTokens:
    """Token ids the thought machinery needs: markers, strategy tokens, and ids never sampled inside a thought."""

    start_id: int
    end_id: int
    pad_id: int
    suppress_ids: tuple[int, ...]  # never inside a thought: the markers, BOS, EOS, pad
    strategy_ids: tuple[int, ...] = ()

    @property
    def all_ids(self) -> tuple[int, ...]:
        return (self.start_id, self.end_id, *self.strategy_ids)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ThoughtTokens":
        """Read the ids from a tokenizer that has the thought tokens (see `add_thought_tokens`)."""
        vocab = tokenizer.get_vocab()
        missing = [token for token in THOUGHT_TOKENS if token not in vocab]
        if missing:
            raise ValueError(f"The tokenizer lacks thought tokens {missing}. Fix: call add_thought_tokens first.")
        start, end = vocab[THOUGHT_START], vocab[THOUGHT_END]
        specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        suppress = tuple(sorted({start, end, *(i for i in specials if i is not None)}))
        return cls(start, end, pad, suppress, tuple(vocab[t] for t in STRATEGY_TOKENS))


@torch.no_grad()
def add_thought_tokens(model, tokenizer) -> ThoughtTokens:
    """Make sure `tokenizer` and `model` have the 12 thought tokens; return their ids.

    Tokenizers built by `build_tokenizer` already reserve them at fixed ids. For any other tokenizer the missing
    ones are added as special tokens, the embedding grows when needed (to a multiple of 64), and each new row is
    initialised from existing ones: the mean embedding of the subword tokens that spell the token's name (`think`,
    `decompose`, ...), or the mean of all rows when the name has none. `save_pretrained` then keeps both, so
    `from_pretrained` restores the same ids and rows.
    """
    vocab = tokenizer.get_vocab()
    missing = [token for token in THOUGHT_TOKENS if token not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
        embeddings = model.get_input_embeddings()
        old_rows = embeddings.weight.shape[0]
        if len(tokenizer) > old_rows:
            model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
        weight = model.get_input_embeddings().weight
        mean = weight[:old_rows].mean(dim=0)
        for token in missing:
            token_id = tokenizer.convert_tokens_to_ids(token)
            name = token.strip("<>/")
            pieces = [i for i in tokenizer(name, add_special_tokens=False)["input_ids"] if i < old_rows]
            weight[token_id] = weight[pieces].mean(dim=0) if pieces else mean
        logger.info("Added thought tokens %s (embedding rows %d -> %d)", missing, old_rows, weight.shape[0])
    return ThoughtTokens.from_tokenizer(tokenizer)


def strip_thoughts(text: str) -> str:
    """User-visible text: `<think> ... </think>` spans and stray thought tokens removed."""
    text = re.sub(re.escape(THOUGHT_START) + r".*?" + re.escape(THOUGHT_END), "", text, flags=re.S)
    text = re.sub(re.escape(THOUGHT_START) + r".*\Z", "", text, flags=re.S)  # an unclosed thought at the end
    for token in THOUGHT_TOKENS:
        text = text.replace(token, "")
    return text


def add_mixing_head(model, hidden_size: int | None = None, init_weight: float = 0.3) -> ForgeThoughtMixer:
    """Give a Forge model its Quiet-STaR mixing head (recorded in the config, so it saves and loads) unless it has
    one; a new head starts with mixing weight ~`init_weight` (the bias of its output unit)."""
    if getattr(model, "thought_mixer", None) is not None:
        return model.thought_mixer
    if getattr(model.config, "model_type", None) != "forge":
        raise ValueError("Quiet-STaR's mixing head is part of the Forge architecture. Fix: start from a Forge model.")
    model.config.thought_mixing_hidden_size = hidden_size or max(1, model.config.hidden_size // 2)
    model.config.check()
    mixer = ForgeThoughtMixer(model.config).to(device=model.device, dtype=model.dtype)
    with torch.no_grad():
        mixer.fc2.weight.mul_(0.1)
        mixer.fc2.bias.fill_(math.log(init_weight / (1.0 - init_weight)))
    model.thought_mixer = mixer
    return mixer


# ----------------------------------------------------------------------------------------------------------------
# The Quiet-STaR computation
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThoughtSettings:
    """The knobs of thought sampling and of the loss (a subset of `QuietStarConfig`)."""

    n_thoughts: int = 4
    thought_length: int = 8
    n_true: int = 4
    positions_per_sequence: int = 4
    temperature: float = 1.0
    reinforce_weight: float = 1.0
    kl_weight: float = 0.1
    early_end: bool = True

    @classmethod
    def from_config(cls, config: QuietStarConfig) -> "ThoughtSettings":
        return cls(
            config.n_thoughts,
            config.thought_length,
            config.n_true,
            config.positions_per_sequence,
            config.thought_temperature,
            config.reinforce_weight,
            config.kl_weight,
            config.thought_early_end,
        )


def sample_positions(
    labels: torch.Tensor, per_sequence: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(P, 2) (row, t) positions whose next token carries a label, up to `per_sequence` per row, drawn at random."""
    eligible = torch.zeros_like(labels, dtype=torch.bool)
    eligible[:, :-1] = labels[:, 1:] != -100
    chosen = []
    for row in range(labels.shape[0]):
        candidates = torch.nonzero(eligible[row]).squeeze(-1).cpu()
        if candidates.numel() == 0:
            continue
        order = torch.randperm(candidates.numel(), generator=generator)[:per_sequence]
        for t in sorted(candidates[order].tolist()):
            chosen.append((row, t))
    return torch.tensor(chosen, dtype=torch.long).reshape(-1, 2)


def _prefixes(input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> list[list[int]]:
    """The real (unpadded) tokens up to and including each position."""
    prefixes = []
    for row, t in positions.tolist():
        keep = attention_mask[row, : t + 1].bool()
        prefixes.append(input_ids[row, : t + 1][keep].tolist())
    return prefixes


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, length - len(r) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample_thoughts(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    settings: ThoughtSettings,
    tokens: ThoughtTokens,
    n_thoughts: int | None = None,
) -> torch.Tensor:
    """(P * n_thoughts, thought_length) thought tokens sampled after `prefix + <think>` for every position at once
    (rows ordered position-major: the thoughts of position p are rows p*n .. p*n + n - 1).

    With `settings.early_end` the model may close a thought itself by sampling `</think>` (then the row holds
    `</think>` followed by padding); otherwise every thought has exactly `thought_length` tokens."""
    n = n_thoughts or settings.n_thoughts
    k = settings.thought_length
    rows = [prefix + [tokens.start_id] for prefix in _prefixes(input_ids, attention_mask, positions)]
    ids, mask = _left_pad(rows, tokens.pad_id, input_ids.device)
    suppress = [i for i in tokens.suppress_ids if not (settings.early_end and i == tokens.end_id)]
    generated = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=settings.temperature,
        top_k=0,
        top_p=1.0,
        num_return_sequences=n,
        min_new_tokens=1 if settings.early_end else k,
        max_new_tokens=k,
        eos_token_id=tokens.end_id if settings.early_end else None,
        suppress_tokens=suppress,
        pad_token_id=tokens.pad_id,
        use_cache=True,
    )[:, ids.shape[1] :]
    return F.pad(generated, (0, k - generated.shape[1]), value=tokens.pad_id)  # all rows closed early: pad to k


def thought_content(thought: Sequence[int], tokens: ThoughtTokens) -> tuple[list[int], bool]:
    """A sampled thought's content tokens and whether the model closed it itself (sampled `</think>`)."""
    thought = list(thought)
    if tokens.end_id in thought:
        return thought[: thought.index(tokens.end_id)], True
    return thought, False


@dataclass
class ThoughtRows:
    """Teacher-forced rows `prefix <think> thought </think> true tokens`, left-padded (R = P * n_thoughts)."""

    input_ids: torch.Tensor  # (R, L)
    attention_mask: torch.Tensor  # (R, L)
    thought_index: torch.Tensor  # (R, k) where the sampled thought tokens sit (right-aligned, see thought_mask)
    thought_mask: torch.Tensor  # (R, k) which of those slots hold a sampled token (content, or a sampled </think>)
    target_index: torch.Tensor  # (R, n_true) positions that predict the true tokens (the first is </think>)


def build_thought_rows(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    thoughts: torch.Tensor,
    n_true: int,
    tokens: ThoughtTokens,
) -> ThoughtRows:
    """Rows for the with-thought forward: each position's prefix, `<think>`, its thought, `</think>`, then the
    next `n_true - 1` true tokens (teacher forcing; missing ones at the sequence end are padding, masked later).

    The policy tokens of a row are its thought's content and, when the model closed the thought itself, that
    `</think>`; a `</think>` appended after `thought_length` tokens is forced, not sampled, so it is not one."""
    n_rows = thoughts.shape[0]
    n = n_rows // max(positions.shape[0], 1)
    k = thoughts.shape[1]
    prefixes = _prefixes(input_ids, attention_mask, positions)
    rows, counts = [], []
    for r in range(n_rows):
        p = r // n
        row, t = positions[p].tolist()
        following = input_ids[row, t + 1 : t + n_true][attention_mask[row, t + 1 : t + n_true].bool()].tolist()
        following += [tokens.pad_id] * (n_true - 1 - len(following))
        content, closed = thought_content(thoughts[r].tolist(), tokens)
        rows.append(prefixes[p] + [tokens.start_id] + content + [tokens.end_id] + following)
        counts.append((len(content), closed))
    ids, mask = _left_pad(rows, tokens.pad_id, input_ids.device)
    end = ids.shape[1] - n_true  # index of </think> in every row (all rows end with n_true - 1 true tokens)
    target_index = torch.arange(end, end + n_true, device=ids.device).expand(n_rows, -1)
    thought_index = torch.full((n_rows, k), end, dtype=torch.long)
    thought_mask = torch.zeros((n_rows, k), dtype=torch.bool)
    for r, (length, closed) in enumerate(counts):
        sampled = length + int(closed)  # right-aligned: the last `sampled` slots, ending at </think> if sampled
        if sampled:
            last = end + int(closed)
            thought_index[r, k - sampled :] = torch.arange(last - sampled, last)
            thought_mask[r, k - sampled :] = True
    return ThoughtRows(ids, mask, thought_index.to(ids.device), thought_mask.to(ids.device), target_index)


def true_targets(
    input_ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor, n_true: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, n_true) ids of the next true tokens after each position, their mask (a label exists), and the (P, n_true)
    positions of the no-thought forward that predict them."""
    rows, ts = positions[:, 0], positions[:, 1]
    offsets = torch.arange(n_true, device=input_ids.device)
    predict_at = (ts[:, None] + offsets).clamp(max=input_ids.shape[1] - 1)  # (P, n); the last position may predict
    target_at = ts[:, None] + offsets + 1  # beyond the sequence (generation): such targets are masked
    valid = target_at < input_ids.shape[1]
    target_at = target_at.clamp(max=input_ids.shape[1] - 1)
    targets = input_ids[rows[:, None], target_at]
    valid = valid & (labels[rows[:, None], target_at] != -100)
    return targets, valid, predict_at


def thought_token_logprobs(predictor_logits: torch.Tensor, thought_ids: torch.Tensor) -> torch.Tensor:
    """(R, k) log-probs of the sampled thought tokens from the (R, k, V) logits of the positions that predict them
    (`<think>` and the thought's own tokens but its last)."""
    return F.log_softmax(predictor_logits.float(), dim=-1).gather(-1, thought_ids[..., None]).squeeze(-1)


def reinforce_loss(thought_logprobs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE on thoughts: -mean_r(advantage_r * log pi(thought_r)), log pi summed over the thought's tokens."""
    return -(advantages.detach() * thought_logprobs.sum(-1)).mean()


def policy_gradient_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    thought_index: torch.Tensor,
    advantages: torch.Tensor,
    thought_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`reinforce_loss` from a row's full (R, L, V) logits: only the logits one position before each sampled thought
    token, read at that token, enter; the prompt, a forced `</think>` and the true tokens do not."""
    predictors = logits.gather(1, (thought_index - 1)[..., None].expand(-1, -1, logits.shape[-1]))  # (R, k, V)
    logprobs = thought_token_logprobs(predictors, input_ids.gather(1, thought_index))
    if thought_mask is not None:
        logprobs = logprobs * thought_mask
    return reinforce_loss(logprobs, advantages)


@dataclass
class ThoughtForward:
    """Everything one batch's forward passes with thoughts produced (R = P * n_thoughts rows)."""

    rows: ThoughtRows
    thought_logprobs: torch.Tensor  # (R, k) log-probs of each thought's tokens
    mixed_logprobs: torch.Tensor  # (R, n, V)
    mix_weight: torch.Tensor  # (R, n)
    nll_mix: torch.Tensor  # (R, n)
    nll_thought: torch.Tensor  # (R, n) with-thought logits alone
    nll_base: torch.Tensor  # (P, n)
    target_mask: torch.Tensor  # (P, n)
    base_logits: torch.Tensor  # (P, n, V)
    predict_at: torch.Tensor  # (P, n)
    attention_logit_max: torch.Tensor | None = None


def thought_forward(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    positions: torch.Tensor,
    thoughts: torch.Tensor,
    settings: ThoughtSettings,
    tokens: ThoughtTokens,
    output_attention_logit_max: bool = False,
) -> ThoughtForward:
    """The no-thought forward of the batch and the with-thought forward of every (position, thought) row, mixed."""
    n = thoughts.shape[0] // max(positions.shape[0], 1)
    base = model.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        use_cache=False,
        output_attention_logit_max=output_attention_logit_max,
    )
    targets, valid, predict_at = true_targets(input_ids, labels, positions, settings.n_true)
    base_hidden = base.last_hidden_state[positions[:, 0:1], predict_at]  # (P, n_true, D)
    base_logits = model.lm_head(base_hidden)  # (P, n_true, V)

    rows = build_thought_rows(input_ids, attention_mask, positions, thoughts, settings.n_true, tokens)
    hidden = model.model(
        input_ids=rows.input_ids, attention_mask=rows.attention_mask, use_cache=False
    ).last_hidden_state  # (R, L, D)
    # Only the thought and target slices need the LM head: gather them before projecting (R x (k + n) x V).
    needed = torch.cat([rows.thought_index - 1, rows.target_index], dim=1)  # (R, k + n)
    picked = model.lm_head(hidden.gather(1, needed[..., None].expand(-1, -1, hidden.shape[-1])))
    k = rows.thought_index.shape[1]
    sampled = rows.input_ids.gather(1, rows.thought_index)  # (R, k) the policy's tokens (masked slots: dummies)
    thought_logprobs = thought_token_logprobs(picked[:, :k], sampled) * rows.thought_mask  # (R, k)
    thought_hidden = hidden.gather(1, rows.target_index[..., None].expand(-1, -1, hidden.shape[-1]))
    thought_logits = picked[:, k:]  # (R, n, V)

    mixed, weight = model.thought_mixer(
        base_hidden.repeat_interleave(n, 0), thought_hidden, base_logits.repeat_interleave(n, 0), thought_logits
    )
    row_targets = targets.repeat_interleave(n, 0)[..., None]
    nll_mix = -mixed.gather(-1, row_targets).squeeze(-1)
    nll_thought = -F.log_softmax(thought_logits.float(), dim=-1).gather(-1, row_targets).squeeze(-1)
    nll_base = -F.log_softmax(base_logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    return ThoughtForward(
        rows,
        thought_logprobs,
        mixed,
        weight,
        nll_mix,
        nll_thought,
        nll_base,
        valid,
        base_logits,
        predict_at,
        base.attention_logit_max,
    )


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def quietstar_loss(
    forward: ThoughtForward, settings: ThoughtSettings, reference_logits: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """NLL under the mix + REINFORCE on thoughts (reward: NLL improvement minus the position's mean) + KL anchor."""
    n = forward.nll_mix.shape[0] // max(forward.nll_base.shape[0], 1)
    row_mask = forward.target_mask.repeat_interleave(n, 0)
    nll_loss = _masked_mean(forward.nll_mix, row_mask)
    # Reward per thought: mean NLL improvement over its position's true tokens; baseline: the mean over the position's
    # thoughts (so the no-thought NLL cancels out of the advantage, and only relative thought quality is rewarded).
    improvement = _masked_mean(forward.nll_base.repeat_interleave(n, 0) - forward.nll_mix, row_mask, dim=1)  # (R,)
    grouped = improvement.detach().view(-1, n)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    policy_loss = reinforce_loss(forward.thought_logprobs, advantages)
    loss = nll_loss + settings.reinforce_weight * policy_loss
    metrics = {
        "quietstar/nll_mix": float(nll_loss.detach()),
        "quietstar/nll_base": float(_masked_mean(forward.nll_base.detach(), forward.target_mask)),
        "quietstar/nll_thought": float(_masked_mean(forward.nll_thought.detach(), row_mask)),
        "quietstar/reward": float(grouped.mean()),
        "quietstar/reward_std": float(grouped.std(dim=1).mean()) if n > 1 else 0.0,
        "quietstar/mix_weight": float(_masked_mean(forward.mix_weight.detach(), row_mask)),
        "quietstar/thought_logprob": float(forward.thought_logprobs.detach().sum(-1).mean()),
        "quietstar/policy_loss": float(policy_loss.detach()),
    }
    if reference_logits is not None and settings.kl_weight > 0:
        reference = F.log_softmax(reference_logits.float(), dim=-1)
        current = F.log_softmax(forward.base_logits.float(), dim=-1)
        kl = (reference.exp() * (reference - current)).sum(-1)  # (P, n)
        kl = _masked_mean(kl, forward.target_mask)
        loss = loss + settings.kl_weight * kl
        metrics["quietstar/kl_ref"] = float(kl.detach())
    return loss, metrics


@torch.no_grad()
def reference_logits(reference, input_ids, attention_mask, positions: torch.Tensor, predict_at: torch.Tensor):
    """(P, n, V) no-thought logits of the frozen reference model at the same positions."""
    out = reference.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return reference.lm_head(out.last_hidden_state[positions[:, 0:1], predict_at])


# ----------------------------------------------------------------------------------------------------------------
# Anti-theater checks
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AntiTheaterSettings:
    """Thresholds of the anti-theater checks (see `QuietStarConfig`)."""

    every: int = 25
    min_ablation_gain: float = 0.01
    min_thought_gain: float = 0.0
    min_distinct: float = 0.25
    max_repetition: float = 0.6
    min_mix_weight: float = 0.02

    @classmethod
    def from_config(cls, config: QuietStarConfig) -> "AntiTheaterSettings":
        return cls(
            config.anti_theater_steps,
            config.min_ablation_gain,
            config.min_thought_gain,
            config.min_distinct_thoughts,
            config.max_thought_repetition,
            config.min_mixing_weight,
        )


def thought_statistics(thoughts: torch.Tensor, tokens: ThoughtTokens | None = None) -> dict[str, float]:
    """Distinct-thought share and mean within-thought repetition (1 - unique tokens / length) of the contents."""
    rows = thoughts.tolist()
    as_tuples = [tuple(thought_content(t, tokens)[0] if tokens is not None else t) for t in rows]
    distinct = len(set(as_tuples)) / max(len(as_tuples), 1)
    repetition = sum(1.0 - len(set(t)) / len(t) for t in as_tuples if t) / max(len(as_tuples), 1)
    return {"distinct": distinct, "repetition": repetition}


@torch.no_grad()
def anti_theater_report(
    model,
    batch: dict[str, torch.Tensor],
    settings: ThoughtSettings,
    tokens: ThoughtTokens,
    thresholds: AntiTheaterSettings,
    seed: int = 0,
) -> dict:
    """Run the checks on one held-out batch: NLL with the model's thoughts vs with random-token thoughts (ablation)
    and vs no thought, thought diversity and repetition, and the mean mixing weight. Returns values and pass/fail
    per check."""
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            positions = sample_positions(labels, settings.positions_per_sequence, generator).to(ids.device)
            thoughts = sample_thoughts(model, ids, mask, positions, settings, tokens)
            real = thought_forward(model, ids, mask, labels, positions, thoughts, settings, tokens)
            allowed = torch.ones(model.config.vocab_size, dtype=torch.bool)
            allowed[list(tokens.suppress_ids)] = False
            pool = torch.nonzero(allowed).squeeze(-1)
            random_tokens = pool[torch.randint(len(pool), thoughts.shape, generator=generator)].to(ids.device)
            closed = torch.cumsum(thoughts == tokens.end_id, dim=1) > 0  # same lengths, contents replaced
            random_thoughts = torch.where(closed, thoughts, random_tokens)
            ablated = thought_forward(model, ids, mask, labels, positions, random_thoughts, settings, tokens)
    finally:
        model.train(was_training)
    n = thoughts.shape[0] // max(positions.shape[0], 1)
    row_mask = real.target_mask.repeat_interleave(n, 0)
    nll_real = float(_masked_mean(real.nll_mix, row_mask))
    nll_ablated = float(_masked_mean(ablated.nll_mix, row_mask))
    nll_none = float(_masked_mean(real.nll_base, real.target_mask))
    stats = thought_statistics(thoughts, tokens)
    weight = float(_masked_mean(real.mix_weight, row_mask))
    checks = {
        "ablation_raises_nll": (
            nll_ablated - nll_real,
            thresholds.min_ablation_gain,
            nll_ablated - nll_real > thresholds.min_ablation_gain,
        ),
        "thoughts_beat_no_thought": (
            nll_none - nll_real,
            thresholds.min_thought_gain,
            nll_none - nll_real > thresholds.min_thought_gain,
        ),
        "thoughts_not_collapsed": (
            stats["distinct"],
            thresholds.min_distinct,
            stats["distinct"] >= thresholds.min_distinct,
        ),
        "thoughts_not_repetitive": (
            stats["repetition"],
            thresholds.max_repetition,
            stats["repetition"] <= thresholds.max_repetition,
        ),
        "mixing_weight_not_zero": (weight, thresholds.min_mix_weight, weight >= thresholds.min_mix_weight),
    }
    return {
        "nll_with_thoughts": nll_real,
        "nll_ablated_thoughts": nll_ablated,
        "nll_without_thoughts": nll_none,
        "mix_weight": weight,
        **stats,
        "checks": {name: {"value": v, "threshold": th, "passed": bool(ok)} for name, (v, th, ok) in checks.items()},
        "passed": all(ok for _, _, ok in checks.values()),
    }


class AntiTheaterCallback(TrainerCallback):
    """Every `every` steps (and at the end of training) runs `anti_theater_report`; failed checks log a warning and
    are kept in `events` for the model card."""

    def __init__(self, run_check: Callable[[], dict], every: int, sink: dict | None = None) -> None:
        self.run_check = run_check
        self.every = every
        self.sink = sink
        self.reports: list[dict] = []
        self.events: list[dict] = []

    def _check(self, step: int) -> None:
        report = self.run_check()
        report["step"] = step
        self.reports.append(report)
        if self.sink is not None:
            for name in (
                "nll_with_thoughts",
                "nll_ablated_thoughts",
                "nll_without_thoughts",
                "distinct",
                "repetition",
                "mix_weight",
            ):
                self.sink[f"theater/{name}"].append(report[name])
        for name, check in report["checks"].items():
            if not check["passed"]:
                event = {"step": step, "check": name, **check}
                self.events.append(event)
                logger.warning(
                    "Anti-theater check %s failed at step %d: %.4f vs threshold %.4f",
                    name,
                    step,
                    check["value"],
                    check["threshold"],
                )

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self._check(state.global_step)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if not self.reports or self.reports[-1]["step"] != state.global_step:
            self._check(state.global_step)
        return control


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------


class ThoughtDataset(Dataset):
    """Pre-tokenised training examples (`input_ids`, `labels` with -100 where nothing is predicted); Phases 3 and 5."""

    def __init__(self, items: Sequence[dict]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def collate_thought_batch(items: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids`/`labels` and build the attention mask."""
    length = max(len(item["input_ids"]) for item in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), -100, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        ids[row, :n] = torch.tensor(item["input_ids"])
        labels[row, :n] = torch.tensor(item["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_items(tokenizer, pairs: Sequence[tuple[str, str]], max_length: int | None = None) -> list[dict]:
    """(context, target) texts as token items with labels on the target only (context tokenised as a piece after
    the tokenizer's start tokens, target as a piece, so both keep their own tokens)."""
    items = []
    for context, target in pairs:
        ctx = list(tokenizer(context)["input_ids"])
        tgt = list(tokenizer(target, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            tgt.append(tokenizer.eos_token_id)
        ids = ctx + tgt
        if max_length is not None and len(ids) > max_length:
            continue
        items.append({"input_ids": ids, "labels": [-100] * len(ctx) + tgt})
    return items


class QuietStarTrainer(ForgeTrainer):
    """Step 2 of Phase 3: `compute_loss` samples positions and thoughts, runs `thought_forward` and returns
    `quietstar_loss`; the anti-theater checks run as a callback on `check_batch`."""

    loss_is_scaled_for_ga = False  # the loss is a per-batch mean computed here: Trainer scales it for accumulation

    def __init__(
        self,
        *args,
        settings: ThoughtSettings,
        thought_tokens: ThoughtTokens,
        reference_model=None,
        check_batch: dict[str, torch.Tensor] | None = None,
        theater: AntiTheaterSettings | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.settings = settings
        self.thought_tokens = thought_tokens
        self.reference_model = reference_model
        if reference_model is not None:
            reference_model.eval().requires_grad_(False)
        if getattr(self.model, "thought_mixer", None) is None:
            raise ValueError("QuietStarTrainer needs a model with a mixing head. Fix: call add_mixing_head(model).")
        self.theater_callback = None
        if check_batch is not None:
            theater = theater or AntiTheaterSettings()
            self.theater_callback = AntiTheaterCallback(
                lambda: anti_theater_report(
                    self.model, self._on_device(check_batch), settings, thought_tokens, theater, seed=self.args.seed
                ),
                theater.every,
                sink=self._metrics["train"],
            )
            self.add_callback(self.theater_callback)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.num_processes > 1:
            self._average_gradients()
        return loss

    @torch.no_grad()
    def _average_gradients(self) -> None:
        """Data-parallel: average the gradients over the processes after each backward.

        Hand-written because `compute_loss` runs the backbone, LM head and mixing head separately on the unwrapped
        model (no kept library runs this loss through one forward), so DDP's wrapper never sees a forward and its
        gradient hooks stay idle; accelerate's `reduce` does the all-reduce. Every trainable parameter takes part
        (zeros where a rank produced no gradient) so all ranks issue the same collectives.
        """
        params = [p for p in self.accelerator.unwrap_model(self.model).parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
        offset = 0
        for param, grad in zip(params, grads, strict=True):
            param.grad = flat[offset : offset + grad.numel()].view_as(param).clone()
            offset += grad.numel()

    def _on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: value.to(self.model.device) for name, value in batch.items()}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The computation reads the backbone, LM head and mixing head separately, so it runs on the unwrapped model;
        # under DDP that bypasses the wrapper's gradient hooks, so `training_step` averages the gradients itself.
        unwrapped = self.accelerator.unwrap_model(model)
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        positions = sample_positions(labels, self.settings.positions_per_sequence).to(ids.device)
        if positions.numel() == 0:
            raise ValueError("A training batch has no labelled positions. Fix: check the dataset's labels.")
        thoughts = sample_thoughts(unwrapped, ids, mask, positions, self.settings, self.thought_tokens)
        qk_optimizer = self._qk_clip_optimizer(unwrapped)
        forward = thought_forward(
            unwrapped,
            ids,
            mask,
            labels,
            positions,
            thoughts,
            self.settings,
            self.thought_tokens,
            output_attention_logit_max=qk_optimizer is not None,
        )
        if qk_optimizer is not None:
            logit_max = forward.attention_logit_max
            if self.accelerator.num_processes > 1:  # one global maximum, so every replica clips alike
                logit_max = self.accelerator.gather(logit_max[None]).amax(0)
            qk_optimizer.record_attention_logit_max(logit_max)
        reference = None
        if self.reference_model is not None and self.settings.kl_weight > 0:
            reference = reference_logits(self.reference_model, ids, mask, positions, forward.predict_at)
        loss, metrics = quietstar_loss(forward, self.settings, reference)
        mode = "train" if model.training else "eval"
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        return (loss, None) if return_outputs else loss


# ----------------------------------------------------------------------------------------------------------------
# Inference: thought-aware decoding with hidden thoughts
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_with_thoughts(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    thought_length: int = 8,
    thought_temperature: float = 1.0,
    temperature: float = 0.0,
    show_thoughts: bool = False,
    seed: int = 0,
) -> list[str]:
    """Continue each prompt; before every visible token the model thinks (`<think>` + `thought_length` sampled
    tokens + `</think>`), and the token is chosen from the mixing head's blend of the with- and without-thought
    predictions (greedy, or sampled at `temperature`). Thought tokens can never be chosen as visible tokens. The
    returned text holds only the visible tokens unless `show_thoughts=True`, which interleaves each thought as
    `<think>...</think>` before the token it preceded."""
    if getattr(model, "thought_mixer", None) is None:
        raise ValueError("generate_with_thoughts needs a Phase 3 model (a mixing head). Fix: use a Phase 3 output.")
    tokens = ThoughtTokens.from_tokenizer(tokenizer)
    settings = ThoughtSettings(n_thoughts=1, thought_length=thought_length, n_true=1, temperature=thought_temperature)
    was_training = model.training
    model.eval()
    contexts = [list(tokenizer(p)["input_ids"]) for p in prompts]
    visible: list[list[int]] = [[] for _ in prompts]
    shown: list[list[str]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    blocked = torch.tensor(
        sorted({*tokens.all_ids, *(i for i in (tokenizer.pad_token_id, tokenizer.bos_token_id) if i is not None)})
    )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in range(max_new_tokens):
                if not active:
                    break
                rows = [contexts[i] + visible[i] for i in active]
                ids, mask = _left_pad(rows, tokens.pad_id, model.device)
                positions = torch.stack([torch.arange(len(rows)), torch.full((len(rows),), ids.shape[1] - 1)], 1)
                labels = torch.full_like(ids, -100)
                thoughts = sample_thoughts(model, ids, mask, positions.to(ids.device), settings, tokens)
                forward = thought_forward(
                    model, ids, mask, labels, positions.to(ids.device), thoughts, settings, tokens
                )
                logprobs = forward.mixed_logprobs[:, 0].clone()  # (B, V)
                logprobs[:, blocked] = -math.inf
                if temperature and temperature > 0:
                    choice = torch.multinomial(torch.softmax(logprobs / temperature, dim=-1), 1).squeeze(-1)
                else:
                    choice = logprobs.argmax(dim=-1)
                still = []
                for row, index in enumerate(active):
                    token = int(choice[row])
                    visible[index].append(token)
                    if show_thoughts:
                        content, _ = thought_content(thoughts[row].tolist(), tokens)
                        text = tokenizer.decode(content, skip_special_tokens=False)
                        shown[index].append(f"{THOUGHT_START}{text}{THOUGHT_END}")
                        shown[index].append(tokenizer.decode([token], skip_special_tokens=True))
                    if token != tokenizer.eos_token_id:
                        still.append(index)
                active = still
    finally:
        model.train(was_training)
    if show_thoughts:
        return ["".join(parts) for parts in shown]
    return [strip_thoughts(tokenizer.decode(ids, skip_special_tokens=True)) for ids in visible]


@torch.no_grad()
def generate_without_thoughts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy continuations with thought tokens suppressed (the model answers directly), thoughts stripped."""
    tokens = ThoughtTokens.from_tokenizer(tokenizer)
    was_training = model.training
    model.eval()
    try:
        batch = tokenizer.pad(
            {"input_ids": [tokenizer(p)["input_ids"] for p in prompts]},
            padding=True,
            padding_side="left",
            return_tensors="pt",
        ).to(model.device)
        generated = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            suppress_tokens=list(tokens.all_ids),
            pad_token_id=tokens.pad_id,
        )
    finally:
        model.train(was_training)
    new = generated[:, batch["input_ids"].shape[1] :]
    return [strip_thoughts(text) for text in tokenizer.batch_decode(new, skip_special_tokens=True)]


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: answer NLL and accuracy with and without thoughts
# ----------------------------------------------------------------------------------------------------------------


def answer_pairs(examples) -> list[tuple[str, str]]:
    """(context, answer line) per task example: the prompt and worked steps as context, `#### N` as the answer."""
    pairs = []
    for example in examples:
        cut = example.target.rfind("####")
        pairs.append((example.prompt + example.target[:cut], example.target[cut:]))
    return pairs


@torch.no_grad()
def answer_nll(
    model,
    tokenizer,
    examples,
    settings: ThoughtSettings,
    tokens: ThoughtTokens,
    *,
    with_thoughts: bool,
    seed: int = 0,
    batch_size: int = 8,
) -> float:
    """Mean NLL per token of the final answer line (`#### N`) given the question and worked steps; with thoughts, each
    answer token is predicted by the mixing head after a fresh thought at its position (the Quiet-STaR estimate)."""
    items = answer_items(tokenizer, answer_pairs(examples))
    pad = tokens.pad_id
    settings = replace(settings, n_true=1, n_thoughts=1, positions_per_sequence=10_000)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for begin in range(0, len(items), batch_size):
                batch = collate_thought_batch(items[begin : begin + batch_size], pad)
                batch = {k: v.to(model.device) for k, v in batch.items()}
                positions = sample_positions(batch["labels"], settings.positions_per_sequence).to(model.device)
                if with_thoughts:
                    thoughts = sample_thoughts(
                        model, batch["input_ids"], batch["attention_mask"], positions, settings, tokens
                    )
                    fwd = thought_forward(
                        model,
                        batch["input_ids"],
                        batch["attention_mask"],
                        batch["labels"],
                        positions,
                        thoughts,
                        settings,
                        tokens,
                    )
                    values, mask = fwd.nll_mix, fwd.target_mask
                else:
                    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    targets, mask, predict_at = true_targets(batch["input_ids"], batch["labels"], positions, 1)
                    logits = out.logits[positions[:, 0:1], predict_at]
                    values = -F.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
                total += float((values * mask).sum())
                count += int(mask.sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


def task_accuracy(
    model,
    tokenizer,
    examples,
    *,
    with_thoughts: bool,
    max_new_tokens: int,
    thought_length: int,
    batch_size: int = 16,
    seed: int = 0,
) -> tuple[float, list[str]]:
    """Exact-match accuracy of greedy answers (scored by the task family) and the completions."""
    family = get_task_family(examples[0].family)
    completions: list[str] = []
    for begin in range(0, len(examples), batch_size):
        prompts = [e.prompt for e in examples[begin : begin + batch_size]]
        if with_thoughts:
            completions += generate_with_thoughts(
                model, tokenizer, prompts, max_new_tokens=max_new_tokens, thought_length=thought_length, seed=seed
            )
        else:
            completions += generate_without_thoughts(model, tokenizer, prompts, max_new_tokens)
    scores = family.score_batch(examples, completions)
    return sum(scores) / max(len(scores), 1), completions


def evaluate_thinking(
    model,
    tokenizer,
    examples,
    settings: ThoughtSettings,
    tokens: ThoughtTokens,
    config: QuietStarConfig,
    thoughts: bool = True,
) -> dict[str, float]:
    """Answer NLL and accuracy without thoughts, and with thoughts when the model has a mixing head."""
    length = config.eval_thought_length or settings.thought_length
    eval_settings = replace(settings, thought_length=length)
    results = {
        "answer_nll_without_thoughts": answer_nll(
            model, tokenizer, examples, eval_settings, tokens, with_thoughts=False, seed=config.seed
        )
    }
    results["accuracy_without_thoughts"], _ = task_accuracy(
        model,
        tokenizer,
        examples,
        with_thoughts=False,
        max_new_tokens=config.eval_max_new_tokens,
        thought_length=length,
    )
    if thoughts and getattr(model, "thought_mixer", None) is not None:
        results["answer_nll_with_thoughts"] = answer_nll(
            model, tokenizer, examples, eval_settings, tokens, with_thoughts=True, seed=config.seed
        )
        results["accuracy_with_thoughts"], _ = task_accuracy(
            model,
            tokenizer,
            examples,
            with_thoughts=True,
            max_new_tokens=config.eval_max_new_tokens,
            thought_length=length,
        )
    return results


# ----------------------------------------------------------------------------------------------------------------
# Phase 3 end to end
# ----------------------------------------------------------------------------------------------------------------


def build_teacher(config: QuietStarConfig):
    """The configured `Teacher`."""
    from .teachers import get_teacher

    if config.teacher == "model":
        return get_teacher(
            "model",
            name_or_path=config.teacher_model_name_or_path,
            gguf_file=config.teacher_gguf_file,
            keep_incorrect=config.teacher_keep_incorrect,
        )
    if config.teacher == "openai":
        return get_teacher(
            "openai",
            base_url=config.teacher_base_url,
            model=config.teacher_model,
            api_key_env=config.teacher_api_key_env,
            keep_incorrect=config.teacher_keep_incorrect,
        )
    return get_teacher(config.teacher)


def _task_examples(config: QuietStarConfig) -> tuple[list, list]:
    family = get_task_family(config.task_family)
    low, high = config.difficulty
    levels = list(range(low, high + 1))
    train = []
    for i, level in enumerate(levels):
        n = config.train_examples // len(levels) + (1 if i < config.train_examples % len(levels) else 0)
        train += family.generate("train", n, seed=config.seed, difficulty=level)
    evaluation = family.generate(
        "validation", config.eval_examples, seed=config.seed, difficulty=config.eval_difficulty
    )
    return train, evaluation


def plain_bake_pairs(examples: Sequence, n_thought_pairs: int, config: QuietStarConfig) -> list[tuple[str, str]]:
    """Thought-free (prompt, target) pairs to mix into the step-1 bake: `reasoning_bake_plain_fraction` of the mix.

    Baking thought-laden completions alone teaches the model to expect a thought before every answer, which costs
    its direct answers (measured in benchmarks/quietstar_base.py); plain examples keep them."""
    fraction = config.reasoning_bake_plain_fraction
    n_plain = round(n_thought_pairs * fraction / (1.0 - fraction))
    rng = random.Random(config.seed)
    chosen = rng.sample(list(examples), min(n_plain, len(examples)))
    return [(e.prompt, e.target) for e in chosen]


def _finished_phase3(output: Path) -> dict:
    """The summary of a finished Phase 3, read back from its files."""
    lineage = json.loads((output / "forge_lineage.json").read_text())
    return {"output_dir": str(output), "metrics": json.loads((output / "metrics.json").read_text())["metrics"],
            "anti_theater": json.loads((output / "anti_theater.json").read_text()),
            "wall_time_s": lineage.get("wall_time_s") or 0.0, "resumed_finished": True}  # fmt: skip


def run_phase3(config: QuietStarConfig) -> dict:
    """Run Phase 3 end to end and write `<output_dir>/phase3/`; returns a summary of the measurements."""
    from .baking_trainer import bake_examples
    from .teachers import write_reasoning_examples

    started = time.time()
    output = Path(config.output_dir) / "phase3"
    if finished_output(output) and config.resume and not config.overwrite:
        logger.info("Phase 3 already finished at %s; nothing to resume.", output)
        return _finished_phase3(output)
    if output.exists() and not config.overwrite:
        raise FileExistsError(
            f"{output} already exists. Fix: pass --resume to keep it, --overwrite or choose another output_dir."
        )
    set_seed(config.seed)
    check_checkpoint_folder(config.model_name_or_path)  # a cut or foreign folder fails here, naming the file and fix
    tokenizer = AutoTokenizer.from_pretrained(config.model_name_or_path)
    check_checkpoint_folder(config.model_name_or_path, tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(config.model_name_or_path)
    tokens = add_thought_tokens(model, tokenizer)
    settings = ThoughtSettings.from_config(config)
    train_examples, eval_examples = _task_examples(config)
    metrics: dict[str, float] = {}

    # Before: the input model, answering directly.
    before = evaluate_thinking(model, tokenizer, eval_examples, settings, tokens, config, thoughts=False)
    metrics.update({f"input/{k}": v for k, v in before.items()})

    # Step 1: reasoning baking on teacher-written examples with thoughts.
    teacher = build_teacher(config)
    reasoning = write_reasoning_examples(teacher, train_examples)
    bake_summary = {}
    if not config.skip_reasoning_bake:
        if len(reasoning) < 2:
            raise ValueError(
                f"The teacher wrote only {len(reasoning)} usable examples; step 1 needs some. Fix: use "
                "teacher='procedural', teacher_keep_incorrect=True or more train_examples."
            )
        held = max(1, len(reasoning) // 10)
        pairs = [(r.prompt, r.completion) for r in reasoning]
        held_prompts = {prompt for prompt, _ in pairs[:held]}  # their plain versions must not leak into training
        plain_pool = [e for e in train_examples if e.prompt not in held_prompts]
        train_pairs = pairs[held:] + plain_bake_pairs(plain_pool, len(pairs) - held, config)
        bake_config = replace(config.reasoning_bake_config, trainable_token_indices=list(tokens.all_ids))
        baked = bake_examples(model, tokenizer, train_pairs, pairs[:held], bake_config)
        model = baked.model
        bake_summary = baked.metrics("bake")
        metrics.update(bake_summary)

    # Step 2: Quiet-STaR RL with a mixing head, anchored to the step-1 model.
    add_mixing_head(model, config.mixing_hidden_size, config.mixing_init_weight)
    reference = copy.deepcopy(model) if config.kl_weight > 0 else None
    before_rl = evaluate_thinking(model, tokenizer, eval_examples, settings, tokens, config)
    metrics.update({f"before_rl/{k}": v for k, v in before_rl.items()})
    train_items = answer_items(tokenizer, [(e.prompt, e.target) for e in train_examples], config.max_seq_length)
    check_items = answer_items(
        tokenizer, [(e.prompt, e.target) for e in eval_examples[: config.anti_theater_examples]]
    )
    args = replace(
        config,
        output_dir=str(Path(config.output_dir) / ".phase3-work"),  # hidden, as Phase 1's .work, Phase 4's .phase4-work
        remove_unused_columns=False,
        push_to_hub=False,
        hub_model_id=None,
    )
    trainer = QuietStarTrainer(
        model=model,
        args=args,
        train_dataset=ThoughtDataset(train_items),
        data_collator=lambda items: collate_thought_batch(items, tokens.pad_id),
        processing_class=tokenizer,
        settings=settings,
        thought_tokens=tokens,
        reference_model=reference,
        check_batch=collate_thought_batch(check_items, tokens.pad_id),
        theater=AntiTheaterSettings.from_config(config),
    )
    trainer.train()
    state = PartialState()
    if not state.is_main_process:  # training was data-parallel; measuring and writing happen once
        state.wait_for_everyone()
        return {"output_dir": str(output), "main_process": False}
    after_rl = evaluate_thinking(model, tokenizer, eval_examples, settings, tokens, config)
    metrics.update({f"after_rl/{k}": v for k, v in after_rl.items()})
    theater = trainer.theater_callback
    final_report = theater.reports[-1]
    metrics["theater/passed"] = float(final_report["passed"])
    metrics.update(
        {
            f"theater/{k}": final_report[k]
            for k in (
                "nll_with_thoughts",
                "nll_ablated_thoughts",
                "nll_without_thoughts",
                "distinct",
                "repetition",
                "mix_weight",
            )
        }
    )
    samples = generate_with_thoughts(
        model,
        tokenizer,
        [e.prompt for e in eval_examples[:3]],
        max_new_tokens=config.eval_max_new_tokens,
        thought_length=config.eval_thought_length or config.thought_length,
        show_thoughts=True,
    )
    wall = time.time() - started
    _save_phase3(
        output, config, model, tokenizer, trainer, metrics, teacher, reasoning, bake_summary, theater, samples, wall
    )
    remove_work_dir(args.output_dir)
    state.wait_for_everyone()
    return {"output_dir": str(output), "metrics": metrics, "anti_theater": theater.reports, "wall_time_s": wall}


def _save_phase3(
    output, config, model, tokenizer, trainer, metrics, teacher, reasoning, bake_summary, theater, samples, wall
) -> None:
    logs = trainer.state.log_history
    train_logs = [e for e in logs if "quietstar/reward" in e]

    def write_extras(folder: Path) -> None:
        if train_logs:
            steps = [e["step"] for e in train_logs]
            line_plot(
                folder / "plots" / "rl_reward.png",
                {"reward (NLL improvement)": (steps, [e["quietstar/reward"] for e in train_logs])},
                title="Phase 3: Quiet-STaR reward",
                xlabel="step",
                ylabel="nats",
            )
            line_plot(
                folder / "plots" / "rl_nll.png",
                {
                    name: (steps, [e[f"quietstar/{name}"] for e in train_logs])
                    for name in ("nll_base", "nll_mix", "nll_thought")
                },
                title="Phase 3: NLL of the next true tokens",
                xlabel="step",
                ylabel="nats",
            )
        (folder / "training_log.json").write_text(json.dumps(logs, indent=2))
        (folder / "anti_theater.json").write_text(json.dumps(theater.reports, indent=2))
        (folder / "thought_samples.json").write_text(json.dumps(samples, indent=2))
        (folder / "reasoning_examples_sample.json").write_text(
            json.dumps([asdict(r) for r in reasoning[:5]], indent=2)
        )

    checks = theater.reports[-1]["checks"] if theater.reports else {}
    theater_rows = "\n".join(
        f"| {name} | {c['value']:.4f} | {c['threshold']:.4f} | {'pass' if c['passed'] else '**FAIL**'} |"
        for name, c in checks.items()
    )
    events = (
        "\n".join(
            f"- step {e['step']}: {e['check']} = {e['value']:.4f} (threshold {e['threshold']:.4f})"
            for e in theater.events
        )
        or "No check failed during training."
    )
    comparison = []
    for key in (
        "answer_nll_without_thoughts",
        "answer_nll_with_thoughts",
        "accuracy_without_thoughts",
        "accuracy_with_thoughts",
    ):
        row = [metrics.get(f"{stage}/{key}") for stage in ("input", "before_rl", "after_rl")]
        comparison.append({"name": key, "values": [f"{v:.4f}" if v is not None else "-" for v in row]})
    training = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    eval_results = [
        {
            "dataset": f"agent-forge/{config.task_family}",
            "split": "validation",
            "metric": metric,
            "value": metrics[f"after_rl/{key}"],
        }
        for metric, key in (
            ("accuracy_with_thoughts", "accuracy_with_thoughts"),
            ("accuracy", "accuracy_without_thoughts"),
        )
        if f"after_rl/{key}" in metrics
    ]
    save_phase_output(
        output,
        model=model,
        tokenizer=tokenizer,
        phase=3,
        phase_name="quietstar",
        config={"training": training, "teacher": teacher.describe(), "thought_tokens": list(THOUGHT_TOKENS)},
        inputs=[config.model_name_or_path],
        metrics=metrics,
        eval_results=eval_results,
        seed=config.seed,
        wall_time_s=wall,
        datasets=[f"agent-forge/{config.task_family}"],
        tags=["quiet-star", "thoughts"],
        card_template="phase3_quietstar",
        model_name="forge-phase3-quietstar",
        card_sections={
            "teacher": json.dumps(teacher.describe()),
            "n_reasoning_examples": len(reasoning),
            "bake": {k: round(v, 4) for k, v in bake_summary.items()},
            "theater_rows": theater_rows,
            "theater_events": events,
            "comparison": comparison,
            "samples": samples,
        },
        write_extras=write_extras,
        overwrite=config.overwrite,
        push_to_hub=f"{config.hub_model_id or Path(config.output_dir).name}-phase3" if config.push_to_hub else None,
        hub_token=config.hub_token,
        hub_private=config.hub_private_repo,
    )


__all__ = [
    "AntiTheaterCallback",
    "AntiTheaterSettings",
    "QuietStarTrainer",
    "ThoughtDataset",
    "ThoughtForward",
    "ThoughtRows",
    "ThoughtSettings",
    "ThoughtTokens",
    "add_mixing_head",
    "add_thought_tokens",
    "answer_nll",
    "anti_theater_report",
    "build_thought_rows",
    "collate_thought_batch",
    "evaluate_thinking",
    "generate_with_thoughts",
    "generate_without_thoughts",
    "policy_gradient_loss",
    "quietstar_loss",
    "run_phase3",
    "sample_positions",
    "sample_thoughts",
    "strip_thoughts",
    "task_accuracy",
    "thought_content",
    "thought_forward",
    "thought_statistics",
    "thought_token_logprobs",
]
