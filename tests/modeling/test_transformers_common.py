"""transformers' own common model, config and pipeline tests on a tiny Forge, as an in-tree model PR runs them (in the
style of transformers' tests/models/llama/test_modeling_llama.py). The tester reads the `tiny` preset, so it follows
the model's defaults (memory type, recursion) as they change. Every skipped common test says why, below."""

import unittest

import pytest

from tests.modeling import transformers_suite

_missing = transformers_suite.asset_missing_reason()
if _missing:
    pytest.skip(_missing, allow_module_level=True)

import torch  # noqa: E402

from modeling_forge import ForgeConfig, ForgeForCausalLM, ForgeModel  # noqa: E402

ModelTesterMixin, ConfigTester, PipelineTesterMixin = transformers_suite.import_mixins()


class ForgeModelTester:
    """Builds tiny configs and inputs for the common tests (the `model_tester` interface of transformers' tests)."""

    def __init__(self, parent, batch_size: int = 2, seq_length: int = 7, is_training: bool = True) -> None:
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        config = self.get_config()
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.num_hidden_layers = config.num_hidden_layers
        self.num_attention_heads = config.num_attention_heads

    def get_config(self) -> ForgeConfig:
        # A window shorter than the sequence, so the sliding mask and the memory both matter.
        return ForgeConfig.from_preset("tiny", vocab_size=99, sliding_window=4, memory_chunk_size=4, pad_token_id=0)

    def prepare_config_and_inputs_for_common(self) -> tuple[ForgeConfig, dict]:
        config = self.get_config()
        input_ids = torch.randint(1, self.vocab_size, (self.batch_size, self.seq_length))
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, :2] = 0  # left padding on one row (generation's layout)
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}


# Common tests that do not apply to this architecture, each with the reason (the test names are transformers').
SKIPPED = {
    "test_resize_embeddings_results": "needs a Hub checkpoint (resize then compare against a reference download)",
    "test_model_is_small": "the tiny preset (~0.2M parameters) is what the other tests use; size is not the check",
    "test_generation_tester_mixin_inheritance": (
        "GenerationTesterMixin is not in the transformers sdist; tests/modeling/test_generation_behaviours.py covers "
        "the generation behaviours"
    ),
    "test_sliding_window_mask": (
        "the window is always on (no `use_sliding_window` switch to toggle); tests/modeling/"
        "test_causality_and_memory.py checks what each position attends to"
    ),
    "test_can_capture_specific_layers_hidden_states": (
        "hidden states are collected by ForgeModel itself (the last entry is the normed backbone output, which no "
        "layer returns), so per-layer index selection through output recording does not apply"
    ),
}


class ForgeModelTest(ModelTesterMixin, PipelineTesterMixin, unittest.TestCase):
    all_model_classes = (ForgeModel, ForgeForCausalLM)
    pipeline_model_mapping = {"feature-extraction": ForgeModel, "text-generation": ForgeForCausalLM}
    # The position-wise ACT early exit uses data-dependent indexing in eval mode; export goes through
    # tests/modeling/test_generation_behaviours.py instead (ACT by masking).
    test_torch_exportable = False
    test_can_init_all_missing_weights_before_2023 = True  # a new model: its _init_weights must cover every weight

    def setUp(self) -> None:
        self.model_tester = ForgeModelTester(self)
        self.config_tester = ConfigTester(self, config_class=ForgeConfig, hidden_size=64, num_attention_heads=4)
        reason = SKIPPED.get(self._testMethodName)
        if reason:
            self.skipTest(reason)

    @classmethod
    def setUpClass(cls) -> None:
        """Save the tiny models (with a byte-level BPE fitted on the built-in corpus) where the pipeline tests load
        them, as transformers' tiny Hub models ship a tokenizer."""
        super().setUpClass()
        cls._auto_names = transformers_suite.in_tree_auto_names("forge", "ForgeModel", "ForgeForCausalLM")
        cls._auto_names.__enter__()
        from evaluation.corpus import corpus_available, corpus_texts
        from modeling_forge.tokenization import build_tokenizer

        if corpus_available():
            tokenizer = build_tokenizer(corpus_texts("train", max_chars=50_000), vocab_size=300)
            config = ForgeModelTester(None).get_config()
            config.vocab_size = len(tokenizer)
            config.pad_token_id = tokenizer.pad_token_id
            transformers_suite.write_tiny_models(config, tokenizer)

    @classmethod
    def tearDownClass(cls) -> None:
        cls._auto_names.__exit__(None, None, None)
        super().tearDownClass()

    def test_config(self) -> None:
        self.config_tester.run_common_tests()
