import yaml

from studio.app.jobs import MergeRunner
from studio.app.ui.build import check_models, presets
from studio.build.merge import MergeOptions
from studio.config import load_yaml

from conftest import moe_yaml


def test_merges_run_one_at_a_time_and_report_progress(mistral, tmp_path):
    base, experts = mistral
    config = load_yaml(yaml.safe_dump(moe_yaml(base, experts, gate_mode="random")))
    runner = MergeRunner()
    first = runner.start(config, tmp_path / "a", MergeOptions(out_shard_size=100_000))
    second = runner.start(config, tmp_path / "b")
    assert "Another merge is running" in second.log[0]
    assert first.finished.wait(120) and second.finished.wait(120)
    assert (first.state, second.state) == ("done", "done")
    assert first.progress.stage == "done" and first.progress.fraction == 1.0
    assert (tmp_path / "a" / "model.safetensors.index.json").exists()


def test_cancel_and_errors_become_messages(mistral, tmp_path):
    base, experts = mistral
    config = load_yaml(yaml.safe_dump(moe_yaml(base, experts, gate_mode="random")))
    runner = MergeRunner()
    blocker = runner.start(config, tmp_path / "first")
    cancelled = runner.start(config, tmp_path / "second")
    cancelled.cancel()
    assert blocker.finished.wait(120) and cancelled.finished.wait(120)
    assert cancelled.state == "cancelled" and "cancelled" in cancelled.error
    assert not (tmp_path / "second").exists()

    failing = runner.start(config, tmp_path / "first")  # exists and is not empty
    assert failing.finished.wait(60)
    assert failing.state == "failed" and "already exists" in failing.error


def test_check_models_gives_table_and_estimates(mistral):
    base, experts = mistral
    rows, estimates, message = check_models(yaml.safe_dump(moe_yaml(base, experts)))
    assert message == "Models fit together."
    assert [r[0] for r in rows] == ["base", "experts[0]", "experts[1]", "experts[2]", "experts[3]"]
    assert dict(estimates)["output architecture"] == "Mixtral"
    _, _, error = check_models("base_model: x\ngateway_mode: hidden\nexperts: [{source_model: y}]")
    assert error.startswith("**Error:**") and "did you mean `gate_mode`" in error
    assert "clown-car" in presets()
