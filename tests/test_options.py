"""Command-line KEY=JSON options and the gate's refusal of option names it does not know."""
import pytest

from trojan_gate.pipelines import cli
from trojan_gate.pipelines.options import parse_options
from trojan_gate.plugins.gate import GateConfig


def test_option_values_are_read_as_json_and_otherwise_kept_as_text():
    assert parse_options(["epochs=20", "lr=[0.001, 0.0005]", "estimator=spsa", "trigger_jitter=null"]) == {
        "epochs": 20, "lr": [0.001, 0.0005], "estimator": "spsa", "trigger_jitter": None}


@pytest.mark.parametrize("item", ["epochs", "=3", " =3"])
def test_an_option_without_a_key_and_value_is_refused_naming_the_flag(item):
    with pytest.raises(ValueError, match="--patch-option expects KEY=VALUE"):
        parse_options([item], "--patch-option")


def test_gate_config_refuses_unknown_patch_and_scan_options():
    with pytest.raises(ValueError, match="patch_options: unknown option.*'epoch'"):
        GateConfig(patch_options={"epoch": 20})
    with pytest.raises(ValueError, match="patch_options: unknown option.*'seed'"):  # the gate's own seed decides
        GateConfig(patch_options={"seed": 3})
    with pytest.raises(ValueError, match="scan_options: unknown option.*'generator_step'"):
        GateConfig(scan_options={"generator_step": 10})
    config = GateConfig(patch_options={"epochs": 20, "distill_weight": 3.0}, scan_options={"generator_steps": 10})
    assert config.patch_options["epochs"] == 20


def test_gate_cli_with_a_misspelt_patch_option_exits_2_before_touching_mlflow(tmp_path, capsys, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    before = mlflow.get_tracking_uri()
    code = cli.main(["gate", "models:/clf/1", "--heldout", str(tmp_path / "missing.npz"),
                     "--policy", "patch", "--patch-option", "epoch=20", "--tracking-uri", "sqlite:///elsewhere.db"])
    assert code == 2
    assert "unknown option(s) 'epoch'" in capsys.readouterr().err
    assert mlflow.get_tracking_uri() == before  # the config was refused before the store was chosen


def test_the_patcher_names_its_parameters_once_for_every_caller():
    from trojan_gate.gates.patching import ModelPatcher

    names = ModelPatcher.param_names()
    assert names == sorted(names) and "self" not in names
    assert set(ModelPatcher().get_params()) == set(names) - {"progress"}
    assert all(hasattr(ModelPatcher(), n) for n in names)


def test_patch_benchmark_refuses_a_misspelt_or_seed_option_before_any_training(capsys):
    for item, name in (("epoch=20", "'epoch'"), ("seed=3", "'seed'")):
        code = cli.main(["benchmark", "patch", "--patch-option", item, "--no-mlflow"])
        err = capsys.readouterr().err
        assert code == 2
        assert f"--patch-option: unknown option(s) {name}" in err and "distill_weight" in err
