"""Adapters as registered LoggedModels: lineage from the card, model <-> version links, stored once, and every
governance decision (gate, manual promote, rollback, import, and their refusals) a run (real sqlite store)."""

import json
import os

import pytest

from flywheel import decisions
from flywheel.cli import main as flywheel_main
from flywheel.errors import DecisionRefused, IntegrityError
from flywheel.lineage import registry, runs, tracking
from flywheel.store import hash_file, hash_tree
from flywheel_tests.lineage import BASE_MODEL, BASE_REVISION, make_adapter, shared_home

GATE = decisions.AdapterGate(min_psnr_gain_db=0.05, max_psnr_drop_vs_champion_db=0.01)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return shared_home(tmp_path_factory)


def evaluation(psnr: float, base_psnr: float = 20.0) -> tuple[dict, dict]:
    return {"psnr": psnr, "ssim": 0.9, "filter_pass_rate": 1.0}, {"psnr": base_psnr, "ssim": 0.9, "filter_pass_rate": 1.0}


def test_register_tags_lineage_from_the_card_links_model_and_version_and_stores_once(home, tmp_path):
    adapter = make_adapter(tmp_path / "a1", seed=1, rank=8)
    client = tracking.client(home)
    with runs.step_run(home, None, "adapter", "reg-a", "dg-7", "adapter/reg-a/1", "code-9") as run:
        version = registry.register_adapter(home, "reg-a", adapter, None, "t" * 64, iteration=2, run_id=run.run_id)
        again = registry.register_adapter(home, "reg-a", adapter, None, "t" * 64, iteration=2, run_id=run.run_id)
    assert version == again == "1"
    assert len(client.search_model_versions("name = 'flywheel-reg-a'")) == 1
    experiment = client.get_experiment_by_name("flywheel-reg-a")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow 3's model-training view
    mv = client.get_model_version("flywheel-reg-a", version)
    assert mv.tags["flywheel.adapter_digest"] == hash_tree(adapter)
    assert mv.tags["flywheel.weights_sha256"] == hash_file(adapter / "pytorch_lora_weights.safetensors")
    assert (mv.tags["flywheel.base_model_id"], mv.tags["flywheel.base_revision"]) == (BASE_MODEL, BASE_REVISION)
    assert (mv.tags["flywheel.rank"], mv.tags["flywheel.alpha"], mv.tags["flywheel.method"]) == ("8", "16", "lora")
    assert (mv.tags["flywheel.iteration"], mv.tags["flywheel.code_version"]) == ("2", "code-9")
    assert mv.tags["flywheel.lineage"] == "trained" and mv.tags["flywheel.parent_version"] == ""
    assert "trained from the base model" in mv.description and "iteration 2" in mv.description
    assert mv.tags["flywheel.training_dataset_digest"] == "t" * 64
    assert mv.run_id == run.run_id and mv.aliases == ["candidate"]

    # model <-> version <-> run <-> data, both ways
    model = client.get_logged_model(registry.model_id_of(mv))
    assert mv.source == f"models:/{model.model_id}"
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": "flywheel-reg-a", "version": "1"}]
    assert model.source_run_id == run.run_id and model.params["rank"] == "8"
    assert [o.model_id for o in client.get_run(run.run_id).outputs.model_outputs] == [model.model_id]
    assert {(m.key, m.dataset_name, m.dataset_digest) for m in model.metrics} >= {("final_loss", "training_data", "t" * 32)}
    assert ("training_data", "t" * 64) in {(d["name"], d["digest"]) for d in runs.dataset_inputs(home, run.run_id)}

    # one copy on disk: the registry's files are hard links to the adapter's
    resolved_version, path = registry.resolve_adapter(home, "reg-a", 1)
    assert resolved_version == "1" and hash_tree(path) == hash_tree(adapter)
    weights = "pytorch_lora_weights.safetensors"
    assert os.stat(path / weights).st_ino == os.stat(adapter / weights).st_ino
    assert model.tags["flywheel.artifact_storage"] == "hardlinks"


def test_parent_version_only_when_the_card_says_training_continued(home, tmp_path):
    domain = "reg-parent"
    first = make_adapter(tmp_path / "first", seed=21)
    assert registry.register_adapter(home, domain, first, None, "t" * 64, 1) == "1"
    fresh = make_adapter(tmp_path / "fresh", seed=22)  # trained from the base: no parent_adapter in its card
    with pytest.raises(IntegrityError, match="trained from the base model.*parent_version=1"):
        registry.register_adapter(home, domain, fresh, None, "u" * 64, 2, parent_version=1)
    assert registry.register_adapter(home, domain, fresh, None, "u" * 64, 2) == "2"

    continued = make_adapter(tmp_path / "continued", seed=23, parent=first)
    with pytest.raises(IntegrityError, match="version 2"):  # v2's weights are not the ones the card names
        registry.register_adapter(home, domain, continued, None, "v" * 64, 3, parent_version=2)
    assert registry.register_adapter(home, domain, continued, None, "v" * 64, 3) == "3"  # parent found by weights
    mv = tracking.client(home).get_model_version(f"flywheel-{domain}", "3")
    assert (mv.tags["flywheel.lineage"], mv.tags["flywheel.parent_version"]) == ("continued", "1")
    assert "continued from version 1" in mv.description
    assert [a["version"] for a in registry.list_adapters(home, domain)] == ["3", "2", "1"]


def test_register_refuses_incomplete_adapters_clearly(home, tmp_path):
    adapter = make_adapter(tmp_path / "a", seed=3)
    card = json.loads((adapter / "adapter_card.json").read_text())
    del card["base_model"]["revision"]
    with pytest.raises(ValueError, match="base_revision"):
        registry.register_adapter(home, "reg-b", adapter, card, "t" * 64, 0)
    (adapter / "pytorch_lora_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        registry.register_adapter(home, "reg-b", adapter, None, "t" * 64, 0)
    assert not tracking.client(home).search_model_versions("name = 'flywheel-reg-b'")


def governance_runs(home, domain):
    client = tracking.client(home)
    experiment = client.get_experiment_by_name(f"flywheel-{domain}").experiment_id
    found = runs.find_runs(client, [experiment], {"flywheel.kind": "governance"})
    return sorted(found, key=lambda r: int(r.data.tags["flywheel.event_time_ns"]))


def test_every_governance_decision_is_a_run_with_its_reasons_and_actor(home, tmp_path, capsys):
    domain = "gov"
    args = ["--home", str(home)]
    for version, seed in (("1", 11), ("2", 12), ("3", 13)):
        registry.register_adapter(home, domain, make_adapter(tmp_path / version, seed=seed), None, "t" * 64, int(version))

    # refused promote: no evaluation recorded
    assert flywheel_main(["adapters", "promote", domain, "1", *args]) == 2
    assert "no recorded evaluation" in capsys.readouterr().err
    # refused rollback: there is no earlier champion
    assert flywheel_main(["adapters", "rollback", domain, "--reason", "field regression", *args]) == 2
    assert "roll back only to a former champion" in capsys.readouterr().err

    for version, psnr in (("1", 21.0), ("2", 22.0), ("3", 21.5)):
        registry.record_evaluation(home, domain, version, *evaluation(psnr))
    assert flywheel_main(["adapters", "promote", domain, "1", *args]) == 0
    assert flywheel_main(["adapters", "promote", domain, "2", *args]) == 0
    assert "v2 is now champion" in capsys.readouterr().out
    with pytest.raises(DecisionRefused, match="PSNR drop vs champion v2"):  # better than the base, worse than v2
        decisions.promote_by_hand(home, domain, "3", GATE, "a test")
    assert decisions.rollback(home, domain, None, "a test", reason="regressed on the robot").passed
    assert registry.champion_version(home, domain) == "1"

    history = governance_runs(home, domain)
    summary = [(r.data.tags["flywheel.event"], r.data.tags["flywheel.version"], r.data.tags["flywheel.decision"],
                r.info.status) for r in history]
    assert summary == [
        ("promote-refused", "1", "refused", "FAILED"),
        ("rollback-refused", "", "refused", "FAILED"),
        ("promote", "1", "passed", "FINISHED"),
        ("promote", "2", "passed", "FINISHED"),
        ("promote-refused", "3", "refused", "FAILED"),
        ("rollback", "1", "passed", "FINISHED"),
    ]
    refused_promote, refused_rollback = history[0].data.tags, history[1].data.tags
    assert "recorded evaluation none" in refused_promote["flywheel.reasons"]
    assert refused_promote["flywheel.actor"].startswith("user ") and "flywheel adapters promote" in refused_promote["flywheel.actor"]
    assert "earlier champions" in refused_rollback["flywheel.reasons"]
    assert refused_rollback["flywheel.reason"] == "field regression"
    assert "PSNR drop vs champion" in history[4].data.tags["flywheel.reasons"] and history[4].data.tags["flywheel.actor"] == "a test"
    assert history[5].data.tags["flywheel.previous_champion"] == "2"
    assert history[4].data.metrics  # the criteria's measured values
    client = tracking.client(home)
    model_id = registry.model_id_of(client.get_model_version(f"flywheel-{domain}", "3"))
    assert [m.model_id for m in client.get_run(history[4].info.run_id).inputs.model_inputs] == [model_id]
    assert registry.champion_stack(home, domain) == ["1"]

    assert flywheel_main(["adapters", "show", domain, *args, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "1" and shown["eval"]["psnr"] == 21.0 and len(shown["history"]) == 6
    assert shown["url"].startswith(tracking.ui_base_url(home))


def test_import_registers_an_external_candidate_or_records_the_refusal(home, tmp_path):
    domain = "imp"
    registry.register_adapter(home, domain, make_adapter(tmp_path / "trained", seed=31), None, "t" * 64, 1)
    other_base = make_adapter(tmp_path / "other", seed=32, external=True, base_revision="f" * 40)
    with pytest.raises(DecisionRefused, match="base model"):
        decisions.import_adapter_version(home, domain, other_base, "user x via a test")
    assert len(registry.list_adapters(home, domain)) == 1  # nothing registered

    imported = make_adapter(tmp_path / "ext", seed=33, external=True)
    version, decision = decisions.import_adapter_version(home, domain, imported, "user x via a test", reason="recipe run")
    assert version == "2" and decision.passed
    mv = tracking.client(home).get_model_version(f"flywheel-{domain}", version)
    card = json.loads((imported / "adapter_card.json").read_text())
    assert mv.tags["flywheel.lineage"] == "external" and mv.tags["flywheel.parent_version"] == ""
    assert mv.tags["flywheel.source_sha256"] == card["source"]["sha256"] and mv.tags["flywheel.iteration"] == ""
    assert mv.tags["flywheel.training_dataset_digest"] == "" and "imported (lineage external)" in mv.description
    assert mv.aliases == ["candidate"] and registry.champion_version(home, domain) is None
    events = [(e["event"], e["version"], e["status"]) for e in registry.governance_history(home, domain)]
    assert events == [("import-refused", "", "FAILED"), ("import", "2", "FINISHED")]
    assert registry.governance_history(home, domain)[1]["reason"] == "recipe run"
