"""Two flywheel iterations logged end to end, then lineage read back both ways (real sqlite store)."""

import pytest

from flywheel.lineage import query, registry, runs, tracking
from flywheel.cli import main as cli_main
from flywheel.store import hash_tree
from flywheel_tests.lineage import BASE_MODEL, BASE_REVISION, make_adapter, shared_home

DOMAIN = "g1-pick"
DEMOS, CLIPS = "1" * 64, "2" * 64


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return shared_home(tmp_path_factory)


def _iteration(home, tmp_path, iteration, training_digest, parent_version):
    """One iteration as the Dagster layer would log it; returns (adapter version, synthetic set, dataset version)."""
    code = "code-1"
    parent = runs.start_iteration_run(home, DOMAIN, iteration, f"dg-{iteration}", code)
    with runs.step_run(home, parent, "clips", DOMAIN, f"dg-{iteration}", f"clips/{DOMAIN}/{iteration}", code) as run:
        run.log_dataset_input("demonstrations", DEMOS, "/data/g1_pick_bottle", "demonstrations")
        run.log_dataset_output("clips", CLIPS, "/home/clips/x", "clips")
    with runs.step_run(home, parent, "adapter", DOMAIN, f"dg-{iteration}", f"adapter/{DOMAIN}/{iteration}", code) as run:
        run.log_dataset_input("training_data", training_digest, "/home/latents/x", "dataset_version")
        run.log_step_metrics({"step": s, "loss": 1.0 / (s + 1)} for s in range(4))
        continued = tmp_path / f"adapter{iteration - 1}" if parent_version else None  # training continued it
        adapter = make_adapter(tmp_path / f"adapter{iteration}", seed=100 + iteration, parent=continued)
        version = registry.register_adapter(
            home, DOMAIN, adapter, None, training_digest, iteration, parent_version=parent_version, run_id=run.run_id
        )
    synthetic = f"{iteration}5" * 32
    episodes = [{"episode_id": f"ep{i}", "prompt": f"pick the bottle #{i}", "seed": 1000 * iteration + i} for i in range(3)]
    with runs.step_run(home, parent, "synthetic", DOMAIN, f"dg-{iteration}", f"synthetic/{DOMAIN}/{iteration}", code) as run:
        _, local = registry.resolve_adapter(home, DOMAIN, version)
        assert hash_tree(local) == hash_tree(adapter)
        runs.log_synthetic_set(run, DOMAIN, version, synthetic, f"/home/synthetic/{synthetic[:8]}", episodes)
    refreshed = f"{iteration}9" * 32
    members = [{"episode_index": 24 + i, "synthetic_set_digest": synthetic, "episode_id": f"ep{i}"} for i in range(3)]
    with runs.step_run(home, parent, "refreshed", DOMAIN, f"dg-{iteration}", f"refreshed/{DOMAIN}/{iteration}", code) as run:
        runs.log_refreshed_dataset(run, refreshed, f"/home/datasets/{refreshed[:8]}", members)
    runs.finish_iteration_run(home, parent)
    return version, synthetic, refreshed


def test_two_iterations_round_trip_lineage_both_ways(home, tmp_path, capsys):
    v1, synthetic1, refreshed1 = _iteration(home, tmp_path, 0, DEMOS, None)
    v2, synthetic2, refreshed2 = _iteration(home, tmp_path, 1, refreshed1, v1)  # trained on iteration 0's output
    assert (v1, v2) == ("1", "2")

    # Backward: a synthetic episode in iteration 1's refreshed dataset.
    found = query.lineage_of_synthetic_episode(home, DOMAIN, dataset_digest=refreshed2, episode_index=25)
    assert (found["prompt"], found["seed"], found["episode_id"]) == ("pick the bottle #1", 1001, "ep1")
    assert found["synthetic_set_digest"] == synthetic2
    adapter = found["adapter"]
    assert (adapter["version"], adapter["parent_version"]) == ("2", "1")
    assert (adapter["base_model_id"], adapter["base_revision"]) == (BASE_MODEL, BASE_REVISION)
    assert adapter["training_dataset_digest"] == refreshed1  # the previous iteration's dataset version
    assert found["generation_run_url"].endswith(found["generation_run_id"])
    with pytest.raises(LookupError, match="not a synthetic episode"):
        query.lineage_of_synthetic_episode(home, DOMAIN, dataset_digest=refreshed2, episode_index=3)
    by_set = query.lineage_of_synthetic_episode(home, DOMAIN, synthetic_set_digest=synthetic1, episode_id="ep2")
    assert (by_set["seed"], by_set["adapter"]["version"]) == (2, "1")

    # Forward: what each adapter produced.
    products = query.products_of_adapter(home, DOMAIN, v1)
    assert [s["digest"] for s in products["synthetic_sets"]] == [synthetic1]
    assert [d["digest"] for d in products["dataset_versions"]] == [refreshed1]
    assert [a["version"] for a in query.ancestry_of_adapter(home, DOMAIN, v2)] == ["2", "1"]

    # The MLflow side: generation run lists the adapter's LoggedModel as a model input; steps nest under the iteration.
    client = tracking.client(home)
    generation = client.get_run(found["generation_run_id"])
    model_id = registry.model_id_of(client.get_model_version(f"flywheel-{DOMAIN}", "2"))
    assert [m.model_id for m in generation.inputs.model_inputs] == [model_id]
    iteration_run = generation.data.tags["mlflow.parentRunId"]
    assert client.get_run(iteration_run).data.tags["flywheel.iteration"] == "1"
    assert client.get_run(iteration_run).info.status == "FINISHED"

    # Re-running iteration 1 logs into the same runs and the same adapter version.
    experiment = client.get_experiment_by_name(f"flywheel-{DOMAIN}").experiment_id
    before = len(client.search_runs([experiment], max_results=1000))
    assert _iteration(home, tmp_path, 1, refreshed1, v1) == (v2, synthetic2, refreshed2)
    assert len(client.search_runs([experiment], max_results=1000)) == before
    assert len(client.search_model_versions(f"name = 'flywheel-{DOMAIN}'")) == 2

    # The CLI answers the same questions.
    assert cli_main(["adapters", "lineage", DOMAIN, "--dataset", refreshed2, "--episode", "24", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "pick the bottle #0" in out and "1000" in out and BASE_MODEL in out
    assert cli_main(["adapters", "lineage", DOMAIN, "1", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert synthetic1[:16] in out and refreshed1[:16] in out and synthetic2[:16] not in out
    assert cli_main(["adapters", "show", DOMAIN, "7", "--home", str(home)]) == 2
    links = registry.links_for_version(home, DOMAIN, v2)
    assert links["mlflow_model_version_url"].endswith(f"/#/models/flywheel-{DOMAIN}/versions/2")
