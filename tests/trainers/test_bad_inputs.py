"""Corrupted inputs get an error naming the file, the field and the fix: cut weights, broken or foreign config.json,
a tokenizer that does not fit the embedding, malformed YAML, and (fuzzed with hypothesis) bad config values."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import TrainingArguments

from modeling_forge import ForgeForCausalLM
from trainers.inputs import CheckpointError, check_checkpoint_folder
from trainers.phase_output import save_phase_output


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory, tiny_tokenizer):
    from modeling_forge import ForgeConfig

    torch.manual_seed(0)
    model = ForgeForCausalLM(ForgeConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer)))
    return save_phase_output(tmp_path_factory.mktemp("good") / "phase1", model=model, tokenizer=tiny_tokenizer,
                             phase=1, phase_name="cognate", config={})  # fmt: skip


def _broken(good_folder, tmp_path, change):
    folder = tmp_path / "broken"
    shutil.copytree(good_folder, folder)
    change(folder)
    return folder


def _edit_config(**fields):
    def change(folder):
        config = json.loads((folder / "config.json").read_text())
        for name, value in fields.items():
            if value is ...:
                config.pop(name)
            else:
                config[name] = value
        (folder / "config.json").write_text(json.dumps(config))

    return change


def _truncate(fraction):
    def change(folder):
        path = folder / "model.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])

    return change


CASES = {
    "safetensors cut in the data": (_truncate(0.6), CheckpointError, ["model.safetensors", "truncated", "Fix"]),
    "safetensors cut in the header": (_truncate(0.00001), CheckpointError, ["model.safetensors", "Fix"]),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), FileNotFoundError, ["safetensors", "Fix"]),
    "no config.json": (lambda f: (f / "config.json").unlink(), FileNotFoundError, ["config.json", "Fix"]),
    "config.json not JSON": (lambda f: (f / "config.json").write_text("{'model_type': forge"), CheckpointError,
                             ["config.json", "not valid JSON", "Fix"]),
    "model_type missing": (_edit_config(model_type=...), CheckpointError, ["config.json", "model_type", "Fix"]),
    "wrong model_type": (_edit_config(model_type="llama"), CheckpointError,
                         ["config.json", "model_type is 'llama'", "Fix"]),
    "size field missing": (_edit_config(hidden_size=...), CheckpointError, ["config.json", "hidden_size", "Fix"]),
    "size field wrong type": (_edit_config(num_hidden_layers="2"), CheckpointError,
                              ["config.json", "num_hidden_layers", "Fix"]),
    "vocab_size disagrees with the weights": (_edit_config(vocab_size=97), CheckpointError,
                                              ["config.json", "vocab_size=97", "model.embed_tokens.weight", "Fix"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupted_checkpoint_names_file_field_and_fix(good_folder, tmp_path, case):
    change, error, words = CASES[case]
    folder = _broken(good_folder, tmp_path, change)
    with pytest.raises(error) as raised:
        check_checkpoint_folder(folder)
    assert all(word in str(raised.value) for word in words), str(raised.value)


def test_intact_checkpoint_passes(good_folder, tiny_tokenizer):
    assert check_checkpoint_folder(good_folder, tokenizer=tiny_tokenizer)["model_type"] == "forge"
    assert check_checkpoint_folder("org/some-hub-model") is None  # a Hub id is from_pretrained's to check


def test_tokenizer_larger_than_the_embedding_is_refused(good_folder, tmp_path, tiny_tokenizer):
    from modeling_forge import ForgeConfig

    folder = _broken(good_folder, tmp_path, lambda f: None)

    model = ForgeForCausalLM(ForgeConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer) - 10))
    model.save_pretrained(folder)
    with pytest.raises(CheckpointError, match=r"tokenizer has \d+ tokens.*vocab_size.*Fix"):
        check_checkpoint_folder(folder, tokenizer=tiny_tokenizer)


def test_phase_recipes_check_their_input_first(good_folder, tmp_path):
    """Phases 3 and 4 fail on a cut input with the checker's message, before any work."""
    from recipes.phase3 import make_parser as phase3_parser
    from recipes.phase4 import make_parser as phase4_parser
    from trainers.bitnet_trainer import run_phase4
    from trainers.quietstar_trainer import run_phase3

    folder = _broken(good_folder, tmp_path, _truncate(0.5))
    (config,) = phase3_parser().parse_args_and_config(
        args=[
            "--model_name_or_path",
            str(folder),
            "--output_dir",
            str(tmp_path / "run"),
            "--report_to",
            "none",
            "--max_steps",
            "2",
        ]
    )
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        run_phase3(config)
    (config,) = phase4_parser().parse_args_and_config(
        args=["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "p4"), "--report_to", "none"]
    )
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        run_phase4(config)


def test_malformed_yaml_names_the_file_line_and_fix(tmp_path):
    from recipes.phase1 import make_parser
    from trainers.config_fields import parse_recipe_config

    path = tmp_path / "broken.yaml"
    path.write_text("output_dir: x\nmax_steps: [1, 2\nlogging_steps: 3\n")
    with pytest.raises(ValueError, match=r"broken\.yaml, line \d+, column \d+: malformed YAML .*Fix"):
        parse_recipe_config(make_parser(), ["--config", str(path)])
    path.write_text("output_dir: x\nmax_steps: 3\nnot_a_field: 1\n")
    with pytest.raises(ValueError, match="not_a_field"):  # TrlParser's own message names the key and the fix
        parse_recipe_config(make_parser(), ["--config", str(path)])


# ----------------------------------------------------------------------------------------------------------------
# Fuzzed configs: any value in any of a phase config's own fields either works or fails naming that field.


def _phase_configs():
    from trainers.bitnet_config import BitNetConfig
    from trainers.cognate_config import CognateConfig
    from trainers.evomerge_config import EvoMergeConfig
    from trainers.quietstar_config import QuietStarConfig

    common = {"output_dir": "unused", "report_to": "none", "use_cpu": True}
    return {
        CognateConfig: {**common, "max_steps": 4},
        QuietStarConfig: {**common, "model_name_or_path": "org/model", "max_steps": 2},
        BitNetConfig: {**common, "model_name_or_path": "org/model"},
        EvoMergeConfig: {"output_dir": "unused"},
    }


CONFIGS = _phase_configs()
OWN_FIELDS = [
    (cls, name)
    for cls in CONFIGS
    for name in sorted(f.name for f in dataclasses.fields(cls))
    if name not in {f.name for f in dataclasses.fields(TrainingArguments)} and name not in CONFIGS[cls]
]
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4), st.lists(st.integers(-2, 2), max_size=3),
    st.dictionaries(st.sampled_from(["corpus", "x", "arithmetic"]), st.floats(-1, 2), max_size=2),
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(OWN_FIELDS), value=VALUES)
def test_fuzzed_config_values_work_or_name_the_field(field, value):
    cls, name = field
    try:
        cls(**CONFIGS[cls], **{name: value})
    except (ValueError, TypeError) as error:
        assert name in str(error), f"{cls.__name__}({name}={value!r}) raised without naming the field: {error!r}"
