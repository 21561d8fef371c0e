"""Refresh: real + accepted synthetic episodes as a new immutable LeRobot v3.0 version that LeRobot loads
offline, with is_synthetic and provenance; no version left behind by a crash; the next iteration can
refresh it again. LeRobot's own tools accept it: the base's feature descriptions carried over exactly (also
those of a dataset converted from v2.1), is_synthetic stats over every frame, merges by LeRobot's
aggregate_datasets / merge_datasets with its lineage and (after add_is_synthetic) with its source."""

import json

import numpy as np
import pytest
from PIL import Image

from flywheel.data.clips import resize_frame
from flywheel.pusht.sample import read_sample_info
from flywheel.errors import DataError
from flywheel.label import load_episodes
from flywheel.label.labeling import nearest_indices, resample_actions
from flywheel.pusht.replay import PushTReplayVerifier
from flywheel.refresh import (RefreshConfig, SyntheticEpisode, add_is_synthetic, load_refreshed, read_provenance,
                              refresh_dataset)
from flywheel.store import hash_tree


def synthetic_from(episode, start: int, seed: int, fps: float = 16, frames: int = 17, size: int = 64):
    """A stand-in for an accepted generated clip: a real window at the generator's fps and size."""
    idx = nearest_indices(len(episode), episode.fps, fps)[start:start + frames]
    video = episode.frames[idx]
    if video.shape[1] != size:
        from PIL import Image

        video = np.stack([np.asarray(Image.fromarray(f).resize((size, size))) for f in video])
    actions = resample_actions(episode.actions, episode.fps, fps)[start:start + frames]
    return SyntheticEpisode(frames=video, actions=actions, fps=fps, provenance=dict(
        clip_id=f"clip-{episode.index}-{seed}", adapter_version="lora-test", seed=seed, prompt="pick the bottle",
        source_episode=episode.index, filter_scores={"motion": 1.5, "psnr_first": 31.0}))


def pusht_synthetic(root, episode, start, seed, fps=10.0, size=96, frames=17):
    """A PushT clip from the episode start, with the block pose the simulator replay gives its actions."""
    clip = synthetic_from(episode, start, seed, fps=fps, size=size, frames=frames)
    source = read_sample_info(root)["episodes"][episode.index]
    clip.features["observation.environment_state"] = PushTReplayVerifier().environment_states(source, clip.actions, fps)
    return clip


def assert_carries_features(root, base_root):
    """Every base feature described exactly as in the base's info.json (video: up to LeRobot's encoder
    settings, which its own feature comparison ignores), plus is_synthetic."""
    from lerobot.datasets.feature_utils import features_equal_for_merge

    base = json.loads((base_root / "meta" / "info.json").read_text())["features"]
    ours = json.loads((root / "meta" / "info.json").read_text())["features"]
    assert list(ours) == [*[k for k in base if k != "is_synthetic"], "is_synthetic"]
    assert ours["is_synthetic"] == {"dtype": "bool", "shape": [1], "names": None}
    assert features_equal_for_merge({k: v for k, v in ours.items() if k in base}, base)
    for key, feature in base.items():
        if feature["dtype"] != "video":
            assert ours[key] == feature, key


def assert_flag_stats_describe_frames(ds):
    """LeRobot's view of the dataset: meta/stats.json and each episode's stats of is_synthetic match the frames."""
    flags = np.asarray(ds.hf_dataset["is_synthetic"], dtype=float).reshape(-1)
    episode = np.asarray(ds.hf_dataset["episode_index"]).reshape(-1)
    stats = ds.meta.stats["is_synthetic"]
    assert int(stats["count"][0]) == len(flags) == ds.num_frames
    assert float(stats["mean"][0]) == pytest.approx(flags.mean())
    assert (float(stats["min"][0]), float(stats["max"][0])) == (flags.min(), flags.max())
    from lerobot.datasets.io_utils import load_nested_dataset

    # LeRobot's episode metadata leaves the per-episode stats out of ds.meta.episodes; read them as it writes them
    episodes = load_nested_dataset(ds.root / "meta" / "episodes")
    assert len(episodes) == ds.num_episodes
    for row in episodes:
        e = row["episode_index"]
        assert row["stats/is_synthetic/count"] == [(episode == e).sum()]
        assert row["stats/is_synthetic/mean"] == [flags[episode == e].mean()]
    return int(flags.sum())


def test_g1_refresh_roundtrips_through_lerobot(robot_datasets, episode_cache, store, tmp_path, capfd):
    from lerobot.datasets.dataset_tools import merge_datasets
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    base = robot_datasets / "g1_pick_bottle"
    base_hash = hash_tree(base)
    eps = load_episodes(base, [0, 1], image_size=64, cache_dir=episode_cache)
    synthetic = [synthetic_from(eps[0], 10, seed=0), synthetic_from(eps[1], 40, seed=1)]
    capfd.readouterr()
    vid, root = refresh_dataset(base, synthetic, store)
    # LeRobot encoded the synthetic episodes with SVT-AV1, which prints its configuration unless told not to.
    assert "Svt[" not in capfd.readouterr().err
    assert root == store.path("datasets", vid) and store.exists("datasets", vid)
    ds = load_refreshed(root)
    assert ds.num_episodes == 14 and ds.meta.fps == 30
    assert set(ds.meta.features) == {*load_refreshed(base).meta.features, "is_synthetic"}
    # Synthetic clips were brought to the dataset's 30 fps and 480x640.
    n_syn = ds.meta.episodes[12]["length"]
    assert n_syn == len(nearest_indices(17, 16, 30))
    last = ds[ds.num_frames - 1]
    assert bool(last["is_synthetic"]) and not bool(ds[0]["is_synthetic"])
    assert tuple(last["observation.images.cam_high"].shape) == (3, 480, 640)
    first_syn = ds[ds.num_frames - 2 * n_syn]
    np.testing.assert_allclose(first_syn["action"].numpy(), synthetic[0].actions[0], atol=1e-5)
    np.testing.assert_allclose(ds[5]["action"].numpy(), load_refreshed(base)[5]["action"].numpy())
    prov = read_provenance(root)
    assert prov["is_synthetic"].sum() == 2 and prov.loc[13, "seed"] == 1 and prov.loc[12, "source_episode"] == "0"
    assert prov.loc[3, "base_episode"] == 3
    # LeRobot's tools accept it: the source's descriptions (per-feature fps included), flag stats over all frames
    assert_carries_features(root, base)
    assert assert_flag_stats_describe_frames(ds) == 2 * n_syn
    # ... and, once the source has the flag (all False), LeRobot merges the two.
    flagged = add_is_synthetic(base, tmp_path / "g1_flagged")
    assert_carries_features(flagged, base)
    source = LeRobotDataset("g1/flagged", root=flagged, video_backend="pyav")
    assert assert_flag_stats_describe_frames(source) == 0
    merged = merge_datasets([source, ds], "g1/merged", tmp_path / "merged")
    assert merged.num_episodes == 12 + 14
    assert assert_flag_stats_describe_frames(merged) == 2 * n_syn
    with pytest.raises(DataError, match="already has an 'is_synthetic' feature"):
        add_is_synthetic(root, tmp_path / "again")
    # Immutable and content-addressed: same inputs, same version, nothing rewritten; base untouched.
    mtime = (root / "provenance.parquet").stat().st_mtime_ns
    assert refresh_dataset(base, synthetic, store) == (vid, root)
    assert (root / "provenance.parquet").stat().st_mtime_ns == mtime
    assert hash_tree(base) == base_hash


def test_converted_v21_versions_merge_with_their_lineage_and_source(robot_datasets, episode_cache, store, tmp_path):
    """A dataset LeRobot's converter made from v2.1 states `fps` on every feature; its versions keep that, so
    LeRobot's aggregate_datasets merges them with each other and with the flagged source. A version without
    synthetic episodes has is_synthetic stats too."""
    from lerobot.datasets.aggregate import aggregate_datasets
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from flywheel.data.lerobot_source import convert_v21_to_v30

    converted = tmp_path / "g1_v21_converted"
    converted.mkdir()
    convert_v21_to_v30(robot_datasets / "g1_pick_bottle_v21", converted)  # LeRobot's converter, on a copy
    assert json.loads((converted / "meta" / "info.json").read_text())["features"]["timestamp"]["fps"] == 30
    v0, root0 = refresh_dataset(converted, [], store)
    assert_carries_features(root0, converted)
    assert assert_flag_stats_describe_frames(load_refreshed(root0)) == 0
    # A clip generated from an aspect-keeping "pad" clip (48x64 picture between bars): its picture, not the
    # bars, becomes the 480x640 camera frame.
    source = LeRobotDataset("g1/converted", root=converted, video_backend="pyav")
    start = int(source.meta.episodes[2]["dataset_from_index"])
    camera = [(source[start + t]["observation.images.cam_high"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
              for t in range(17)]
    padded = SyntheticEpisode(frames=np.stack([resize_frame(f, 64, 64, "pad") for f in camera]),
                              actions=np.stack([source.hf_dataset[start + t]["action"].numpy() for t in range(17)]), fps=30.0,
                              provenance=dict(clip_id="pad-clip", seed=3, source_episode=2))
    v1, root1 = refresh_dataset(root0, [padded], store, clip_resize="pad")
    assert_carries_features(root1, converted)
    written = load_refreshed(root1)
    frame = written[written.num_frames - 1]["observation.images.cam_high"].permute(1, 2, 0).numpy() * 255
    low = np.asarray(Image.fromarray(camera[-1]).resize((64, 48), Image.BILINEAR).resize((640, 480), Image.BILINEAR))
    assert np.abs(frame - low).mean() < 8  # AV1 noise; with the bars stretched in it would be far off
    assert frame[:40].mean() == pytest.approx(low[:40].mean(), abs=8) and low[:40].mean() > 30
    lineage = tmp_path / "lineage"
    aggregate_datasets(["g1/v0", "g1/v1"], "g1/lineage", roots=[root0, root1], aggr_root=lineage)
    merged = LeRobotDataset("g1/lineage", root=lineage, video_backend="pyav")
    assert merged.num_episodes == 3 + 4
    synthetic_frames = assert_flag_stats_describe_frames(merged)
    assert synthetic_frames == written.meta.episodes[3]["length"] == 17
    flagged = add_is_synthetic(converted, tmp_path / "flagged")
    with_source = tmp_path / "with_source"
    aggregate_datasets(["g1/source", "g1/v1"], "g1/with_source", roots=[flagged, root1], aggr_root=with_source)
    assert assert_flag_stats_describe_frames(LeRobotDataset("g1/with_source", root=with_source,
                                                            video_backend="pyav")) == synthetic_frames


def test_next_iteration_refreshes_and_lerobot_aggregate_merges(pusht_root, episode_cache, store, tmp_path, capfd):
    from lerobot.datasets.dataset_tools import merge_datasets

    from flywheel.data.video import write_video

    eps = load_episodes(pusht_root, [0, 1], image_size=96, cache_dir=episode_cache)
    v1, root1 = refresh_dataset(pusht_root, [pusht_synthetic(pusht_root, eps[0], 0, seed=0)], store)
    # LeRobot's encoder hands FFmpeg's logging back to FFmpeg; the next encode in this process (the next
    # iteration's clips) must stay as quiet as before it, not print x264's statistics on stderr.
    capfd.readouterr()
    write_video(tmp_path / "after_refresh.mp4", np.zeros((4, 64, 64, 3), np.uint8), fps=16)
    assert "libx264" not in capfd.readouterr().err
    v2, root2 = refresh_dataset(root1, [pusht_synthetic(pusht_root, eps[1], 0, seed=1, fps=16, size=64)], store)
    assert v1 != v2 and store.exists("datasets", v1)
    ds2 = load_refreshed(root2)
    base_episodes = load_refreshed(pusht_root).num_episodes
    assert ds2.num_episodes == base_episodes + 2
    prov = read_provenance(root2)
    assert prov["is_synthetic"].tolist()[-2:] == [True, True] and prov.iloc[-2]["clip_id"] == "clip-0-0"
    flags = np.array([bool(ds2.hf_dataset[i]["is_synthetic"]) for i in range(ds2.num_frames)])
    assert flags.sum() == sum(ds2.meta.episodes[e]["length"] for e in (base_episodes, base_episodes + 1))
    merged = merge_datasets([ds2, load_refreshed(root1, "flywheel/v1")], "flywheel/merged", tmp_path / "merged")
    assert merged.num_episodes == ds2.num_episodes + base_episodes + 1


def test_ingesting_a_refreshed_version_keeps_real_episode_ids_and_splits(pusht_root, episode_cache, store):
    """The next iteration ingests the refreshed dataset: real episodes keep their ids (so their split, and
    what evaluation holds out, never changes between versions) and generated ones only ever train."""
    from flywheel.data.ingest import IngestConfig, ingest

    config = dict(val_fraction=0.3, test_fraction=0.1)
    base = ingest(IngestConfig(source=str(pusht_root), **config), store).frame
    eps = load_episodes(pusht_root, [0, 1], image_size=96, cache_dir=episode_cache)
    _, root1 = refresh_dataset(pusht_root, [pusht_synthetic(pusht_root, eps[0], 0, seed=0)], store,
                               base_episode_ids=base["episode_id"].tolist())
    v1 = ingest(IngestConfig(source=str(root1), **config), store).frame
    _, root2 = refresh_dataset(root1, [pusht_synthetic(pusht_root, eps[1], 0, seed=1)], store,
                               base_episode_ids=v1["episode_id"].tolist())
    v2 = ingest(IngestConfig(source=str(root2), **config), store).frame

    assert len(v2) == len(base) + 2 and v2["is_synthetic"].tolist() == [False] * len(base) + [True, True]
    real = v2[~v2["is_synthetic"]]
    assert real["episode_id"].tolist() == base["episode_id"].tolist()
    assert real["split"].tolist() == base["split"].tolist() and {"val", "test"} & set(base["split"])
    synthetic = v2[v2["is_synthetic"]]
    assert set(synthetic["split"]) == {"train"}
    assert all(e.startswith("synthetic/") and e.endswith(c) for e, c in zip(synthetic["episode_id"], ["clip-0-0", "clip-1-1"]))
    assert synthetic["episode_id"].iloc[0] == v1["episode_id"].iloc[-1]  # an episode keeps its id once added
    # the simulator's record of the real episodes travels with them (the next replay starts from it)
    assert (root2 / "meta" / "pusht_sample.json").read_bytes() == (pusht_root / "meta" / "pusht_sample.json").read_bytes()


def test_crash_mid_write_leaves_no_version(pusht_root, episode_cache, store):
    eps = load_episodes(pusht_root, [0], image_size=96, cache_dir=episode_cache)

    def crash(event):
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed"):
        refresh_dataset(pusht_root, [pusht_synthetic(pusht_root, eps[0], 0, seed=0)], store, progress=crash)
    assert not any(store.home.joinpath("datasets").iterdir())


def test_bad_synthetic_episode_is_named(pusht_root, episode_cache, store):
    eps = load_episodes(pusht_root, [0], image_size=96, cache_dir=episode_cache)
    bad = pusht_synthetic(pusht_root, eps[0], 0, seed=0)
    bad.actions = bad.actions[:, :1]
    with pytest.raises(DataError, match="clip-0-0.*actions shape"):
        refresh_dataset(pusht_root, [bad], store)
    # PushT has observation.environment_state (block pose), which a generated clip cannot know by itself.
    with pytest.raises(ValueError, match="environment_state.*simulator replay"):
        refresh_dataset(pusht_root, [synthetic_from(eps[0], 0, seed=0, fps=10, size=96)], store)
    with pytest.raises(ValueError, match="observation.state"):
        refresh_dataset(pusht_root, [pusht_synthetic(pusht_root, eps[0], 0, seed=0)], store,
                        RefreshConfig(state_from_actions=False))
    assert not store.home.joinpath("datasets").exists() or not any(store.home.joinpath("datasets").iterdir())


def test_the_version_id_follows_the_data_not_the_last_digit_of_a_filter_score(pusht_root, episode_cache):
    # OpenCV's flow differs in its last bits between runs: a score rounded to 6 digits can still flip.
    from flywheel.refresh.dataset import version_id

    episode = load_episodes(pusht_root, [0], image_size=96, cache_dir=episode_cache)[0]
    clip = synthetic_from(episode, 0, seed=0, size=96)
    rescored = synthetic_from(episode, 0, seed=0, size=96)
    rescored.provenance["filter_scores"] = {"motion": 1.500001, "psnr_first": 31.0}
    relabelled = synthetic_from(episode, 0, seed=0, size=96)
    relabelled.actions = relabelled.actions + 1.0
    config = RefreshConfig()
    assert version_id(pusht_root, [clip], config) == version_id(pusht_root, [rescored], config)
    assert version_id(pusht_root, [clip], config) != version_id(pusht_root, [relabelled], config)
    assert version_id(pusht_root, [clip], config) != version_id(
        pusht_root, [synthetic_from(episode, 0, seed=1, size=96)], config)  # another seed: another record
