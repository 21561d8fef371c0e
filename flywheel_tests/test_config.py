"""The YAML config: validated before any work starts, errors name the field."""

import subprocess
import sys

import pytest

from flywheel.cli import DEFAULT_CONFIG, parse_set
from flywheel.config import ConfigError, load_config


def test_default_config_is_valid():
    config = load_config(DEFAULT_CONFIG)
    assert config.model.preset == "tiny-pusht"
    assert config.ingest.source == "datasets/pusht_rotated"
    assert config.quality.calibrate_on == "model_codec"


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ingest: {source: x}\ntrain: {rnak: 8}\n")
    with pytest.raises(ConfigError, match=r"train\.rnak: unknown key"):
        load_config(path)


def test_bad_value_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ingest: {source: x}\ntrain: {rank: 0, method: lora}\nmodel: {safety: maybe}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert "train.rank" in str(err.value) and "model.safety" in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_set_overrides_are_parsed_as_yaml():
    assert parse_set(["train.steps=10", "generate.seeds=[0, 1]", "model.preset=tiny"]) == {
        "train": {"steps": 10}, "generate": {"seeds": [0, 1]}, "model": {"preset": "tiny"}}
    config = load_config(DEFAULT_CONFIG, parse_set(["train.steps=3", "train.method=dora"]))
    assert config.train.steps == 3 and config.train.method == "dora"


def test_cli_rejects_a_bad_config_before_any_work(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ingest: {source: x}\nclips: {fps: -3}\n")
    proc = subprocess.run([sys.executable, "-m", "flywheel.cli", "iterate", "--config", str(path),
                           "--home", str(tmp_path / "home")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "clips.fps" in proc.stderr
    assert not (tmp_path / "home").exists()  # nothing was started
