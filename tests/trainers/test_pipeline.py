"""The pipeline runner: phases chain folder to folder, finished ones are skipped, a cut one resumes with its own
switch, the live state file says what happened, and the report puts every phase on the same evaluation tasks."""

import json
from pathlib import Path

import pytest
import torch

from trainers.pipeline import PHASES, STATE_FILE, PipelineConfig, phase_finished, run_pipeline

CONFIGS = Path(__file__).parents[2] / "recipes" / "configs"


def _config(run, **overrides):
    values = dict(
        output_dir=str(run), to_phase=3, evaluate=False,
        phases={n: {"config": str(CONFIGS / f"phase{n}_tiny.yaml")} for n in (1, 2, 3, 4, 6)},
    )  # fmt: skip
    values.update(overrides)
    return PipelineConfig(**values)


class Recorder:
    """Scripted phases: each writes a stand-in `config.json` where its trainer would write its folder."""

    def __init__(self, fail_once: set[int] = frozenset()):
        self.calls, self.fail_once = [], set(fail_once)

    def runner(self, number):
        def run(config):
            self.calls.append((number, config))
            run_dir = Path(config.output_dir) if number in (1, 2, 3) else Path(config.output_dir).parent
            if number in self.fail_once:
                self.fail_once.discard(number)
                (run_dir / "phase2").mkdir(parents=True, exist_ok=True)  # a cut search leaves its state behind
                raise KeyboardInterrupt  # a killed process
            for folder in PHASES[number].models(run_dir).values():
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "config.json").write_text("{}")
            return {"output_dir": str(PHASES[number].output(run_dir))}

        return run

    def runners(self):
        return {n: self.runner(n) for n in PHASES}


def test_phases_chain_and_a_second_run_skips_every_finished_phase(tmp_path):
    recorder = Recorder()
    run_pipeline(_config(tmp_path), runners=recorder.runners())
    assert [n for n, _ in recorder.calls] == [1, 2, 3]
    by_phase = dict(recorder.calls)
    assert by_phase[1].output_dir == str(tmp_path)
    assert by_phase[2].phase1_dir == str(tmp_path / "phase1")
    assert by_phase[3].model_name_or_path == str(tmp_path / "phase2" / "champion")
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["status"] == "finished" and state["ended"]
    assert [state["phases"][str(n)]["status"] for n in range(1, 7)] == ["finished"] * 3 + ["skipped"] * 3
    assert state["phases"]["4"]["note"] == "outside the requested range"
    assert all(state["phases"][str(n)]["seconds"] is not None for n in (1, 2, 3))

    again = Recorder()
    run_pipeline(_config(tmp_path), runners=again.runners())
    assert again.calls == []
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert [state["phases"][str(n)]["note"] for n in (1, 2, 3)] == ["already finished"] * 3


def test_an_interrupted_phase_is_resumed_and_recorded_as_failed_until_then(tmp_path):
    recorder = Recorder(fail_once={2})
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(_config(tmp_path), runners=recorder.runners())
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["status"] == "failed"
    assert [state["phases"][str(n)]["status"] for n in (1, 2, 3)] == ["finished", "failed", "pending"]
    assert state["phases"]["2"]["error"].startswith("KeyboardInterrupt")
    assert not phase_finished(tmp_path, 2)

    run_pipeline(_config(tmp_path), runners=recorder.runners())
    assert [n for n, _ in recorder.calls] == [1, 2, 2, 3]
    second = recorder.calls[2][1]
    assert second.resume and (tmp_path / "phase2").exists()  # Phase 2 continues its cut search with its own switch
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert [state["phases"][str(n)]["status"] for n in (1, 2, 3)] == ["skipped", "finished", "finished"]


def test_each_phase_records_its_cpu_time_apart_from_its_wall_time(tmp_path):
    """CPU seconds estimate a phase's time on an idle machine: a busy phase is counted, a waiting one is not."""
    import time

    recorder = Recorder()

    def busy(config):
        started = time.process_time()
        while time.process_time() - started < 0.3:
            pass
        return recorder.runner(1)(config)

    def waiting(config):
        time.sleep(0.3)
        return recorder.runner(2)(config)

    run_pipeline(_config(tmp_path, to_phase=2), runners={1: busy, 2: waiting})
    phases = json.loads((tmp_path / STATE_FILE).read_text())["phases"]
    assert phases["1"]["cpu_seconds"] >= 0.3
    assert phases["2"]["seconds"] >= 0.3 and phases["2"]["cpu_seconds"] < 0.2
    assert phases["3"]["cpu_seconds"] is None  # not run


def test_from_phase_needs_the_previous_phase_finished_and_says_how_to_fix_it(tmp_path):
    with pytest.raises(RuntimeError, match="--from_phase 2"):
        run_pipeline(_config(tmp_path, from_phase=3), runners=Recorder().runners())
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["status"] == "failed"


def test_phase_configs_come_from_their_yaml_with_the_chaining_and_overrides(tmp_path):
    config = _config(tmp_path, to_phase=6, from_phase=6, phases={
        6: {"config": str(CONFIGS / "phase6_tiny.yaml"), "overrides": {"max_cycles": 2}}})  # fmt: skip
    phase6 = config.phase_config(6, resume=True)
    assert phase6.model_name_or_path == str(tmp_path / "phase5")
    assert phase6.output_dir == str(tmp_path / "phase6")
    assert phase6.max_cycles == 2 and phase6.resume
    phase4 = _config(tmp_path).phase_config(4)
    assert phase4.model_name_or_path == str(tmp_path / "phase3") and phase4.output_dir == str(tmp_path / "phase4")


def test_bad_pipeline_fields_name_the_field_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match="from_phase/to_phase"):
        _config(tmp_path, from_phase=4, to_phase=2)
    with pytest.raises(ValueError, match=r"phases\[2\] has no `config`"):
        _config(tmp_path, phases={1: {"config": "x.yaml"}})
    with pytest.raises(ValueError, match="hub_model_id"):
        _config(tmp_path, push_to_hub=True)


def _tiny_model_writer(tokenizer):
    from modeling_forge import ForgeConfig, ForgeForCausalLM
    from trainers.phase_output import save_phase_output

    def write(folder, seed):
        config = ForgeConfig.from_preset("tiny", vocab_size=len(tokenizer), trm_max_steps=1, memory_chunk_size=16,
                                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        torch.manual_seed(seed)
        save_phase_output(folder, model=ForgeForCausalLM(config), tokenizer=tokenizer, phase=1, phase_name="t",
                          config={}, metrics={"eval/perplexity": 100.0 + seed})  # fmt: skip

    return write


def test_the_report_puts_every_phase_on_the_same_tasks_and_reuses_cached_scores(tmp_path, tiny_tokenizer):
    write = _tiny_model_writer(tiny_tokenizer)

    def runner(number):
        def run(config):
            run_dir = Path(config.output_dir) if number in (1, 2, 3) else Path(config.output_dir).parent
            for seed, folder in enumerate(PHASES[number].models(run_dir).values()):
                write(folder, 10 * number + seed)

        return run

    evaluation = {"tasks": {"kv_recall": {"difficulty": 1}, "arithmetic": {"difficulty": 1}}, "limit": 3,
                  "batch_size": 4, "seed": 0, "max_new_tokens": 4}  # fmt: skip
    config = _config(tmp_path, to_phase=2, evaluate=True, evaluation=evaluation)
    summary = run_pipeline(config, runners={n: runner(n) for n in PHASES})
    results = summary["evaluation"]
    assert list(results) == [
        "1 cognate (reasoning)",
        "1 cognate (memory)",
        "1 cognate (speed)",
        "2 evomerge (champion)",
    ]
    assert all(r["n"] == {"kv_recall": 3, "arithmetic": 3} for r in results.values())
    report = (tmp_path / "pipeline_report.md").read_text()
    assert "| 2 evomerge (champion) |" in report and "pts" in report
    assert "`eval/perplexity` 120" in report  # headline metric read from the phase's metrics.json
    assert (tmp_path / "plots" / "pipeline_scores.png").exists()
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["evaluation"]["status"] == "finished" and state["report"].endswith("pipeline_report.md")
    cache = json.loads((tmp_path / "pipeline_eval.json").read_text())
    assert len(cache) == 4

    import evaluation.harness as harness

    calls = []
    original = harness.evaluate_folder
    harness.evaluate_folder = lambda *a, **k: calls.append(a) or original(*a, **k)
    try:
        run_pipeline(config, runners={n: runner(n) for n in PHASES})
    finally:
        harness.evaluate_folder = original
    assert calls == []  # unchanged weights and settings: scores come from the cache


def test_a_phase_left_out_by_skip_phases_hands_its_input_to_the_next_phase(tmp_path):
    recorder = Recorder()
    config = _config(tmp_path, to_phase=4, skip_phases=[2, 3])
    run_pipeline(config, runners=recorder.runners())
    assert [n for n, _ in recorder.calls] == [1, 4]
    assert recorder.calls[1][1].model_name_or_path == str(tmp_path / "phase1" / "reasoning")
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["phases"]["2"]["note"] == "left out by skip_phases"
    with pytest.raises(ValueError, match="skip_phases"):
        _config(tmp_path, skip_phases=[1])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("pipeline_*.yaml")), ids=lambda p: p.name)
def test_every_phase_of_a_shipped_pipeline_yaml_parses_into_its_config(path, tmp_path):
    import importlib.util

    config = PipelineConfig(config_file=str(path), output_dir=str(tmp_path))
    parsed = []
    for number in range(config.from_phase, config.to_phase + 1):
        if number in config.skip_phases:
            continue
        module = PHASES[number].config.split(":")[0]
        if importlib.util.find_spec(module) is None:  # Phase 5 lands separately
            continue
        phase = config.phase_config(number)
        assert phase.output_dir.startswith(str(tmp_path))
        parsed.append(number)
    assert {1, 2, 3, 4, 6} <= set(parsed)


def test_push_to_hub_uploads_every_finished_phase_and_the_report(tmp_path, monkeypatch, tiny_config):
    import huggingface_hub

    from modeling_forge import ForgeForCausalLM
    from tests.hub_server import FakeHub
    from trainers.phase_output import save_phase_output

    def runner(number):
        def run(config):
            run_dir = Path(config.output_dir) if number in (1, 2, 3) else Path(config.output_dir).parent
            for folder in PHASES[number].models(run_dir).values():
                torch.manual_seed(number)
                save_phase_output(folder, model=ForgeForCausalLM(tiny_config()), tokenizer=None, phase=number,
                                  phase_name="t", config={})  # fmt: skip

        return run

    with FakeHub(user="alice") as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", hub.token)
        config = _config(tmp_path, to_phase=2, push_to_hub=True, hub_model_id="lab/forge")
        (tmp_path / "pipeline_report.md").write_text("# report\n")  # as write_report leaves it
        summary = run_pipeline(config, runners={n: runner(n) for n in PHASES})
    assert summary["pushed"] == [*(f"lab/forge-phase1-{n}" for n in ("reasoning", "memory", "speed")),
                                 "lab/forge-phase2"]  # fmt: skip
    assert (
        hub.files["lab/forge-phase2"]["config.json"] == (tmp_path / "phase2" / "champion" / "config.json").read_bytes()
    )
    assert hub.files["lab/forge-phase2"]["pipeline_report.md"] == b"# report\n"
