"""Adapters as registered LoggedModels: version tags, idempotency, gate, promote, rollback (real sqlite store)."""

import json

import pytest

from flywheel.lineage import registry, runs, tracking
from flywheel.lineage.cli import main as cli_main
from flywheel.store import hash_tree
from flywheel_tests.lineage import BASE_MODEL, BASE_REVISION, make_adapter, shared_home

GATE = {"metrics": [{"name": "score", "min_gain_over_base": 0.05, "max_drop_vs_champion": 0.01}]}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return shared_home(tmp_path_factory)


def test_gate_needs_gain_over_base_and_no_regression_vs_champion():
    passed = registry.evaluate_gate({"score": 0.8}, {"score": 0.7}, {"score": 0.805}, GATE)
    assert passed.passed and passed.checks[0]["ok"]
    small_gain = registry.evaluate_gate({"score": 0.72}, {"score": 0.7}, None, GATE)
    assert not small_gain.passed and "vs base" in small_gain.reasons[0]
    regressed = registry.evaluate_gate({"score": 0.8}, {"score": 0.5}, {"score": 0.9}, GATE)
    assert not regressed.passed and "vs champion" in regressed.reasons[0]
    lower = {"metrics": [{"name": "fvd", "higher_is_better": False}]}
    assert registry.evaluate_gate({"fvd": 90.0}, {"fvd": 100.0}, None, lower).passed
    assert not registry.evaluate_gate({"fvd": 100.0}, {"fvd": 100.0}, None, lower).passed  # equal is not better
    with pytest.raises(ValueError, match="missing from the base model"):
        registry.evaluate_gate({"fvd": 1.0}, {}, None, lower)
    with pytest.raises(ValueError, match="extra"):
        registry.evaluate_gate({"fvd": 1.0}, {"fvd": 2.0}, None, {"metrics": [{"name": "fvd", "typo": 1}]})


def test_register_tags_lineage_and_is_idempotent_on_content(home, tmp_path):
    adapter = make_adapter(tmp_path / "a1", seed=1, rank=8)
    client = tracking.client(home)
    with runs.step_run(home, None, "adapter", "reg-a", "dg-7", "adapter/reg-a/1", "code-9") as run:
        version = registry.register_adapter(home, "reg-a", adapter, None, "t" * 64, iteration=2, run_id=run.run_id)
        again = registry.register_adapter(home, "reg-a", adapter, None, "t" * 64, iteration=2, run_id=run.run_id)
    assert version == again == "1"
    assert len(client.search_model_versions("name = 'flywheel-reg-a'")) == 1
    mv = client.get_model_version("flywheel-reg-a", version)
    assert mv.tags["flywheel.adapter_digest"] == hash_tree(adapter)
    assert (mv.tags["flywheel.base_model_id"], mv.tags["flywheel.base_revision"]) == (BASE_MODEL, BASE_REVISION)
    assert (mv.tags["flywheel.rank"], mv.tags["flywheel.alpha"], mv.tags["flywheel.method"]) == ("8", "16", "lora")
    assert (mv.tags["flywheel.iteration"], mv.tags["flywheel.code_version"]) == ("2", "code-9")
    assert mv.tags["flywheel.training_dataset_digest"] == "t" * 64 and mv.tags["flywheel.parent_version"] == ""
    assert mv.run_id == run.run_id and mv.aliases == ["candidate"]
    model = client.get_logged_model(registry.model_id_of(mv))
    assert model.source_run_id == run.run_id and model.params["rank"] == "8"
    assert [o.model_id for o in client.get_run(run.run_id).outputs.model_outputs] == [model.model_id]
    resolved_version, path = registry.resolve_adapter(home, "reg-a", 1)
    assert resolved_version == "1" and hash_tree(path) == hash_tree(adapter)

    child = registry.register_adapter(home, "reg-a", make_adapter(tmp_path / "a2", seed=2), None, "u" * 64, 3, parent_version=1)
    assert child == "2"
    assert client.get_model_version("flywheel-reg-a", "2").tags["flywheel.parent_version"] == "1"
    assert client.get_registered_model("flywheel-reg-a").aliases == {"candidate": 2}


def test_register_refuses_incomplete_adapters_clearly(home, tmp_path):
    adapter = make_adapter(tmp_path / "a", seed=3)
    card = json.loads((adapter / "adapter_card.json").read_text())
    del card["base_revision"]
    with pytest.raises(ValueError, match="base_revision"):
        registry.register_adapter(home, "reg-b", adapter, card, "t" * 64, 0)
    (adapter / "pytorch_lora_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        registry.register_adapter(home, "reg-b", adapter, None, "t" * 64, 0)
    with pytest.raises(Exception, match="(?i)not found|does not exist"):
        registry.register_adapter(home, "reg-b", make_adapter(tmp_path / "b", 4), None, "t" * 64, 0, parent_version=7)


def test_promote_only_through_the_gate_and_rollback_keeps_history(home, tmp_path, capsys):
    domain = "gov"
    client = tracking.client(home)
    scores = {"1": 0.80, "2": 0.90, "3": 0.70, "4": 0.60}
    for version, score in scores.items():
        assert registry.register_adapter(home, domain, make_adapter(tmp_path / version, seed=10 + int(version)), None, "t" * 64, int(version)) == version
        registry.record_evaluation(home, domain, version, {"score": score}, {"score": 0.65})

    with pytest.raises(registry.PromotionRefused, match="champion stays None"):
        registry.promote(home, domain, "4", registry.gate_for_version(home, domain, "4", GATE))  # worse than base
    assert registry.champion_version(home, domain) is None

    registry.promote(home, domain, "1", registry.gate_for_version(home, domain, "1", GATE), reason="first")
    assert cli_main(["adapters", "promote", domain, "2", "--metric", "score", "--min-gain", "0.05", "--home", str(home)]) == 0
    assert "v2 is now champion" in capsys.readouterr().out
    assert registry.champion_version(home, domain) == "2"

    # 3 beats the base but is worse than champion 2: refused, champion unchanged.
    assert cli_main(["adapters", "promote", domain, "3", "--metric", "score", "--home", str(home)]) == 1
    assert "not promoted; champion stays 2" in capsys.readouterr().err
    assert registry.champion_version(home, domain) == "2"
    assert client.get_model_version(f"flywheel-{domain}", "3").tags["flywheel.gate"] == "failed"

    assert registry.rollback(home, domain, reason="regression in the field") == "1"
    assert registry.champion_version(home, domain) == "1"
    assert registry.resolve_adapter(home, domain)[0] == "1"  # generation follows the champion
    events = [(e["event"], e["version"], e["previous_champion"]) for e in registry.governance_history(home, domain)]
    assert events == [
        ("promote-refused", "4", ""),
        ("promote", "1", ""),
        ("promote", "2", "1"),
        ("promote-refused", "3", "2"),
        ("rollback", "1", "2"),
    ]
    assert json.loads(client.get_registered_model(f"flywheel-{domain}").tags["flywheel.champion_history"]) == ["1"]
    assert len(client.search_model_versions(f"name = 'flywheel-{domain}'")) == 4  # nothing deleted
    with pytest.raises(ValueError, match="no earlier champion"):
        registry.rollback(home, domain)
    assert cli_main(["adapters", "rollback", domain, "--to", "3", "--home", str(home)]) == 1
    assert "never an earlier champion" in capsys.readouterr().err

    assert cli_main(["adapters", "list", "--domain", domain, "--home", str(home)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["DOMAIN", "VERSION", "ALIASES"]
    assert table[1].split()[:2] == [domain, "4"] and "champion" in table[4] and table[4].split()[1] == "1"
    assert cli_main(["adapters", "show", domain, "--home", str(home), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "1" and shown["eval"] == {"score": 0.8} and len(shown["history"]) == 5
