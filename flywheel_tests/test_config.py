"""The run config: one set of defaults (the generated default_config.yaml), one layering (defaults, your YAML,
--set / Launchpad), validated before any work starts, each error naming where its value came from."""

import subprocess
import sys

import pytest
import yaml

from flywheel.config import DEFAULT_CONFIG_FILE, FlywheelConfig, default_yaml, load_config, parse_set
from flywheel.errors import ConfigError


def test_the_packaged_yaml_is_generated_from_the_models():
    assert DEFAULT_CONFIG_FILE.read_text() == default_yaml(), \
        "flywheel/default_config.yaml is stale: run `python -m flywheel.config --write-defaults`"
    packaged = yaml.safe_load(DEFAULT_CONFIG_FILE.read_text())
    assert FlywheelConfig.model_validate(packaged) == FlywheelConfig()
    defaults = FlywheelConfig()
    assert defaults.model.preset == "tiny-pusht" and defaults.domain == "pusht-rotated"
    assert (defaults.train.rank, defaults.train.steps) == (16, 300)
    assert defaults.quality.calibrate_on == "model_codec" and len(defaults.refresh.usefulness.seeds) >= 3


def test_a_partial_yaml_is_merged_over_the_defaults(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("train: {rank: 8}\ngenerate: {max_videos: 2}\n")
    config = load_config(path)
    assert config.train.rank == 8 and config.train.steps == 300  # the rest of train stays the default
    assert config.generate.max_videos == 2 and config.generate.seeds == FlywheelConfig().generate.seeds
    assert config.model.preset == "tiny-pusht"
    # --set goes over the file
    assert load_config(path, set_args=["train.rank=4"]).train.rank == 4


def test_errors_name_the_file_or_the_set_argument(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {rnak: 8, rank: 0}\nmodel: {safety: maybe}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert f"{path}: train.rnak: unknown key" in message
    assert f"{path}: train.rank: Input should be greater than 0" in message
    assert f"{path}: model.safety" in message
    with pytest.raises(ConfigError, match=r"--set train.learning_rate=\.inf: train.learning_rate"):
        load_config(set_args=["train.learning_rate=.inf"])
    with pytest.raises(ConfigError, match=r"--set 'generate.seeds=\[0,1': the value is not valid YAML"):
        load_config(set_args=["generate.seeds=[0,1"])
    with pytest.raises(ConfigError, match=r"--set 'steps': expected SECTION.KEY=VALUE"):
        load_config(set_args=["steps"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_set_values_are_parsed_as_yaml():
    assert parse_set(["train.steps=10", "generate.seeds=[0, 1]", "model.preset=tiny"]).values == {
        "train": {"steps": 10}, "generate": {"seeds": [0, 1]}, "model": {"preset": "tiny"}}


def test_the_launchpad_mirrors_the_config_and_names_its_errors():
    from flywheel.defs.config import run_settings_class

    settings = run_settings_class()()
    assert settings.to_core(domain="d") == FlywheelConfig(domain="d")
    with pytest.raises(ConfigError, match=r"the Launchpad \(resources.flywheel.config.run\): train.rank"):
        run_settings_class()(train={"rank": 0}).to_core()


def test_cli_rejects_a_bad_config_before_any_work(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("clips: {fps: -3}\n")
    proc = subprocess.run([sys.executable, "-m", "flywheel.cli", "iterate", "--config", str(path),
                           "--home", str(tmp_path / "home")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"{path}: clips.fps" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "home").exists()  # nothing was started
