"""The embedded PushT sample dataset: the committed copy loads offline and is sane; regenerating is
deterministic; the recorded actions replay in the simulator; the recoloured variant looks different."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydantic import ValidationError

from flywheel.pusht.sample import (
    ACTION_HIGH,
    ACTION_LOW,
    FPS,
    PREVIEW_EPISODES,
    PREVIEW_FILE,
    PREVIEW_FRAMES,
    RENDER_PALETTE,
    VARIANTS,
    PushTSampleConfig,
    episode_reset_seed,
    make_env,
    read_sample_info,
    sample_initial_state,
    write_pusht_dataset,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = REPO_ROOT / "datasets" / "pusht"
RECOLORED_ROOT = REPO_ROOT / "datasets" / "pusht_recolored"
FEATURE_SHAPES = {
    "observation.image": (3, 96, 96),  # as LeRobot returns it: float CHW
    "observation.state": (2,),
    "action": (2,),
    "observation.environment_state": (5,),
}


def load(root: Path, repo_id: str):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    if not (root / "meta" / "info.json").is_file():
        pytest.fail(f"{root} is missing; regenerate it (see datasets/README.md)")
    return LeRobotDataset(repo_id, root=root, video_backend="pyav")


def frames_table(root: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted((root / "data").rglob("*.parquet"))], ignore_index=True)


def column(table: pd.DataFrame, name: str) -> np.ndarray:
    return np.stack(table[name].to_numpy()).astype(np.float32)


@pytest.fixture(scope="module")
def default_ds():
    return load(DEFAULT_ROOT, "flywheel/pusht")


@pytest.fixture(scope="module")
def recolored_ds():
    return load(RECOLORED_ROOT, "flywheel/pusht_recolored")


def test_committed_dataset_has_documented_shape(default_ds, recolored_ds):
    for ds, root, (lo, hi) in ((default_ds, DEFAULT_ROOT, (16, 24)), (recolored_ds, RECOLORED_ROOT, (8, 12))):
        info = read_sample_info(root)
        assert ds.fps == FPS == 10
        assert json.loads((root / "meta" / "info.json").read_text())["codebase_version"] == "v3.0"
        assert lo <= ds.num_episodes <= hi and ds.num_episodes == len(info["episodes"])
        assert ds.num_frames == sum(e["num_frames"] for e in info["episodes"])
        assert ds.meta.video_keys == ["observation.image"]
        for key, shape in FEATURE_SHAPES.items():
            assert tuple(ds[0][key].shape) == shape, key
        assert ds[0]["task"] == VARIANTS[info["config"]["variant"]].task
        with Image.open(root / PREVIEW_FILE) as preview:
            assert preview.size == (PREVIEW_FRAMES * 98 + 2, PREVIEW_EPISODES * 98 + 2)
    size = sum(p.stat().st_size for p in (REPO_ROOT / "datasets").glob("pusht*/**/*") if p.is_file())
    assert size < 5e6, f"the PushT samples are {size / 1e6:.1f} MB; keep them under 5 MB"
    everything = sum(p.stat().st_size for p in (REPO_ROOT / "datasets").rglob("*") if p.is_file())
    assert everything < 10e6, f"datasets/ is {everything / 1e6:.1f} MB (G1 sample included); keep it under 10 MB"


def test_frames_decode_and_move(default_ds):
    episode = default_ds.meta.episodes[3]
    start, end = episode["dataset_from_index"], episode["dataset_to_index"]
    first, last = default_ds[start]["observation.image"], default_ds[end - 1]["observation.image"]
    assert first.std() > 0.05, "a frame is (nearly) constant"
    assert (first - last).abs().mean() > 0.005, "the first and last frames of an episode are the same"
    timestamps = frames_table(DEFAULT_ROOT).query("episode_index == 3")["timestamp"].to_numpy()
    np.testing.assert_allclose(np.diff(timestamps), 1 / FPS, atol=1e-4)


def test_actions_are_in_bounds_purposeful_and_solve_most_episodes():
    table = frames_table(DEFAULT_ROOT)
    actions, env_state = column(table, "action"), column(table, "observation.environment_state")
    assert actions.min() >= ACTION_LOW and actions.max() <= ACTION_HIGH
    assert (actions.std(axis=0) > 30).all(), "actions barely vary"
    # Purposeful, not jitter: consecutive commanded moves mostly keep their heading (uniform random
    # targets keep it ~10% of the time) and are modest in size.
    episode = table["episode_index"].to_numpy()
    steps = np.diff(actions, axis=0)
    lengths = np.linalg.norm(steps, axis=1)
    moving = (episode[2:] == episode[:-2]) & (lengths[1:] > 2) & (lengths[:-1] > 2)
    cosine = (steps[1:] * steps[:-1]).sum(axis=1) / (lengths[1:] * lengths[:-1] + 1e-9)
    assert moving.sum() > 500 and (cosine[moving] > 0.7).mean() > 0.7
    assert np.median(lengths) < 30
    np.testing.assert_allclose(column(table, "observation.state"), env_state[:, :2])
    assert np.ptp(env_state[:, 2:4], axis=0).min() > 50, "the block never moves"
    episodes = read_sample_info(DEFAULT_ROOT)["episodes"]
    assert sum(e["success"] for e in episodes) >= len(episodes) // 2
    assert all(e["max_coverage"] > 0.5 for e in episodes)


def test_recorded_actions_replay_in_the_simulator():
    info = read_sample_info(DEFAULT_ROOT)
    episode = info["episodes"][0]
    table = frames_table(DEFAULT_ROOT).query("episode_index == 0")
    actions, recorded = column(table, "action"), column(table, "observation.environment_state")
    env = make_env(32)
    try:
        assert episode["reset_seed"] == episode_reset_seed(info["config"]["seed"], 0)
        assert episode["initial_state"] == sample_initial_state(episode["reset_seed"])
        _, state = env.reset(options={"reset_to_state": episode["initial_state"]})
        replayed = []
        for action in actions[:40]:
            replayed.append([*state["pos_agent"], *state["block_pose"][:2], state["block_pose"][2] % (2 * np.pi)])
            _, _, _, _, state = env.step(action)
    finally:
        env.close()
    np.testing.assert_allclose(np.array(replayed, np.float32), recorded[:40], atol=1e-3)


def test_regenerating_is_deterministic_and_refuses_to_overwrite(tmp_path):
    config = PushTSampleConfig(episodes=2, seed=0, max_steps=12)
    out = write_pusht_dataset(tmp_path / "pusht", config, progress=lambda event: None)
    first = frames_table(out)
    assert len(first) == 24 and sorted(first["episode_index"].unique()) == [0, 1]

    with pytest.raises(FileExistsError, match="pusht.*--force"):
        write_pusht_dataset(out, config, progress=lambda event: None)
    write_pusht_dataset(out, config, force=True, progress=lambda event: None)
    second = frames_table(out)
    pd.testing.assert_frame_equal(first, second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pusht"], "temp dirs left behind"

    # The committed dataset came from the same seed: its episodes start with these very frames.
    committed = frames_table(DEFAULT_ROOT)
    for episode in (0, 1):
        head = committed[committed["episode_index"] == episode].head(12)
        mine = first[first["episode_index"] == episode]
        for name in ("action", "observation.state", "observation.environment_state"):
            np.testing.assert_array_equal(column(head, name), column(mine, name))


def test_failed_generation_leaves_nothing(tmp_path):
    def fail(event):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_pusht_dataset(tmp_path / "pusht", PushTSampleConfig(episodes=1, max_steps=3), progress=fail)
    assert list(tmp_path.iterdir()) == []


def test_recolored_variant_looks_different(default_ds, recolored_ds):
    default = np.stack([default_ds[i]["observation.image"].numpy() for i in (0, 50, 100)])
    recolored = np.stack([recolored_ds[i]["observation.image"].numpy() for i in (0, 50, 100)])
    # Default: white floor; recoloured: dark floor, and a different hue balance.
    assert default.mean() > 0.8 and recolored.mean() < 0.35
    assert np.abs(default.mean(axis=(0, 2, 3)) - recolored.mean(axis=(0, 2, 3))).max() > 0.4


def test_colour_map_is_exact_on_the_render_palette():
    variant = VARIANTS["recolored"]
    swatch = np.array([RENDER_PALETTE], np.uint8)  # [1, 4, 3]
    np.testing.assert_array_equal(variant.colour(swatch)[0], np.array(variant.palette, np.uint8))
    assert VARIANTS["default"].colour(swatch) is swatch


def test_config_rejects_bad_fields():
    with pytest.raises(ValidationError, match="episodes"):
        PushTSampleConfig(episodes=0)
    with pytest.raises(ValidationError, match="variant"):
        PushTSampleConfig(variant="sepia")
    with pytest.raises(ValidationError, match="extra"):
        PushTSampleConfig(fps=30)


def test_rotated_variant_is_the_same_world_seen_a_quarter_turn_round(recolored_ds):
    """datasets/pusht_rotated: the episodes of pusht_recolored (same seed), only the camera differs."""
    rotated_ds = load(REPO_ROOT / "datasets" / "pusht_rotated", "flywheel/pusht_rotated")
    assert rotated_ds.meta.total_episodes == recolored_ds.meta.total_episodes == 10
    for i in (0, 57, 300):
        a, b = rotated_ds[i], recolored_ds[i]
        assert np.array_equal(a["observation.state"].numpy(), b["observation.state"].numpy())
        assert np.array_equal(a["action"].numpy(), b["action"].numpy())
    frame = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert np.array_equal(VARIANTS["rotated"].show(frame), np.rot90(frame))
    assert VARIANTS["default"].show(frame) is frame
