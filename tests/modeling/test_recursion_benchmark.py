"""The ACT-by-difficulty analysis of `benchmarks/recursion.py` (issue 14's "easy tokens halt earlier" evidence): its
ranks, bins and correlation, checked both ways on a stand-in model whose halting step is a known function of the
token's loss."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "recursion.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("recursion_benchmark", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _StandIn:
    """Fixed random logits per input; the halting step rises (or falls) with the next token's step-0 loss."""

    def __init__(self, vocab: int, steps: int, rising: bool) -> None:
        self.vocab, self.steps, self.rising = vocab, steps, rising

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(int(ids.sum()))
        return 3 * torch.randn(*ids.shape, self.vocab, generator=generator)

    def __call__(self, ids, act_halting, recursion_steps=None):
        logits = self._logits(ids)
        if not act_halting:
            # Every step lowers each token's loss a little: a later-step logit boost on the true next token.
            boost = torch.zeros_like(logits)
            boost[:, :-1].scatter_(-1, ids[:, 1:, None], 0.1 * (recursion_steps or 0))
            return SimpleNamespace(logits=logits + boost)
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, self.vocab), ids[:, 1:].reshape(-1), reduction="none")
        rank = ce.argsort().argsort().float() / ce.numel()  # 0 (easiest) .. 1 (hardest)
        level = rank if self.rising else 1 - rank
        halts = torch.zeros(ids.shape, dtype=torch.long)
        halts[:, :-1] = (level * (self.steps + 1)).long().clamp(max=self.steps).view(ids.shape[0], -1)
        return SimpleNamespace(halt_steps=halts)


def test_average_ranks_share_ties(bench):
    ranks = bench.average_ranks(torch.tensor([3.0, 1.0, 1.0, 2.0, 3.0, 3.0]))
    torch.testing.assert_close(ranks, torch.tensor([5.0, 1.5, 1.5, 3.0, 5.0, 5.0]))


@pytest.mark.parametrize("rising", [True, False])
def test_halting_by_difficulty_follows_the_loss_both_ways(bench, rising):
    torch.manual_seed(0)
    vocab, steps = 50, 3
    held_out = {}
    for name in ("easy", "hard"):
        ids = torch.randint(0, vocab, (4, 33))
        labels = ids.clone()
        labels[:, :5] = -100  # unlabelled positions are left out
        held_out[name] = (ids, labels)
    result = bench.halting_by_difficulty(_StandIn(vocab, steps, rising), held_out, steps)
    bins = result["bins"]
    assert len(bins) == 4
    losses = [item["loss_step0"] for item in bins]
    assert losses == sorted(losses)  # easiest first
    mean_steps = [item["mean_steps"] for item in bins]
    assert mean_steps == sorted(mean_steps, reverse=not rising)
    assert (result["spearman_loss_steps"] > 0.8) if rising else (result["spearman_loss_steps"] < -0.8)
    for item in bins:
        assert sum(item["share_per_step"]) == pytest.approx(1.0, abs=1e-2)
        assert sum(item["sources"].values()) == pytest.approx(1.0, abs=1e-2)
        assert item["gain_every_step"] > 0  # the stand-in's later steps lower every token's loss


def test_paired_gain_mean_and_standard_error(bench):
    """A gain is the mean per-example change; its standard error is that of paired differences, so a constant shift
    has none and a noisy one has the textbook value."""
    before = [2.0, 3.0, 4.0, 5.0]
    steady = bench.paired_gain(before, [b - 0.1 for b in before])
    assert steady["gain"] == pytest.approx(-0.1) and steady["se"] == pytest.approx(0.0, abs=1e-6)
    assert steady["examples"] == 4
    noisy = bench.paired_gain(before, [1.9, 3.1, 3.7, 5.1])  # changes -0.1, +0.1, -0.3, +0.1
    diffs = torch.tensor([-0.1, 0.1, -0.3, 0.1])
    assert noisy["gain"] == pytest.approx(-0.05, abs=1e-4)
    assert noisy["se"] == pytest.approx(float(diffs.std() / 2), abs=1e-4) and noisy["se"] > 0.09
