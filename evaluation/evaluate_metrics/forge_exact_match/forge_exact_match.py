"""Exact match: the share of extracted answers that equal the reference answers string for string."""

import datasets
import evaluate

_DESCRIPTION = """Exact match = (number of predictions identical to their reference) / (number of predictions).
Predictions are the answers a task extracted from the model's completions (an empty string, or None, when the
completion held no well-formed answer: it never matches); the task's extraction already canonicalises numbers and
expressions, so the comparison itself is plain string equality after stripping surrounding whitespace."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): extracted answers ("" where none was found).
    references (`list` of `str`): reference answers.
Returns:
    exact_match (`float`): in [0, 1]; 0.0 for no predictions.
Example:
    >>> metric = evaluate.load("evaluation/evaluate_metrics/forge_exact_match")
    >>> metric.compute(predictions=["12", "", "7"], references=["12", "3", "8"])
    {'exact_match': 0.3333333333333333}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ForgeExactMatch(evaluate.Metric):
    """Exact match on extracted answers; a missing answer ("" or None) counts as wrong."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        if not predictions:
            return {"exact_match": 0.0}
        hits = sum(
            bool(p and p.strip()) and p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)
        )
        return {"exact_match": hits / len(predictions)}
