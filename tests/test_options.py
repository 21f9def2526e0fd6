"""Command-line KEY=JSON options, the settings file, and the refusal of names nobody knows."""
import pytest

from trojan_gate.pipelines import cli
from trojan_gate.pipelines.options import parse_options
from trojan_gate.plugins.gate import ConfigError, GateConfig


def test_option_values_are_read_as_json_and_otherwise_kept_as_text():
    assert parse_options(["epochs=20", "lr=[0.001, 0.0005]", "blend=max", "trigger_jitter=null"]) == {
        "epochs": 20, "lr": [0.001, 0.0005], "blend": "max", "trigger_jitter": None}


@pytest.mark.parametrize("item", ["epochs", "=3", " =3"])
def test_an_option_without_a_key_and_value_is_refused_naming_the_flag(item):
    with pytest.raises(ValueError, match="--patch-option expects KEY=VALUE"):
        parse_options([item], "--patch-option")


def test_gate_config_refuses_unknown_keys_naming_them():
    with pytest.raises(ConfigError, match=r"\[patch\]: unknown key\(s\) 'epoch'"):
        GateConfig(patch={"epoch": 20})
    with pytest.raises(ConfigError, match=r"\[patch\]: unknown key\(s\) 'seed'"):  # the gate's own seed decides
        GateConfig(patch={"seed": 3})
    with pytest.raises(ConfigError, match=r"\[scan\]: unknown key\(s\) 'generator_step'"):
        GateConfig(scan={"options": {"generator_step": 10}})
    with pytest.raises(ConfigError, match=r"\[check\]: unknown key\(s\) 'boundary'"):
        GateConfig(check={"boundary": 0.1})
    with pytest.raises(ConfigError, match=r"\[strip\] was renamed \[check\]"):  # settings files before format 3
        GateConfig.from_dict({"strip": {"check": "strip"}})
    with pytest.raises(ConfigError, match="check.kind"):
        GateConfig(check={"kind": "entropy"})
    with pytest.raises(ConfigError, match="unknown section"):
        GateConfig.from_dict({"gates": {}})
    with pytest.raises(ConfigError, match="gate.policy"):
        GateConfig(policy="quarantine")
    config = GateConfig(patch={"epochs": 20, "distill_weight": 3.0}, scan={"options": {"generator_steps": 10}})
    assert config.patch["epochs"] == 20 and config.resolved()["scan"]["generator_steps"] == 10


SETTINGS = """
[gate]
policy = "patch"
seed = 3

[scan]
use_heldout = false
cutoff = 2.5
generator_steps = 120

[patch]
soup = 2

[check]
frr = 0.02
"""


def test_the_settings_file_round_trips_and_flags_override_it(tmp_path):
    from trojan_gate.pipelines.gate import add_arguments, config_from_args

    path = tmp_path / "trojan-gate.toml"
    path.write_text(SETTINGS)
    config = GateConfig.from_toml(path)
    assert (config.policy, config.seed, config.scan.use_heldout, config.scan.cutoff) == ("patch", 3, False, 2.5)
    assert config.scan.options == {"generator_steps": 120} and config.patch == {"soup": 2}
    assert config.check.frr == 0.02 and config.check.n_perturbations == 10
    assert GateConfig.from_dict(config.to_dict()) == config
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["models:/m/1", "--heldout", "h.npz", "--config", str(path), "--policy", "block",
                              "--n", "20", "--patch-option", "epochs=5"])
    merged = config_from_args(args)
    assert merged.policy == "block" and merged.check.n_perturbations == 20 and merged.seed == 3
    assert merged.patch == {"soup": 2, "epochs": 5} and merged.scan.options == {"generator_steps": 120}


def test_a_misspelt_settings_file_exits_2_naming_the_key(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[scan]\ngenerator_stepz = 3\n")
    code = cli.main(["gate", "models:/clf/1", "--heldout", str(tmp_path / "missing.npz"), "--config", str(path)])
    assert code == 2 and "'generator_stepz'" in capsys.readouterr().err
    path.write_text("[scan\n")
    code = cli.main(["scan", str(tmp_path / "m.onnx"), "--report", str(tmp_path / "r.json"), "--config", str(path)])
    assert code == 2 and "not valid TOML" in capsys.readouterr().err
    path.write_text("[patch]\nsoupz = 3\n")  # the demo takes the same file and refuses it before training
    code = cli.main(["demo", "--workdir", str(tmp_path / "demo"), "--dataset", "digits", "--config", str(path)])
    assert code == 2 and "'soupz'" in capsys.readouterr().err and not (tmp_path / "demo").exists()


def test_gate_cli_with_a_misspelt_patch_option_exits_2_before_touching_mlflow(tmp_path, capsys, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    before = mlflow.get_tracking_uri()
    code = cli.main(["gate", "models:/clf/1", "--heldout", str(tmp_path / "missing.npz"),
                     "--policy", "patch", "--patch-option", "epoch=20", "--tracking-uri", "sqlite:///elsewhere.db"])
    assert code == 2
    assert "unknown key(s) 'epoch'" in capsys.readouterr().err
    assert mlflow.get_tracking_uri() == before  # the config was refused before the store was chosen


def test_the_patcher_names_its_parameters_once_for_every_caller():
    from trojan_gate.gates.patching import Patcher

    names = Patcher.param_names()
    assert names == sorted(names) and "self" not in names
    assert set(Patcher().get_params()) == set(names) - {"progress"}
    assert all(hasattr(Patcher(), n) for n in names)


def test_patch_benchmark_refuses_a_misspelt_or_seed_option_before_any_training(capsys):
    for item, name in (("epoch=20", "'epoch'"), ("seed=3", "'seed'")):
        code = cli.main(["benchmark", "patch", "--patch-option", item, "--no-mlflow"])
        err = capsys.readouterr().err
        assert code == 2
        assert f"--patch-option: unknown option(s) {name}" in err and "distill_weight" in err


def test_the_demo_gates_with_the_defaults_unless_given_a_settings_file(tmp_path):
    import argparse

    from trojan_gate.pipelines import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    plain = parser.parse_args([])
    for policy in ("block", "patch"):
        assert demo._config(plain, policy).resolved() == GateConfig(policy=policy).resolved()
    no_heldout = demo._config(parser.parse_args(["--no-use-heldout"]), "block")
    assert no_heldout.resolved() == GateConfig(policy="block", scan={"use_heldout": False}).resolved()
    path = tmp_path / "gate.toml"
    path.write_text(SETTINGS)  # its policy is the file's; the demo sets each gate's own
    chosen = demo._config(parser.parse_args(["--config", str(path)]), "block")
    assert chosen.policy == "block" and chosen.patch == {"soup": 2} and chosen.check.frr == 0.02
