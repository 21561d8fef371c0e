"""Stable splits: an episode's split follows what it recorded, never a folder, domain or file name."""

import shutil

import pandas as pd

from flywheel.data.ingest import IngestConfig, ingest
from flywheel.data.splits import assign_splits
from flywheel_tests.data.test_ingest import linked_copy

SAMPLE = "pusht_rotated"
# Large enough that every split is populated in the 10-episode sample.
FRACTIONS = dict(val_fraction=0.4, test_fraction=0.1)


def splits_by_index(manifest) -> dict[int, str]:
    return dict(zip(manifest.frame["episode_index"], manifest.frame["split"]))


def test_renamed_folder_domain_and_files_keep_every_split(robot_datasets, store, tmp_path):
    original = ingest(IngestConfig(source=str(robot_datasets / SAMPLE), **FRACTIONS), store)
    expected = splits_by_index(original)
    assert set(expected.values()) == {"train", "val", "test"}  # every split is populated, so a move would show

    # The folder renamed (as a domain's inbox folder is named after the domain), and the repo id / domain name
    # that names the episodes: other episode ids, the same splits.
    renamed = ingest(IngestConfig(source=str(linked_copy(robot_datasets / SAMPLE, tmp_path / "cell-b")), **FRACTIONS),
                     store)
    other_domain = ingest(IngestConfig(source=str(robot_datasets / SAMPLE), repo_id="lab/cell-c", **FRACTIONS), store)
    assert renamed.frame["episode_id"].iloc[0] == "cell-b/000000"
    assert other_domain.frame["episode_id"].iloc[0] == "lab/cell-c/000000"
    assert splits_by_index(renamed) == expected and splits_by_index(other_domain) == expected
    assert renamed.frame["split_key"].tolist() == original.frame["split_key"].tolist()


def test_raw_videos_keep_their_split_when_renamed(robot_datasets, store, tmp_path):
    from flywheel_tests.data.test_ingest import cut_clips, make_raw_folder

    clips = tmp_path / "clips"
    clips.mkdir()
    cut_clips(robot_datasets, clips)
    first = make_raw_folder(clips, tmp_path / "takes")
    config = dict(val_fraction=0.4, test_fraction=0.3)
    before = ingest(IngestConfig(source=str(first), **config), store)
    second = tmp_path / "renamed_takes"
    shutil.copytree(first, second)
    for folder, suffix in (("videos", ".mp4"), ("metas", ".txt")):
        for path in sorted((second / folder).glob(f"*{suffix}")):
            path.rename(path.with_name(f"robot_{path.stem}{suffix}"))
    after = ingest(IngestConfig(source=str(second), **config), store)
    assert after.frame["episode_id"].iloc[0] == "renamed_takes/robot_pick_00"
    assert len(set(before.frame["split"])) > 1  # something is held out, so a move would show
    assert after.frame["split"].tolist() == before.frame["split"].tolist()  # same order: the names sort alike


def test_a_refreshed_version_keeps_its_real_episodes_splits(robot_datasets, store):
    """Refresh rewrites the data (one more column) and copies the videos: the real episodes' splits stay."""
    from flywheel.refresh.dataset import refresh_dataset

    base = ingest(IngestConfig(source=str(robot_datasets / SAMPLE), **FRACTIONS), store)
    _, root = refresh_dataset(robot_datasets / SAMPLE, [], store, base_episode_ids=base.frame["episode_id"].tolist())
    refreshed = ingest(IngestConfig(source=str(root), **FRACTIONS), store)
    assert refreshed.frame["dataset_root"].iloc[0] == str(root)
    assert refreshed.frame["episode_id"].tolist() == base.frame["episode_id"].tolist()
    assert refreshed.frame["split"].tolist() == base.frame["split"].tolist()
    assert refreshed.frame["split_key"].tolist() == base.frame["split_key"].tolist()

    # A split key recorded in the provenance wins over the content (for a version whose frames were re-encoded).
    provenance = pd.read_parquet(root / "provenance.parquet")
    moved = root.parent / "with-recorded-keys"
    shutil.copytree(root, moved)
    recorded = provenance.assign(split_key=[f"recorded-{i}" for i in range(len(provenance))])
    recorded.to_parquet(moved / "provenance.parquet", index=False)
    again = ingest(IngestConfig(source=str(moved), **FRACTIONS, allow_no_holdout=True), store)
    assert again.frame["split_key"].tolist() == recorded["split_key"].tolist()
    assert again.frame["split"].tolist() == assign_splits(recorded["split_key"].tolist(), **FRACTIONS)
