"""The policy_evaluation stage (flywheel.stages.policy_stage): on a tiny budget both arms train the same policy
on the same seeds and steps and are rolled out in the simulator on the same starts; where it does not run it
records why ("not evaluated"), and the build-on decision reads the policy verdict or falls back to the IDM
proxy (flywheel.decisions)."""

import json

import numpy as np
import pandas as pd
import pytest

from flywheel import decisions
from flywheel.pusht import simulator as sim
from flywheel.policy.config import PolicyStageConfig
from flywheel.policy.compare import episode_seeds
from flywheel.pusht.simulator import starts_from_seeds
from flywheel.stages import policy_stage
from flywheel_tests.policy.conftest import TINY_ACT


def tiny_stage_config(**changes) -> PolicyStageConfig:
    return PolicyStageConfig(**{"evaluate": "on", "policy": dict(type="act", steps=3, batch_size=4, overrides=TINY_ACT),
                                "rollout": dict(episodes=3, max_steps=12, batch=3, video_episodes=1),
                                "seeds": [0, 1], **changes})


def refreshed_meta(rotated_root, refreshed_root, synthetic=2) -> dict:
    return {"dataset_root": str(refreshed_root), "base_root": str(rotated_root), "synthetic_episodes": synthetic}


class RecordingEnv:
    """A gym-pusht env that records its resets and counts its steps (the env itself does the work)."""

    def __init__(self, env, log):
        self.env, self.log = env, log

    def reset(self, **kwargs):
        self.log["resets"].append(list(kwargs["options"]["reset_to_state"]))
        return self.env.reset(**kwargs)

    def step(self, action):
        self.log["steps"] += 1
        return self.env.step(action)

    def __getattr__(self, name):
        return getattr(self.env, name)


def test_on_a_tiny_budget_both_arms_share_seeds_starts_and_steps_in_the_simulator(rotated_root, refreshed_root,
                                                                                  tmp_path, monkeypatch):
    log = {"resets": [], "steps": 0}
    real_make_env = sim.make_env
    monkeypatch.setattr(sim, "make_env", lambda *a, **k: RecordingEnv(real_make_env(*a, **k), log))
    config = tiny_stage_config()
    result = policy_stage(tmp_path, refreshed_root, refreshed_meta(rotated_root, refreshed_root), config, "cpu")
    meta = result.metadata
    assert meta["evaluated"] is True and meta["policy_verdict"] in ("better", "non-inferior", "worse", "inconclusive")
    assert meta["policy_evaluator"] == "pusht-sim[rotated]" and meta["policy_seeds"] == 2
    report = json.loads((result.path / "report.json").read_text())
    runs = {(r["arm"], r["seed"]): r for r in report["runs"]}
    assert sorted(runs) == [("real", 0), ("real", 1), ("refreshed", 0), ("refreshed", 1)]
    for seed in (0, 1):  # the same policy, budget and number of episodes in both arms
        real, refreshed = runs["real", seed], runs["refreshed", seed]
        assert real["train"]["steps"] == refreshed["train"]["steps"] == 3
        assert real["train"]["parameters"] == refreshed["train"]["parameters"]
        assert real["episodes"] == refreshed["episodes"] == 3
        assert (real["train"]["num_episodes"], refreshed["train"]["num_episodes"]) == (10, 12)
    episodes = pd.read_csv(result.path / "episodes.csv")
    seeds_list = episode_seeds(config.rollout.start_seed, 3)
    for (arm, seed), rows in episodes.groupby(["arm", "seed"]):
        assert rows.sort_values("episode")["episode_seed"].tolist() == seeds_list, (arm, seed)
    # The rollouts are the simulator's: every policy episode and the idle baseline reset a gym-pusht env to a
    # start of the shared list, and the env took every step the episodes report.
    starts = [list(map(float, s)) for _, s in starts_from_seeds(seeds_list)]
    assert len(log["resets"]) == 2 * 2 * 3 + 3
    assert all(any(np.allclose(r, s) for s in starts) for r in log["resets"])
    assert log["steps"] == episodes["steps"].sum() + 3 * 10, "policy episodes' steps + the idle baseline's 10 each"
    assert episodes["steps"].between(1, 12).all() and episodes["coverage"].between(0, 1).all()
    assert result.preview is not None and result.preview.is_file()
    # materialized again with the same inputs: the same artifact, not a second comparison
    again = policy_stage(tmp_path, refreshed_root, refreshed_meta(rotated_root, refreshed_root), config, "cpu")
    assert again.reused and again.key == result.key


@pytest.mark.parametrize("evaluate, device, why", [
    ("off", "cpu", "policy.evaluate is off"),
    ("auto", "cpu", "opt in with --set policy.evaluate=on (takes ~"),
])
def test_off_or_auto_without_a_gpu_records_not_evaluated(rotated_root, refreshed_root, tmp_path, evaluate, device, why):
    config = tiny_stage_config(evaluate=evaluate)
    result = policy_stage(tmp_path, refreshed_root, refreshed_meta(rotated_root, refreshed_root), config, device)
    assert result.metadata["evaluated"] is False and why in result.metadata["not_evaluated"]
    report = json.loads((result.path / "report.json").read_text())
    assert report["evaluated"] is False and report["reason"] == result.metadata["not_evaluated"]
    assert report["config"]["seeds"] == [0, 1] and report["refreshed_root"] == str(refreshed_root)
    if evaluate == "auto":
        assert "min on CPU" in result.metadata["not_evaluated"] and result.metadata["cpu_minutes_estimate"] > 0
    assert not (result.path / "episodes.csv").exists()


def test_no_simulator_or_nothing_synthetic_is_not_evaluated(robot_datasets, rotated_root, refreshed_root, tmp_path):
    g1 = robot_datasets / "g1_pick_bottle"
    no_sim = policy_stage(tmp_path, refreshed_root, {"dataset_root": str(refreshed_root), "base_root": str(g1),
                                                     "synthetic_episodes": 2}, tiny_stage_config(), "cpu")
    assert not no_sim.metadata["evaluated"] and "no simulator" in no_sim.metadata["not_evaluated"]
    nothing = policy_stage(tmp_path, refreshed_root, refreshed_meta(rotated_root, refreshed_root, synthetic=0),
                           tiny_stage_config(), "cpu")
    assert not nothing.metadata["evaluated"] and "no synthetic episode" in nothing.metadata["not_evaluated"]


def test_build_on_reads_the_policy_verdict_and_falls_back_to_the_idm_proxy():
    gate = decisions.RefreshGate(evidence="policy")
    refreshed = {"loads_with_lerobot": True, "synthetic_episodes": 3, "usefulness_verdict": "better"}
    evaluated = {"evaluated": True, "policy_verdict": "worse", "policy_primary_metric": "coverage",
                 "policy_coverage_real_mean": 0.2, "policy_coverage_refreshed_mean": 0.1, "path": "/r"}
    by_policy = decisions.policy_build_on_decision(refreshed, evaluated, gate, "v")
    assert not by_policy.passed and "evidence: closed-loop policy" in by_policy.outcome
    assert [c.value for c in by_policy.criteria if c.name == "usefulness verdict"] == ["worse"]
    skipped = {"evaluated": False, "not_evaluated": "no simulator for this domain"}
    by_idm = decisions.policy_build_on_decision(refreshed, skipped, gate, "v")
    assert by_idm.passed and "IDM proxy (no policy evaluated: no simulator" in by_idm.outcome
    assert not decisions.policy_build_on_decision({**refreshed, "loads_with_lerobot": False}, evaluated | {
        "policy_verdict": "better"}, gate, "v").passed
    verdict = decisions.policy_verdict_decision(evaluated, gate, "v")
    assert not verdict.passed and verdict.criteria[1].value == 0.2
    assert decisions.policy_verdict_decision(evaluated | {"policy_verdict": "non-inferior"}, gate, "v").passed
    not_run = decisions.policy_verdict_decision(skipped, gate, "v")
    assert not not_run.passed and not_run.outcome == "not evaluated: no simulator for this domain"
