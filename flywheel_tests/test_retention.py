"""`flywheel gc` core: what goes is what no champion, candidate, rollback target, newest dataset version or
running iteration needs; registry and records are real (MLflow sqlite store in the home)."""

import json
import shutil
import threading

import numpy as np
import pytest

from flywheel import retention
from flywheel.store import ArtifactStore

DOMAIN = "cell-a"
NOW = retention.Policy(keep_datasets=1, min_age_s=0)


def put(store: ArtifactStore, kind: str, key: str, meta: dict | None = None, files: dict | None = None) -> str:
    def fill(tmp):
        for name, content in (files or {"data.bin": b"x" * 1000}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    store.build(kind, key, fill, meta)
    return key


def iteration(store: ArtifactStore, n: int, dataset_root: str) -> dict[str, str]:
    """The artifacts one flywheel iteration writes, linked the way the stages link them."""
    home, k = store.home, f"{n:02d}" * 12
    keys = {"manifest": put(store, "manifests", f"m{k}"[:24], {"episodes": 10},
                            {"manifest.json": {"dataset_root": dataset_root}, "manifest.parquet": b"p" * 500})}
    keys["clips"] = put(store, "clips", f"c{k}"[:24], {"manifest_key": keys["manifest"]})
    keys["latents"] = put(store, "latents", f"l{k}"[:24], {"clip_set": keys["clips"],
                                                           "clip_set_path": str(home / "clips" / keys["clips"])})
    weights = np.random.default_rng(n).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    card = {"format": "flywheel-adapter/1", "base_model": {"model_id": "flywheel/tiny-pusht", "revision": "r1"},
            "method": "lora", "rank": 4, "alpha": 4, "scaling": 1.0, "target_modules": ["to_q"],
            "num_trainable_parameters": 0}
    keys["adapter"] = put(store, "adapters", f"a{k}"[:24], {"latent_cache": str(home / "latents" / keys["latents"])},
                          {"pytorch_lora_weights.safetensors": weights, "adapter_card.json": card})
    keys["evaluation"] = put(store, "evaluations", f"e{k}"[:24], {"passed": True})
    keys["synthetic"] = put(store, "synthetic", f"s{k}"[:24], {"adapter": str(home / "adapters" / keys["adapter"])})
    keys["idm"] = put(store, "idm", f"i{k}"[:24], {"dataset_root": dataset_root})
    keys["labels"] = put(store, "labels", f"b{k}"[:24], {"videos": 8}, {"labels.json": {
        "synthetic": str(home / "synthetic" / keys["synthetic"]), "idm": str(home / "idm" / keys["idm"])}})
    keys["curated"] = put(store, "curated", f"q{k}"[:24], {"accepted": 2}, {"curated.json": {
        "labels": str(home / "labels" / keys["labels"]), "synthetic": str(home / "synthetic" / keys["synthetic"])}})
    keys["dataset"] = put(store, "datasets", f"d{k}"[:16], {"base_root": dataset_root})
    record = {"domain": DOMAIN, "iteration": n, "stages": {
        stage: {"key": keys[part], "path": str(home / kind / keys[part])} for stage, part, kind in (
            ("demonstrations", "manifest", "manifests"), ("training_clips", "clips", "clips"),
            ("adapter", "adapter", "adapters"), ("adapter_evaluation", "evaluation", "evaluations"),
            ("synthetic_videos", "synthetic", "synthetic"), ("pseudo_actions", "labels", "labels"),
            ("curated_trajectories", "curated", "curated"), ("refreshed_dataset", "dataset", "datasets"))}}
    (home / "iterations" / DOMAIN).mkdir(parents=True, exist_ok=True)
    (home / "iterations" / DOMAIN / f"{n:04d}.json").write_text(json.dumps(record))
    return keys


@pytest.fixture(scope="module")
def three_iterations(tmp_path_factory, robot_datasets):
    """v1 champion, v2 refused by the gate (still the candidate until v3), v3 champion: v1 is v3's rollback target."""
    from flywheel.lineage import registry

    store = ArtifactStore(tmp_path_factory.mktemp("gc") / "home")
    source = str(robot_datasets / "pusht_rotated")
    its = {1: iteration(store, 1, source)}
    its[2] = iteration(store, 2, str(store.path("datasets", its[1]["dataset"])))
    its[3] = iteration(store, 3, str(store.path("datasets", its[2]["dataset"])))
    from flywheel.decisions import Decision

    passed = Decision(name="adapter gate", subject="test", passed=True, outcome="promoted to champion")
    for n in (1, 2, 3):
        version = registry.register_adapter(store.home, DOMAIN, store.path("adapters", its[n]["adapter"]), None,
                                            training_dataset_digest=f"data-{n}", iteration=n)
        assert version == str(n)
        if n != 2:
            registry.apply_promotion(store.home, DOMAIN, version, passed)
    return store, its


def test_gc_removes_only_what_nothing_kept_needs(three_iterations):
    from flywheel.lineage import registry

    store, its = three_iterations
    (store.home / "clips" / ".tmp-deadbeef-0badc0de").mkdir()  # a killed writer's temp dir
    (store.home / "work" / "adapters-feed").mkdir(parents=True)  # and its empty scratch dir
    orphan = store.home / "reports" / "usefulness" / "0123456789abcdef"
    orphan.mkdir(parents=True)
    (orphan / "usefulness.json").write_text("{}")
    kept_report = store.home / "reports" / "usefulness" / its[3]["dataset"]
    kept_report.mkdir(parents=True)
    (kept_report / "usefulness.json").write_text("{}")

    # By default nothing finished in the last hour goes; a report whose dataset version is gone always does.
    assert [d.reason for d in retention.plan(store.home).remove] == [
        "usefulness report of dataset version 0123456789abcdef, which is gone"]
    plan = retention.plan(store.home, NOW)
    gone = {d.name for d in plan.remove}
    second = its[2]
    assert gone == {f"{kind}/{second[part]}" for kind, part in (
        ("manifests", "manifest"), ("clips", "clips"), ("latents", "latents"), ("adapters", "adapter"),
        ("evaluations", "evaluation"), ("synthetic", "synthetic"), ("idm", "idm"), ("labels", "labels"),
        ("curated", "curated"))} | {"reports/usefulness/0123456789abcdef"}
    # Why what stays stays: the champion, the rollback target, each one's iteration, and the data v3 trained on.
    assert plan.kept[f"adapters/{its[3]['adapter']}"] == "flywheel-cell-a v3: candidate, champion"
    assert plan.kept[f"adapters/{its[1]['adapter']}"] == "flywheel-cell-a v1: an earlier champion (rollback target)"
    assert plan.kept[f"evaluations/{its[1]['evaluation']}"].startswith("made by the iteration of flywheel-cell-a v1")
    assert plan.kept[f"datasets/{second['dataset']}"] in (f"an input of manifests/{its[3]['manifest']}",
                                                          f"an input of idm/{its[3]['idm']}")
    assert {s.path.name for s in plan.leftovers} == {".tmp-deadbeef-0badc0de", "adapters-feed"}
    expected_bytes = sum(d.bytes for d in plan.remove) + sum(s.bytes for s in plan.leftovers)
    assert plan.bytes == expected_bytes > 9000
    assert "in 10 artifact(s) and 2 leftover dir(s)" in plan.lines()[-1]
    # A home copied elsewhere (its records name the old paths) plans the same.
    copy = store.home.parent / "copied-home"
    shutil.copytree(store.home, copy, symlinks=True)
    assert {d.name for d in retention.plan(copy, NOW).remove} == gone
    shutil.rmtree(copy)

    # Another process (here: thread) holding one of them: that one is left, the rest goes.
    held, release = threading.Event(), threading.Event()

    def hold():
        with store.lock("clips", second["clips"]):
            held.set()
            release.wait(30)
    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(30)
    try:
        removal = retention.apply(store.home, NOW)
    finally:
        release.set()
        holder.join()
    assert removal.skipped == {f"clips/{second['clips']}": "another process holds it"}
    assert set(removal.removed) == (gone - {f"clips/{second['clips']}"}) | {"clips/.tmp-deadbeef-0badc0de",
                                                                            "work/adapters-feed"}
    assert removal.freed_bytes == expected_bytes - sum(d.bytes for d in plan.remove if d.name == f"clips/{second['clips']}")
    assert not (store.home / "clips" / ".tmp-deadbeef-0badc0de").exists() and not orphan.exists()

    # The champion's whole lineage still resolves, and every kept artifact is intact.
    third = its[3]
    for kind, part in (("adapters", "adapter"), ("latents", "latents"), ("clips", "clips"), ("manifests", "manifest")):
        assert store.verify(kind, third[part]) >= 1
    assert store.exists("datasets", second["dataset"]) and kept_report.is_dir()
    version, path = registry.resolve_adapter(store.home, DOMAIN)
    assert version == "3" and (path / "pytorch_lora_weights.safetensors").is_file()
    assert [d.name for d in retention.plan(store.home, NOW).remove] == [f"clips/{second['clips']}"]  # released now


def test_a_running_iteration_keeps_what_it_made_and_reused(three_iterations):
    import time

    from flywheel.lineage import runs

    store, its = three_iterations
    reused = put(store, "clips", "c" + "77" * 11 + "7")
    time.sleep(1.1)
    run_id = runs.start_iteration_run(store.home, DOMAIN, 4)
    step = runs.open_step_run(store.home, run_id, "training_clips", DOMAIN, None, "clips-step-4")
    step.log_dataset_output("clips", reused, "test", "clips")
    made = put(store, "latents", "l" + "88" * 11 + "8")
    plan = retention.plan(store.home, NOW)
    assert plan.kept[f"clips/{reused}"] == f"used by a running iteration of {DOMAIN}"
    assert plan.kept[f"latents/{made}"] == "finished while an iteration is running"
    assert any("RUNNING" in note for note in plan.notes)
    runs.finish_iteration_run(store.home, step.run_id)
    runs.finish_iteration_run(store.home, run_id)
    assert {f"clips/{reused}", f"latents/{made}"} <= {d.name for d in retention.plan(store.home, NOW).remove}
