"""`--push_to_hub`: the repo is created (namespace from the id or the token's user), then every file is uploaded.

A local HTTP server stands in for the Hub endpoint (`tests/hub_server.py`); nothing reaches the network.
"""

import dataclasses

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard

from modeling_forge import ForgeForCausalLM
from tests.hub_server import FakeHub, card_metadata_errors
from trainers.phase_output import push_folder, save_phase_output


@pytest.fixture
def hub(monkeypatch):
    """The fake Hub as `huggingface_hub`'s endpoint, online mode, a token in the environment."""
    with FakeHub(user="alice") as server:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", server.token)
        yield server


def _local_files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _phase_folder(tmp_path, tiny_config, push_to_hub):
    torch.manual_seed(0)
    return save_phase_output(
        tmp_path / "phase4", model=ForgeForCausalLM(tiny_config()), tokenizer=None, phase=4, phase_name="bitnet",
        config={"lr": 1e-3}, metrics={"eval/perplexity": 12.5}, write_extras=lambda f: (f / "plots").mkdir(),
        push_to_hub=push_to_hub,
    )  # fmt: skip


def test_push_without_namespace_creates_the_repo_under_the_token_user(hub, tiny_config, tmp_path):
    folder = _phase_folder(tmp_path, tiny_config, push_to_hub="run-phase4")
    assert hub.created == [{"name": "run-phase4", "organization": "alice"}]  # the token's user (whoami)
    assert ("GET", "/api/whoami-v2") in hub.requests
    local = _local_files(folder)
    assert {"config.json", "model.safetensors", "README.md", "forge_lineage.json", "metrics.json"} <= set(local)
    assert hub.files["alice/run-phase4"] == local  # every file, byte for byte
    assert hub.commits["alice/run-phase4"] == ["Agent Forge phase 4 (bitnet)"]
    # The created repo comes before the upload.
    create = hub.requests.index(("POST", "/api/repos/create"))
    assert all(i > create for i, (_, path) in enumerate(hub.requests) if "/commit/" in path)
    # A later phase built on this folder names it by its Hub id in the card (never by the local path).
    torch.manual_seed(1)
    child = save_phase_output(
        tmp_path / "phase5", model=ForgeForCausalLM(tiny_config()), tokenizer=None, phase=5, phase_name="next",
        config={}, inputs=[folder], push_to_hub="run-phase5",
    )  # fmt: skip
    assert ModelCard.load(child / "README.md").data.base_model == ["alice/run-phase4"]
    assert hub.files["alice/run-phase5"]["README.md"] == (child / "README.md").read_bytes()


def test_fake_hub_rejects_local_base_model():
    """The stand-in rejects what the Hub rejects, so the tests above would catch a local-path `base_model`."""
    assert card_metadata_errors("---\nbase_model:\n- outputs/tiny/phase3\n---\n") != []
    assert card_metadata_errors("---\nbase_model: /tmp/x\n---\n") != []
    assert card_metadata_errors("---\nbase_model:\n- alice/run-phase4\n---\n") == []


def test_push_with_namespace_keeps_it_and_an_existing_repo_is_fine(hub, tiny_config, tmp_path):
    folder = _phase_folder(tmp_path, tiny_config, push_to_hub="lab/forge-run-phase4")
    assert hub.created[0]["organization"] == "lab" and hub.created[0]["name"] == "forge-run-phase4"
    assert ("GET", "/api/whoami-v2") not in hub.requests  # the namespace was given
    (folder / "extra.txt").write_text("second push")
    assert push_folder(folder, "lab/forge-run-phase4") == "lab/forge-run-phase4"  # exist_ok: no error on 409
    assert hub.files["lab/forge-run-phase4"]["extra.txt"] == b"second push"
    assert len(hub.commits["lab/forge-run-phase4"]) == 2


def test_push_with_a_wrong_token_fails_loudly(hub, tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(huggingface_hub.errors.HfHubHTTPError, match="Invalid user token"):
        _phase_folder(tmp_path, tiny_config, push_to_hub="run-phase4")
    assert not hub.created and (tmp_path / "phase4" / "config.json").exists()  # the local result is kept


def test_phase_recipes_name_their_hub_repos(tmp_path):
    """Each phase's repo id: `--hub_model_id` (namespace kept) or the run folder's name, plus the phase suffix."""
    from trainers.cognate_config import CognateConfig
    from trainers.cognate_trainer import _hub_repo

    config = CognateConfig(output_dir=str(tmp_path / "myrun"), max_steps=1, push_to_hub=True, report_to="none")
    assert _hub_repo(config, "reasoning") == "myrun-phase1-reasoning"
    config = dataclasses.replace(config, hub_model_id="lab/forge")
    assert _hub_repo(config, "memory") == "lab/forge-phase1-memory"
    assert _hub_repo(dataclasses.replace(config, push_to_hub=False), "memory") is None
