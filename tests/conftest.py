"""Shared fixtures: tiny configs and a tokenizer trained on the built-in corpus. No test reaches the network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus_ready() -> None:
    """The built-in corpus must have been fetched by the setup step (`make data`), never by a test."""
    from evaluation.corpus import corpus_available, corpus_dir

    if not corpus_available():
        pytest.fail(f"The built-in corpus is missing at {corpus_dir()}; run `make data` before the tests.")


@pytest.fixture(scope="session")
def tiny_tokenizer(corpus_ready):
    """A 512-entry byte-level BPE fitted on ~300k characters of the training split."""
    from evaluation.corpus import corpus_texts
    from modeling_forge.tokenization import build_tokenizer

    return build_tokenizer(corpus_texts("train", max_chars=300_000), vocab_size=512)


@pytest.fixture
def tiny_config():
    """Factory for tiny ForgeConfigs (hidden 64, 2 layers); keyword overrides win."""
    from modeling_forge import ForgeConfig

    def make(**overrides):
        values = {"vocab_size": 97, "sliding_window": 8, "memory_chunk_size": 4}
        values.update(overrides)
        return ForgeConfig.from_preset("tiny", **values)

    return make


def pytest_configure(config) -> None:
    """Markers transformers' common tests use (tests/modeling/test_transformers_common.py runs them)."""
    for marker in ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test",
                   "torch_compile_test", "is_pipeline_test", "is_training_test", "is_staging_test"):  # fmt: skip
        config.addinivalue_line("markers", f"{marker}: used by transformers' common model tests")
