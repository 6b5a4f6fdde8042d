"""pass@k (Chen et al. 2021) from per-sample verdicts, with the unbiased estimator of `evaluation.metrics`."""

import datasets
import evaluate

from evaluation.metrics import pass_at_k

_CITATION = """@article{chen2021codex, title={Evaluating Large Language Models Trained on Code},
author={Mark Chen and others}, journal={arXiv preprint arXiv:2107.03374}, year={2021}}"""

_DESCRIPTION = """pass@k: the probability that at least one of k samples, drawn without replacement from the n samples
generated for a problem, passes its tests; averaged over problems. With c passing samples out of n it is
1 - C(n-c, k) / C(n, k). The verdicts come from running each sample in Agent Forge's sandbox
(`evaluation.sandbox`); this module never executes code. A k larger than some problem's n is left out."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `bool`): for each problem, the pass/fail verdict of each of its samples.
    k (`list` of `int`, default `[1]`): the k values to report.
Returns:
    `pass@k` (`float`) for each k not larger than every problem's sample count.
Example:
    >>> metric = evaluate.load("evaluation/evaluate_metrics/forge_pass_at_k")
    >>> metric.compute(predictions=[[True, False, True, False], [False, False, False, False]], k=[1, 2])
    {'pass@1': 0.25, 'pass@2': 0.41666666666666663}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ForgePassAtK(evaluate.Metric):
    """Mean unbiased pass@k over problems, from sandbox verdicts."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("bool"))}),
        )

    def _compute(self, predictions, k=(1,)) -> dict[str, float]:
        if not predictions:
            return {}
        n = [len(verdicts) for verdicts in predictions]
        c = [sum(bool(v) for v in verdicts) for verdicts in predictions]
        return {f"pass@{kk}": float(pass_at_k(n, c, kk).mean()) for kk in k if min(n) >= kk}
