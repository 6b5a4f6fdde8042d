"""The shipped accelerate configs parse as accelerate's own config class (so `--config_file` accepts them)."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "recipes" / "accelerate").glob("*.yaml"))


def test_every_engine_has_a_config():
    assert {path.stem for path in CONFIGS} >= {"ddp", "fsdp", "deepspeed_zero2"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_parses(path):
    config = ClusterConfig.from_yaml_file(path)
    assert config.num_processes == 2 and config.num_machines == 1
    assert str(config.distributed_type).rsplit(".", 1)[-1] in {"MULTI_GPU", "FSDP", "DEEPSPEED"}
    if path.stem == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "ForgeDecoderLayer"
    if path.stem == "deepspeed_zero2":
        assert config.deepspeed_config["zero_stage"] == 2
