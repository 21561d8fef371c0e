"""Both arms on one budget: the same LeRobot policy trained on each version with the same seeds and steps,
rolled out in the simulator on the same starts; and a user's own evaluator feeding the same report."""

import json

import numpy as np
import pandas as pd
import pytest

from flywheel.errors import ConfigError, DataError
from flywheel.policy import VERDICTS, PolicyEvalConfig, VerdictConfig, can_evaluate, compare_arms, load_evaluator
from flywheel.policy.evaluators import EpisodeResult
from flywheel.pusht.evaluator import ScriptedPushTEvaluator
from flywheel.pusht.simulator import PushTSimulator


def test_both_arms_train_the_same_policy_on_the_same_budget_and_starts(rotated_root, refreshed_root, tiny_config,
                                                                        tmp_path):
    progress = []
    result = compare_arms(rotated_root, refreshed_root, tiny_config, out_dir=tmp_path, progress=progress.append,
                          save_policies=True)
    runs = {(r["arm"], r["seed"]): r for r in result.runs}
    assert sorted(runs) == [("real", 0), ("real", 1), ("refreshed", 0), ("refreshed", 1)]
    for seed in (0, 1):
        real, refreshed = runs["real", seed]["train"], runs["refreshed", seed]["train"]
        assert real["steps"] == refreshed["steps"] == 3 and real["batch_size"] == refreshed["batch_size"] == 4
        assert real["parameters"] == refreshed["parameters"], "the same policy shape"
        assert (real["num_episodes"], refreshed["num_episodes"]) == (10, 12), "refreshed = real + 2 synthetic"
        assert len(result.runs[0]["train"]) and runs["real", seed]["episodes"] == runs["refreshed", seed]["episodes"] == 3
    # Every (seed, episode) has one row per arm, on the same start.
    ep = result.episodes
    by_arm = {arm: ep[ep.arm == arm].set_index(["seed", "episode"]).sort_index() for arm in ("real", "refreshed")}
    assert by_arm["real"].index.equals(by_arm["refreshed"].index) and len(by_arm["real"]) == 6
    assert (by_arm["real"]["episode_seed"] == by_arm["refreshed"]["episode_seed"]).all()
    assert set(by_arm["real"].loc[0, "episode_seed"]) == set(by_arm["real"].loc[1, "episode_seed"])
    # The rollouts are the simulator's: at most max_steps actions, coverage in [0, 1] from the env.
    assert ep["steps"].between(1, 12).all() and ep["coverage"].between(0, 1).all()
    assert (ep["steps"] == 12).sum() + (ep["success"] == 1).sum() == len(ep), "an episode ends by time or success"
    assert ep["block_moved"].isin([0.0, 1.0]).all()

    assert result.verdict in VERDICTS and result.primary == "coverage"
    cov = result.metric("coverage")
    assert cov.real.per_seed == pytest.approx(by_arm["real"].groupby("seed")["coverage"].mean().tolist())
    assert cov.difference.mean == pytest.approx(cov.refreshed.mean - cov.real.mean)
    report = json.loads(result.paths["report"].read_text())
    assert report["datasets"]["refreshed"]["synthetic_episodes"] == 2 and report["datasets"]["real"]["synthetic_episodes"] == 0
    assert report["verdict"] == result.verdict and report["evaluator"] == "pusht-sim[rotated]"
    assert set(report["baseline"]) == {"success", "coverage", "max_coverage", "block_moved"}
    assert report["baseline"]["block_moved"] == 0.0 and cov.baseline == report["baseline"]["coverage"]
    assert report["episode_seeds"] == by_arm["real"].loc[0, "episode_seed"].tolist()
    assert pd.read_csv(result.paths["episodes"]).shape[0] == 12
    assert result.paths["contact_sheet"].stat().st_size > 0 and result.paths["video"].stat().st_size > 0
    assert (tmp_path / "policies" / "refreshed-seed1" / "model.safetensors").is_file()
    assert {e["stage"] for e in progress} == {"policy_train", "policy_eval"}
    flat = result.flat_metrics()
    assert flat["coverage/real/mean"] == cov.real.mean and flat["verdict_code"] == VERDICTS.index(result.verdict)


def test_the_saved_policy_is_a_lerobot_policy(tmp_path, rotated_root, tiny_config):
    """What a real-robot evaluator receives (checkpoint_dir) loads back with LeRobot's own from_pretrained and
    acts the same as the policy that was trained."""
    import torch
    from lerobot.policies.act.modeling_act import ACTPolicy

    from flywheel.policy.training import train_policy

    trained = train_policy(rotated_root, tiny_config.policy, seed=0)
    loaded = ACTPolicy.from_pretrained(trained.save(tmp_path / "policy"))
    loaded.eval()
    batch = trained.preprocessor({"observation.image": torch.rand(1, 3, 96, 96),
                                  "observation.state": torch.tensor([[200.0, 300.0]])})
    with torch.inference_mode():
        trained.policy.reset(), loaded.reset()
        assert torch.allclose(trained.policy.select_action(batch), loaded.select_action(batch))


class BlockTravel:
    """A user's evaluation with its own metric: the scripted expert in the simulator, scored by how far it moved
    the block (px) besides the final coverage."""

    name = "user-eval"
    needs_policy = False

    def __init__(self, simulator):
        self.inner = ScriptedPushTEvaluator(simulator, max_steps=40, batch=4)

    def evaluate(self, arm, episode_seeds):
        return [EpisodeResult(dict(coverage=r.metrics["coverage"], block_travel=r.info["block_path"]), r.frames)
                for r in self.inner.evaluate(arm, episode_seeds)]


def test_a_user_evaluator_feeds_the_report_and_verdict(rotated_root, refreshed_root, tmp_path):
    """The hook: an evaluator named by import path (no policy trained), its metrics per episode go through the
    same statistics; both arms face the same starts, so the scripted expert scores the same on both."""
    config = PolicyEvalConfig(evaluator="flywheel.pusht.evaluator:scripted_pusht",
                              rollout=dict(episodes=4, max_steps=40, video_episodes=1), seeds=[0, 1])
    result = compare_arms(rotated_root, refreshed_root, config, out_dir=tmp_path)
    assert result.report["evaluator"] == "scripted-pusht[rotated]"
    assert all("train" not in r for r in result.runs), "this evaluator needs no policy: none was trained"
    cov = result.metric("coverage")
    assert cov.real.per_seed == cov.refreshed.per_seed and np.ptp(result.episodes["coverage"]) > 0
    assert cov.difference.low == cov.difference.high == 0.0 and result.verdict == "non-inferior"
    assert result.metric("success").verdict in VERDICTS and result.paths["contact_sheet"].is_file()

    custom = compare_arms(rotated_root, refreshed_root,
                          config.model_copy(update=dict(verdict=VerdictConfig(primary="block_travel", margin=5.0))),
                          evaluator=BlockTravel(PushTSimulator.from_dataset(rotated_root)))
    assert set(custom.metrics) == {"coverage", "block_travel"} and custom.primary == "block_travel"
    assert custom.metric("block_travel").real.mean > 10.0, "the expert moved the block"
    assert custom.report["evaluator"] == "user-eval" and custom.verdict == "non-inferior"
    assert custom.episodes["coverage"].tolist() == result.episodes["coverage"].tolist()


def test_evaluator_specs_and_metrics_are_checked(rotated_root, refreshed_root, robot_datasets):
    config = PolicyEvalConfig()
    assert can_evaluate(refreshed_root) and not can_evaluate(robot_datasets / "g1_pick_bottle")
    assert can_evaluate(robot_datasets / "g1_pick_bottle", PolicyEvalConfig(evaluator="my_lab.robot:evaluator"))
    with pytest.raises(ConfigError, match="no entry point of that name"):
        load_evaluator("no-such-evaluator", config, rotated_root)
    with pytest.raises(ConfigError, match="cannot import"):
        load_evaluator("flywheel.policy.nothing:here", config, rotated_root)
    with pytest.raises(ConfigError, match="failed"):
        load_evaluator("flywheel.policy.config:PolicyEvalConfig", config, rotated_root)
    with pytest.raises(ConfigError, match="lacks name"):
        load_evaluator("builtins:dict", config, rotated_root)
    bad = config.model_copy(update=dict(evaluator="flywheel.pusht.evaluator:scripted_pusht", seeds=[0],
                                        rollout=config.rollout.model_copy(update=dict(episodes=1, max_steps=2)),
                                        verdict=VerdictConfig(primary="reward")))
    with pytest.raises(DataError, match="verdict.primary 'reward'"):
        compare_arms(rotated_root, refreshed_root, bad)
    with pytest.raises(DataError, match="not a LeRobot dataset"):
        compare_arms(rotated_root, rotated_root / "meta", bad)
