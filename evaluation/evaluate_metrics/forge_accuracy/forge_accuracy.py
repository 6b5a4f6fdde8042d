"""Accuracy: the share of predicted class indices that equal the reference indices (multiple choice)."""

import datasets
import evaluate

_DESCRIPTION = """Accuracy = (number of predictions equal to their reference) / (number of predictions).
Agent Forge's multiple-choice tasks report it twice: on the argmax of the raw log-likelihoods (`acc`) and on the
argmax of the log-likelihoods divided by each choice's length in characters (`acc_norm`, as lm-eval does)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted choice indices.
    references (`list` of `int`): gold choice indices.
Returns:
    accuracy (`float`): in [0, 1]; 0.0 for no predictions.
Example:
    >>> metric = evaluate.load("evaluation/evaluate_metrics/forge_accuracy")
    >>> metric.compute(predictions=[0, 2, 1], references=[0, 1, 1])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ForgeAccuracy(evaluate.Metric):
    """Accuracy over integer labels, offline (the Hub's `accuracy` metric wraps scikit-learn for the same number)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        if not predictions:
            return {"accuracy": 0.0}
        correct = sum(int(p) == int(r) for p, r in zip(predictions, references, strict=True))
        return {"accuracy": correct / len(predictions)}
