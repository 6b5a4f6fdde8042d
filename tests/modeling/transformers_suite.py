"""Loads transformers' own common test mixins (`ModelTesterMixin`, `ConfigTester`, `PipelineTesterMixin`) from the
tests folder of the pinned transformers source distribution, which `make test` extracts (Makefile: test assets)
under `<venv>/share/transformers-tests/transformers_tests`. Nothing here reaches the network.

The sdist ships `tests/test_*_common.py` and `test_pipeline_mixin.py` but not the modules they import from
`tests/generation/`, `tests/exporters/`, `tests/utils/` and `tests/pipelines/`. Those imports are satisfied here by
small stand-ins, registered in `sys.modules` before the import, each saying what replaces it:
- `GenerationTesterMixin` and `ExportTesterMixin`: empty; `tests/modeling/test_generation_behaviours.py` tests the
  generation and export behaviours they would (dict outputs with attentions, static cache, compile, export).
- `config_common_kwargs` (ConfigTester's "every general `PreTrainedConfig` argument is honoured"): our own list of
  general arguments with non-default values.
- The per-task pipeline test classes (`FeatureExtractionPipelineTests`, `TextGenerationPipelineTests`): our own
  `get_test_pipeline` / `run_pipeline_test` in the same interface; `PipelineTesterMixin` itself (model and tokenizer
  loading through its local tiny-model path, the batched run with an unfinished last batch) is transformers' code.
"""

import contextlib
import json
import os
import sys
import tempfile
import types
from pathlib import Path

TRANSFORMERS_TESTS_VERSION = "5.23.0"
ASSET_ROOT = Path(os.environ.get("FORGE_TRANSFORMERS_TESTS", Path(sys.prefix) / "share" / "transformers-tests"))
PACKAGE = "transformers_tests"
# TRANSFORMERS_TINY_MODEL_PATH: PipelineTesterMixin reads `<path>/reports/tiny_model_summary.json` at import and
# loads `<path>/<model_type>/<ArchitectureName>` for each architecture (transformers' offline tiny-model layout).
TINY_MODEL_PATH = Path(tempfile.mkdtemp(prefix="forge-tiny-models-"))
PIPELINE_ARCHITECTURES = {"ForgeModel": "feature-extraction", "ForgeForCausalLM": "text-generation"}


def asset_missing_reason() -> str | None:
    """Why the transformers test suite cannot run here, or None when it can."""
    import transformers

    if not (ASSET_ROOT / PACKAGE / "test_modeling_common.py").exists():
        return (
            f"transformers' common tests are not extracted at {ASSET_ROOT / PACKAGE}; `make test` fetches them (the "
            f"test-asset step downloads the transformers=={TRANSFORMERS_TESTS_VERSION} sdist, checked by sha256)"
        )
    if transformers.__version__ != TRANSFORMERS_TESTS_VERSION:
        return f"the extracted tests are for transformers {TRANSFORMERS_TESTS_VERSION}, not {transformers.__version__}"
    return None


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


class GenerationTesterMixin:
    """Stand-in: not in the sdist (tests/modeling/test_generation_behaviours.py covers generation)."""


class ExportTesterMixin:
    """Stand-in: not in the sdist (tests/modeling/test_generation_behaviours.py covers export)."""


# General `PreTrainedConfig` arguments, each with a non-default value: ConfigTester checks every one is kept.
CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "tie_word_embeddings": False,
    "chunk_size_feed_forward": 5,
    "is_encoder_decoder": False,
    "architectures": ["ForgeForCausalLM"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
    "bos_token_id": 6,
    "pad_token_id": 7,
    "eos_token_id": 8,
}


class FeatureExtractionPipelineTests:
    """Stand-in for transformers' per-task test class: features of a batch of texts, one (1, T, D) list per text."""

    def get_test_pipeline(self, model, tokenizer=None, dtype="float32", **processors):
        from transformers import FeatureExtractionPipeline

        pipe = FeatureExtractionPipeline(model=model, tokenizer=tokenizer, dtype=dtype)
        return pipe, ["This is a test", "This is another, much longer test with more words in it."]

    def run_pipeline_test(self, pipe, examples) -> None:
        import torch

        pipe.tokenizer.padding_side = "right"
        outputs = pipe(examples, batch_size=2)
        assert len(outputs) == len(examples)
        for text, output in zip(examples, outputs, strict=True):
            alone = torch.tensor(pipe(text))  # (1, n, D)
            n_tokens = len(pipe.tokenizer(text)["input_ids"])
            assert alone.shape == (1, n_tokens, pipe.model.config.hidden_size)
            # A batched row is padded on the right to the longest text; its real positions equal the text alone.
            torch.testing.assert_close(torch.tensor(output)[:, :n_tokens], alone, rtol=1e-3, atol=1e-3)


class TextGenerationPipelineTests:
    """Stand-in for transformers' per-task test class: batched greedy continuations equal unbatched ones."""

    def get_test_pipeline(self, model, tokenizer=None, dtype="float32", **processors):
        from transformers import TextGenerationPipeline

        pipe = TextGenerationPipeline(model=model, tokenizer=tokenizer, dtype=dtype, max_new_tokens=5)
        return pipe, ["This is a test", "Another, longer test of the generator"]

    def run_pipeline_test(self, pipe, examples) -> None:
        alone = [pipe(text, do_sample=False)[0]["generated_text"] for text in examples]
        batched = [out[0]["generated_text"] for out in pipe(examples, do_sample=False, batch_size=2)]
        assert batched == alone, (batched, alone)
        assert all(text.startswith(prompt) for text, prompt in zip(alone, examples, strict=True))


def write_tiny_models(config, tokenizer) -> None:
    """Save a model of each pipeline architecture with `tokenizer` where PipelineTesterMixin loads tiny models from."""
    import torch

    from modeling_forge import ForgeForCausalLM, ForgeModel

    summary = {}
    for cls in (ForgeModel, ForgeForCausalLM):
        folder = TINY_MODEL_PATH / "forge" / cls.__name__
        if not (folder / "config.json").exists():
            torch.manual_seed(0)
            cls(config).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        summary[cls.__name__] = {
            "tokenizer_classes": [type(tokenizer).__name__],
            "processor_classes": [],
            "model_classes": [cls.__name__],
        }
    (TINY_MODEL_PATH / "reports").mkdir(exist_ok=True)
    (TINY_MODEL_PATH / "reports" / "tiny_model_summary.json").write_text(json.dumps(summary))
    # The mixin read the (then empty) summary at import; it looks architectures up in that dict.
    sys.modules[f"{PACKAGE}.test_pipeline_mixin"].tiny_model_summary.update(summary)


@contextlib.contextmanager
def in_tree_auto_names(model_type: str, base_model: str, causal_lm: str):
    """What an in-tree model PR adds to `models/auto/modeling_auto.py`: the common tests find the base model and the
    causal-LM head through these name tables (labels for training tests, the base-model checks). Restored after."""
    from transformers.models.auto import modeling_auto

    tables = {"MODEL_MAPPING_NAMES": base_model, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": causal_lm}
    for table, name in tables.items():
        getattr(modeling_auto, table)[model_type] = name
    try:
        yield
    finally:
        for table in tables:
            getattr(modeling_auto, table).pop(model_type, None)


def import_mixins() -> tuple[type, type, type]:
    """`(ModelTesterMixin, ConfigTester, PipelineTesterMixin)` from the extracted transformers tests."""
    os.environ.setdefault("TRANSFORMERS_TINY_MODEL_PATH", str(TINY_MODEL_PATH))
    (TINY_MODEL_PATH / "reports").mkdir(parents=True, exist_ok=True)
    summary = TINY_MODEL_PATH / "reports" / "tiny_model_summary.json"
    if not summary.exists():
        summary.write_text("{}")
    if str(ASSET_ROOT) not in sys.path:
        sys.path.insert(0, str(ASSET_ROOT))
    _module(f"{PACKAGE}.generation")
    _module(f"{PACKAGE}.generation.test_utils", GenerationTesterMixin=GenerationTesterMixin)
    _module(f"{PACKAGE}.exporters")
    _module(f"{PACKAGE}.exporters.test_export", ExportTesterMixin=ExportTesterMixin)
    _module(f"{PACKAGE}.utils")
    _module(f"{PACKAGE}.utils.test_configuration_utils", config_common_kwargs=CONFIG_COMMON_KWARGS)
    # The mixin resolves these dotted names with importlib at run time; sys.modules answers first.
    _module("tests.pipelines.test_pipelines_feature_extraction",
            FeatureExtractionPipelineTests=FeatureExtractionPipelineTests)  # fmt: skip
    _module("tests.pipelines.test_pipelines_text_generation", TextGenerationPipelineTests=TextGenerationPipelineTests)

    from transformers_tests.test_configuration_common import ConfigTester
    from transformers_tests.test_modeling_common import ModelTesterMixin
    from transformers_tests.test_pipeline_mixin import PipelineTesterMixin

    return ModelTesterMixin, ConfigTester, PipelineTesterMixin
