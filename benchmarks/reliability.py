"""Reliability suite: bad inputs through the real CLI, SIGKILL at random moments, concurrent processes.

    python benchmarks/reliability.py                       # everything; writes benchmarks/results/reliability.{json,md}
    python benchmarks/reliability.py --part bad-inputs     # one part (bad-inputs | kill | concurrency)
    python benchmarks/reliability.py --part bad-inputs --only 'data-*' --subprocess   # every case as a subprocess

1. Bad inputs (issue 18, item 9): each case builds one bad input (a damaged copy of an embedded dataset, a bad
   config file or --set, a bad argument, domain name or adapter) and runs the `flywheel` command that must
   refuse it. A case passes when the command exits with code 2, prints no traceback, its message names the
   file / field / argument (`names`: regular expressions the message must match), and nothing is left behind
   in the flywheel home: no `.tmp-*`, no partial artifact (a folder without `.complete`), no scratch dir, no
   RUNNING MLflow run, no unfinished Dagster run, no new artifact the refusal should have prevented, and the
   input itself unchanged. Cases run through `flywheel.cli.main` in one process (a CLI process costs ~30 s of
   imports under load), every output captured at the file-descriptor level; those marked `subprocess` (and all
   of them with --subprocess) run as `python -m flywheel.cli`, the command a user types.
2. Kill trials: `flywheel train` and `flywheel refresh --only` (small settings) SIGKILLed after a random delay,
   then run again to the end: the result must equal, tensor for tensor, an uninterrupted run's; the versions
   registered before stay intact (files verified, registry unchanged); no `.tmp-*`, RUNNING run or leftover
   scratch dir.
3. Concurrency: 4 `flywheel train` processes at once on 2 domains, a same-key pair on each: every one exits 0,
   one adapter artifact per key, one registry version per adapter.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import hashlib
import io
import json
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO / "datasets"
RESULTS = REPO / "benchmarks" / "results"
G1 = DATASETS / "g1_pick_bottle"
G1_V21 = DATASETS / "g1_pick_bottle_v21"
PUSHT = DATASETS / "pusht_rotated"
CAMERA = "observation.images.cam_high"
G1_DATA = "data/chunk-000/file-000.parquet"
G1_EPISODES = "meta/episodes/chunk-000/file-000.parquet"
G1_VIDEO_0 = f"videos/{CAMERA}/chunk-000/file-000.mp4"
G1_VIDEO_1 = f"videos/{CAMERA}/chunk-000/file-001.mp4"
V21_VIDEO_1 = f"videos/chunk-000/{CAMERA}/episode_000001.mp4"
V21_DATA_1 = "data/chunk-000/episode_000001.parquet"
PUSHT_VIDEO = "videos/observation.image/chunk-000/file-000.mp4"
PUSHT_DATA = "data/chunk-000/file-000.parquet"
PUSHT_EPISODES = "meta/episodes/chunk-000/file-000.parquet"
INFO = "meta/info.json"
# A Python traceback, or the stack trace of a serialized Dagster error (what the CLI prints for a step's bug).
TRACEBACK = re.compile(r'Traceback \(most recent call last\)|^\s*File "[^"]+", line \d+', re.MULTILINE)
# Dagster run statuses that mean "not finished" (a run killed mid-way stays in one of them).
DAGSTER_UNFINISHED = ("QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING", "MANAGED")
# A small training for the adapter fixture, the kill trials and the concurrent processes: ~100 tiny-pusht steps.
SMALL_TRAIN = ["train.steps=60", "train.checkpoint_every=10", "train.rank=4", "train.alpha=4"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the same kernels in every process: bit-identical comparisons


# ================================================================================================ the home


@dataclasses.dataclass
class HomeState:
    """What a flywheel home holds that a refused or killed command must not leave behind."""

    tmp: list[str]                # `.tmp-*` dirs and files anywhere in the home
    partial: list[str]            # artifact folders without .complete
    work: list[str]               # scratch dirs under work/
    running_mlflow: list[str]     # MLflow runs still RUNNING
    unfinished_dagster: list[str]  # Dagster runs not in a final state
    artifacts: set[str]           # <kind>/<key> of the finished artifacts

    def leftovers(self) -> list[str]:
        return ([f"tmp {p}" for p in self.tmp] + [f"partial artifact {p}" for p in self.partial]
                + [f"scratch dir {p}" for p in self.work] + [f"RUNNING MLflow run {r}" for r in self.running_mlflow]
                + [f"unfinished Dagster run {r}" for r in self.unfinished_dagster])


def home_state(home: Path) -> HomeState:
    tmp, partial, work, artifacts = [], [], [], set()
    if home.is_dir():
        for path in home.rglob("*"):
            if ".tmp-" in path.name or path.name.startswith(".tmp"):
                tmp.append(str(path.relative_to(home)))
        for kind in sorted(p for p in home.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if kind.name in ("mlflow", "dagster", "inbox", "reports", "domains", "logs"):
                continue
            if kind.name == "work":
                work += [f"work/{p.name}" for p in kind.iterdir()]
                continue
            for entry in kind.iterdir():
                if entry.name.startswith("."):
                    continue
                if (entry / ".complete").is_file():
                    artifacts.add(f"{kind.name}/{entry.name}")
                else:
                    partial.append(f"{kind.name}/{entry.name}")
    return HomeState(sorted(tmp), sorted(partial), sorted(work), _mlflow_running(home), _dagster_unfinished(home),
                     artifacts)


def _query(db: Path, sql: str) -> list[tuple]:
    if not db.is_file():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError:  # the table is not there (the store was never used)
            return []


def _mlflow_running(home: Path) -> list[str]:
    return [f"{name} ({uuid[:8]})" for uuid, name in
            _query(home / "mlflow" / "mlflow.db", "select run_uuid, name from runs where status = 'RUNNING'")]


def _dagster_unfinished(home: Path) -> list[str]:
    statuses = ",".join(f"'{s}'" for s in DAGSTER_UNFINISHED)
    return [f"{run_id[:8]} {status}" for run_id, status in
            _query(home / "dagster" / "history" / "runs.db", f"select run_id, status from runs where status in ({statuses})")]


def registry_versions(home: Path) -> list[tuple[str, int, str]]:
    """(registered model, version, source) of every registered adapter version."""
    return sorted(_query(home / "mlflow" / "mlflow.db", "select name, version, source from model_versions"))


def registry_aliases(home: Path) -> list[tuple]:
    return sorted(_query(home / "mlflow" / "mlflow.db", "select name, alias, version from registered_model_aliases"))


def tree_digest(root: Path) -> str:
    """Content hash of a folder (links followed: the files a dataset copy shows), plus its link targets."""
    h = hashlib.sha256()
    if not root.exists():
        return "absent"
    for path in sorted(root.rglob("*")):
        h.update(path.relative_to(root).as_posix().encode())
        if path.is_symlink():
            h.update(os.readlink(path).encode())
        if path.is_file():
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


# ================================================================================================ inputs


def linked_copy(source: Path, destination: Path, copied: tuple[str, ...] = ()) -> Path:
    """A dataset copy whose files link to `source`, except `copied` (real, writable copies a case damages)."""
    for path in sorted(source.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(source).as_posix()
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if relative in copied:
            shutil.copyfile(path, target)
        else:
            os.symlink(path, target)
    return destination


def edit_json(path: Path, change: Callable[[dict], None] | None = None, **values) -> None:
    data = json.loads(path.read_text())
    data.update(values)
    if change:
        change(data)
    path.write_text(json.dumps(data, indent=1))


def edit_table(path: Path, change: Callable) -> None:
    import pandas as pd

    table = pd.read_parquet(path)
    result = change(table)
    (table if result is None else result).to_parquet(path, index=False)


def flip_bytes(path: Path, at: float = 0.5, count: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    path.write_bytes(bytes(data))


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def set_rows(column: str, value, rows: Callable | None = None):
    """A table edit putting `value` into `column` (every row, or where `rows(table)` is true)."""
    import numpy as np

    def change(table):
        chosen = rows(table) if rows else np.ones(len(table), bool)
        table[column] = [np.full_like(np.asarray(v), value) if pick else v for v, pick in zip(table[column], chosen)]
    return change


def keep_episodes(source: Path, root: Path, keep: list[int], data: str, episodes: str) -> Path:
    """A linked copy cut down to some of its episodes (their rows and metadata; the video stays whole)."""
    linked_copy(source, root, copied=(data, episodes, INFO))
    edit_table(root / data, lambda t: t[t["episode_index"].isin(keep)])
    edit_table(root / episodes, lambda t: t[t["episode_index"].isin(keep)])
    import pandas as pd

    edit_json(root / INFO, total_episodes=len(keep), total_frames=len(pd.read_parquet(root / data)))
    return root


def raw_folder(root: Path, count: int = 3) -> Path:
    """A raw video folder (diffusers recipe layout): short H.264 clips cut from the real G1 video + captions."""
    import numpy as np

    from flywheel.data.video import read_frames, write_video

    (root / "videos").mkdir(parents=True)
    (root / "metas").mkdir()
    for i in range(count):
        frames = read_frames(G1 / G1_VIDEO_0, 4.0 * i, 4.0 * i + 0.5)[:, ::4, ::4]
        write_video(root / "videos" / f"pick_{i:02d}.mp4", np.ascontiguousarray(frames), fps=30)
        (root / "metas" / f"pick_{i:02d}.txt").write_text("The robot picks up the bottle.")
    return root


# ================================================================================================ cases


@dataclasses.dataclass
class Ctx:
    """Where a case builds its inputs: `work` (its own folder), `home` (its flywheel home), `fixtures`."""

    work: Path
    home: Path
    fixtures: Fixtures
    values: dict = dataclasses.field(default_factory=dict)  # placeholders for the argv: {home}, {work}, {data}, ...


@dataclasses.dataclass
class Case:
    name: str
    category: str                      # data | config | cli | domain | adapter
    what: str                          # the bad input, in words
    argv: list[str]                    # after `flywheel`; {home}, {work}, {data} and setup's values are filled in
    names: list[str]                   # regexes the message must match (the file / field / argument)
    setup: Callable[[Ctx], None] | None = None
    home: str = "shared"               # shared: one home per category; fresh: an empty one; adapter: the adapter home
    may_create: tuple[str, ...] = ()   # artifact kinds the refused command may leave (finished, reusable)
    subprocess: bool = False           # also run as `python -m flywheel.cli` by default
    restore: Callable[[Ctx], None] | None = None  # undo what setup did to a shared home


def data_case(name: str, what: str, source: Path, names: list[str], damage: Callable[[Path], None],
              copied: tuple[str, ...] = (), command: str = "ingest", extra: list[str] = (), **kw) -> Case:
    """A damaged linked copy of an embedded dataset, ingested by `flywheel <command>`."""
    def setup(ctx: Ctx) -> None:
        root = linked_copy(source, ctx.work / source.name, copied)
        damage(root)
        ctx.values["data"] = str(root)
    return Case(name, "data", what, [command, "--home", "{home}", "--domain", "rel", "--set", "ingest.source={data}",
                                     *extra], names, setup, **kw)


def built_case(name: str, what: str, build: Callable[[Path], Path], names: list[str], extra: list[str] = (),
               **kw) -> Case:
    def setup(ctx: Ctx) -> None:
        ctx.values["data"] = str(build(ctx.work))
    return Case(name, "data", what, ["ingest", "--home", "{home}", "--domain", "rel", "--set",
                                     "ingest.source={data}", *extra], names, setup, **kw)


def _unlink(relative: str) -> Callable[[Path], None]:
    return lambda root: (root / relative).unlink()


def _write(relative: str, data: bytes | str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        (root / relative).unlink(missing_ok=True)
        (root / relative).write_bytes(data if isinstance(data, bytes) else data.encode())
    return damage


def _truncate(relative: str, fraction: float) -> Callable[[Path], None]:
    return lambda root: os.truncate(root / relative, int((root / relative).stat().st_size * fraction))


def _info(**values) -> Callable[[Path], None]:
    return lambda root: edit_json(root / INFO, **values)


def _info_change(change: Callable[[dict], None]) -> Callable[[Path], None]:
    return lambda root: edit_json(root / INFO, change)


def _table(relative: str, change: Callable) -> Callable[[Path], None]:
    return lambda root: edit_table(root / relative, change)


def _reencode(relative: str, size: int | None = None, fps: int | None = None, seconds: float | None = None):
    """Replace a video by a valid re-encoding at another size, frame rate or length."""
    def damage(root: Path) -> None:
        import cv2
        import numpy as np

        from flywheel.data.video import probe, read_frames, write_video

        rate = int(round(float(probe(root / relative)["fps"])))
        frames = read_frames(root / relative, 0, seconds)
        if size:
            frames = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames])
        (root / relative).unlink()
        write_video(root / relative, np.ascontiguousarray(frames), fps=fps or rate)
    return damage


def _ragged_actions(table):
    import numpy as np

    table["action"] = [np.asarray(a)[: 20 if i % 7 == 3 else None] for i, a in enumerate(table["action"])]


def _actions_as_text(table):
    import numpy as np

    table["action"] = [json.dumps(np.asarray(a).tolist()) for a in table["action"]]


def _without_feature(name: str) -> Callable[[dict], None]:
    return lambda info: info["features"].pop(name)


def _episode_rows(episodes: list[int], frames: list[int] | None = None):
    def rows(table):
        chosen = table["episode_index"].isin(episodes)
        return chosen & table["frame_index"].isin(frames) if frames else chosen
    return rows


def _extra_episode(table):
    import pandas as pd

    extra = table.iloc[[-1]].copy()
    extra["episode_index"] = int(table["episode_index"].max()) + 1
    return pd.concat([table, extra], ignore_index=True)


def _duplicate_episode(table):
    import pandas as pd

    return pd.concat([table, table.iloc[[3]]], ignore_index=True)


def _lengthen(table):
    table.loc[table["episode_index"] == 4, "length"] += 5


def _drop_video_columns(table):
    return table.drop(columns=[c for c in table.columns if c.startswith(f"videos/{CAMERA}/")])


def _dangling(relative: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        (root / relative).unlink()
        os.symlink(root.parent / "moved-away" / Path(relative).name, root / relative)
    return damage


def _v21_jsonl(relative: str, text: str) -> Callable[[Path], None]:
    return _write(relative, text)


def _v21_extra_episode_file(root: Path) -> None:
    os.symlink(os.readlink(root / V21_DATA_1), root / "data" / "chunk-000" / "episode_000007.parquet")


def _v21_nan_state(root: Path) -> None:
    import numpy as np

    edit_table(root / V21_DATA_1, set_rows("observation.state", np.nan, lambda t: t["frame_index"] < 3))


def _g1_single(work: Path) -> Path:
    return keep_episodes(G1, work / "g1_single", [0], G1_DATA, G1_EPISODES)


def _pusht_single(work: Path) -> Path:
    return keep_episodes(PUSHT, work / "pusht_single", [0], PUSHT_DATA, PUSHT_EPISODES)


def _not_a_dataset(work: Path) -> Path:
    (work / "notes").mkdir()
    (work / "notes" / "readme.txt").write_text("not a dataset")
    return work / "notes"


def _a_file(work: Path) -> Path:
    (work / "dataset.zip").write_bytes(b"PK\x03\x04" + bytes(100))
    return work / "dataset.zip"


def _raw_caption_without_video(work: Path) -> Path:
    root = raw_folder(work / "raw")
    (root / "metas" / "lonely.txt").write_text("A caption for a video that is not there.")
    return root


def _raw_video_without_caption(work: Path) -> Path:
    root = raw_folder(work / "raw")
    (root / "metas" / "pick_01.txt").unlink()
    return root


def _raw_empty_caption(work: Path) -> Path:
    root = raw_folder(work / "raw")
    (root / "metas" / "pick_02.txt").write_text("  \n")
    return root


def _raw_undecodable(work: Path) -> Path:
    root = raw_folder(work / "raw")
    (root / "videos" / "pick_01.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(5000))
    return root


def _raw_flipped(work: Path) -> Path:
    root = raw_folder(work / "raw")
    flip_bytes(root / "videos" / "pick_01.mp4", at=2 / 3, count=16)
    return root


def _raw_empty(work: Path) -> Path:
    (work / "empty" / "videos").mkdir(parents=True)
    (work / "empty" / "metas").mkdir()
    return work / "empty"


def data_cases() -> list[Case]:
    import numpy as np

    g1 = G1.name
    v21 = G1_V21.name
    return [
        # --- LeRobot v3.0 (the real G1 sample): metadata
        data_case("data-g1-no-info", "meta/info.json missing", G1, [f"{g1}/meta/info.json", "not found"], _unlink(INFO),
                  subprocess=True),
        data_case("data-g1-info-garbage", "meta/info.json is binary garbage", G1, [f"{g1}/meta/info.json", "JSON"],
                  _write(INFO, random_bytes(300)), copied=(INFO,)),
        data_case("data-g1-info-list", "meta/info.json holds a list", G1, [f"{g1}/meta/info.json", "object"],
                  _write(INFO, "[1, 2, 3]"), copied=(INFO,)),
        data_case("data-g1-fps-text", "fps: \"ten\"", G1, [f"{g1}/meta/info.json", "'fps' is 'ten'"], _info(fps="ten"),
                  copied=(INFO,)),
        data_case("data-g1-fps-zero", "fps: 0", G1, [f"{g1}/meta/info.json", "'fps' is 0"], _info(fps=0), copied=(INFO,)),
        data_case("data-g1-fps-wrong", "fps 25 in info.json, the videos are 30 fps", G1, ["file-000.mp4", "30 fps",
                  "25 fps"], _info(fps=25), copied=(INFO,)),
        data_case("data-g1-resolution-wrong", "info.json says 240x320, the video is 480x640", G1,
                  ["file-000.mp4", "480x640", "240x320"], _info_change(lambda i: (
                      i["features"][CAMERA].update(shape=[240, 320, 3]),
                      i["features"][CAMERA]["info"].update({"video.height": 240, "video.width": 320}))),
                  copied=(INFO,)),
        data_case("data-g1-shape-contradiction", "shape 480x640 but info.video says 240x320", G1,
                  [f"{g1}/meta/info.json", "contradicts"], _info_change(
                      lambda i: i["features"][CAMERA]["info"].update({"video.height": 240})), copied=(INFO,)),
        data_case("data-g1-total-episodes", "total_episodes 99 for 12", G1, [f"{g1}/meta/info.json", "total_episodes is 99"],
                  _info(total_episodes=99), copied=(INFO,)),
        data_case("data-g1-total-frames", "total_frames 5000 for 4350", G1, [f"{g1}/meta/info.json", "total_frames is 5000"],
                  _info(total_frames=5000), copied=(INFO,)),
        data_case("data-g1-version", "codebase_version v1.6", G1, [f"{g1}/meta/info.json", "v1.6"],
                  _info(codebase_version="v1.6"), copied=(INFO,)),
        data_case("data-g1-no-features", "info.json without 'features'", G1, [f"{g1}/meta/info.json", "features"],
                  _info_change(lambda i: i.pop("features")), copied=(INFO,)),
        data_case("data-g1-camera-unknown", "ingest.camera_key names no camera", G1,
                  ["info.json", "observation.images.wrist", CAMERA], lambda root: None,
                  extra=["--set", "ingest.camera_key=observation.images.wrist"]),
        # --- videos
        data_case("data-g1-video-missing", "a video file missing", G1, ["file-001.mp4", "not found"],
                  _unlink(G1_VIDEO_1)),
        data_case("data-g1-video-truncated", "a video cut at half its size", G1, ["file-001.mp4", "truncated"],
                  _truncate(G1_VIDEO_1, 0.5), copied=(G1_VIDEO_1,), subprocess=True),
        data_case("data-g1-video-garbage", "a video replaced by random bytes", G1, ["file-000.mp4"],
                  _write(G1_VIDEO_0, random_bytes(200_000))),
        data_case("data-g1-video-flipped", "4 KB inverted mid-stream (every packet still demuxes)", G1,
                  ["file-000.mp4", "corrupt", r"\d+\.\d{3}s"], lambda root: flip_bytes(root / G1_VIDEO_0),
                  copied=(G1_VIDEO_0,)),
        data_case("data-g1-video-empty", "a video of 0 bytes", G1, ["file-001.mp4"], _write(G1_VIDEO_1, b"")),
        data_case("data-g1-video-text", "a video that is a text file", G1, ["file-001.mp4"],
                  _write(G1_VIDEO_1, "this is not a video\n")),
        data_case("data-g1-video-short", "a valid video 1 s long under 6 episodes", G1, ["file-001.mp4"],
                  _reencode(G1_VIDEO_1, seconds=1.0)),
        # --- frame tables
        data_case("data-g1-data-missing", "the data parquet missing", G1, [G1_DATA, "not found"], _unlink(G1_DATA)),
        data_case("data-g1-data-garbage", "the data parquet is random bytes", G1, [G1_DATA, "parquet"],
                  _write(G1_DATA, random_bytes(5000))),
        data_case("data-g1-data-truncated", "the data parquet cut at half", G1, [G1_DATA, "parquet"],
                  _truncate(G1_DATA, 0.5), copied=(G1_DATA,)),
        data_case("data-g1-action-nan", "NaN actions in 2 frames", G1, [G1_DATA, "action is NaN or infinite",
                  "episode 2 frame 5"], _table(G1_DATA, set_rows("action", np.nan, _episode_rows([2], [5, 6]))),
                  copied=(G1_DATA,), subprocess=True),
        data_case("data-g1-action-inf", "inf actions in one episode", G1, [G1_DATA, "action is NaN or infinite",
                  "episode 7"], _table(G1_DATA, set_rows("action", np.inf, _episode_rows([7]))), copied=(G1_DATA,)),
        data_case("data-g1-action-text", "actions stored as strings", G1, [G1_DATA, "'action' holds text"],
                  _table(G1_DATA, _actions_as_text), copied=(G1_DATA,)),
        data_case("data-g1-action-ragged", "action rows of different lengths", G1, [G1_DATA, "'action'",
                  "different lengths"], _table(G1_DATA, _ragged_actions), copied=(G1_DATA,)),
        data_case("data-g1-action-column-missing", "info.json declares action, the data has no column", G1,
                  [G1_DATA, "no column 'action'"], _table(G1_DATA, lambda t: t.drop(columns=["action"])),
                  copied=(G1_DATA,)),
        data_case("data-g1-no-action-feature", "no action feature anywhere", G1, [f"{g1}/meta/info.json",
                  "no 'action' feature", "required_features"], lambda root: (
                      edit_json(root / INFO, _without_feature("action")),
                      edit_table(root / G1_DATA, lambda t: t.drop(columns=["action"]))), copied=(INFO, G1_DATA)),
        data_case("data-g1-state-all-nan", "every observation.state NaN", G1, [G1_DATA, "observation.state is NaN"],
                  _table(G1_DATA, set_rows("observation.state", np.nan)), copied=(G1_DATA,)),
        data_case("data-g1-action-shape", "info.json says action shape [25], rows have 26", G1,
                  [G1_DATA, r"\[26\]", r"\[25\]"], _info_change(lambda i: i["features"]["action"].update(shape=[25])),
                  copied=(INFO,)),
        data_case("data-g1-action-dtype", "action declared as a string feature", G1,
                  [f"{g1}/meta/info.json", "'action'", "dtype"],
                  _info_change(lambda i: i["features"]["action"].update(dtype="string")), copied=(INFO,)),
        # --- episodes and tasks
        data_case("data-g1-episodes-missing", "3 of 12 episodes missing from meta/episodes", G1,
                  [G1_DATA, r"episodes \[9, 10, 11\]"], _table(G1_EPISODES, lambda t: t[t["episode_index"] < 9]),
                  copied=(G1_EPISODES,)),
        data_case("data-g1-episode-extra", "meta/episodes lists an episode the data lacks", G1,
                  ["no frame rows for episode 12"], _table(G1_EPISODES, _extra_episode), copied=(G1_EPISODES,)),
        data_case("data-g1-episode-duplicate", "an episode listed twice", G1, ["meta/episodes", r"\[3\]",
                  "more than once"], _table(G1_EPISODES, _duplicate_episode), copied=(G1_EPISODES,)),
        data_case("data-g1-episode-length", "meta/episodes says 5 frames more than the data", G1,
                  [G1_DATA, "episode 4"], _table(G1_EPISODES, _lengthen), copied=(G1_EPISODES,)),
        data_case("data-g1-episodes-meta-missing", "meta/episodes/ removed", G1, ["meta/episodes", "no episode metadata"],
                  lambda root: shutil.rmtree(root / "meta" / "episodes")),
        data_case("data-g1-episode-video-columns", "episode metadata without the camera's columns", G1,
                  ["meta/episodes", f"videos/{CAMERA}"], _table(G1_EPISODES, _drop_video_columns),
                  copied=(G1_EPISODES,)),
        data_case("data-g1-tasks-missing", "meta/tasks.parquet missing", G1, ["meta/tasks.parquet", "not found"],
                  _unlink("meta/tasks.parquet")),
        data_case("data-g1-task-unknown", "frames point at a task the table lacks", G1, [G1_DATA, r"task_index \[0\]"],
                  _table("meta/tasks.parquet", lambda t: t.assign(task_index=[5])), copied=("meta/tasks.parquet",)),
        data_case("data-g1-tasks-empty", "meta/tasks.parquet with no rows", G1, ["meta/tasks.parquet", "no tasks"],
                  _table("meta/tasks.parquet", lambda t: t.iloc[:0]), copied=("meta/tasks.parquet",)),
        built_case("data-g1-single-episode", "a single-episode dataset (nothing to hold out)", _g1_single,
                   ["g1_single", "1 real episode", "allow_no_holdout"]),
        built_case("data-pusht-single-episode", "a single-episode PushT dataset", _pusht_single,
                   ["pusht_single", "holds none of them out"]),
        # --- LeRobot v3.0 (PushT)
        data_case("data-pusht-resolution", "a 64x64 video under info.json's 96x96", PUSHT,
                  ["file-000.mp4", "64x64", "96x96"], _reencode(PUSHT_VIDEO, size=64), subprocess=True),
        data_case("data-pusht-video-fps", "the video re-encoded at 5 fps, info.json says 10", PUSHT,
                  ["file-000.mp4", "5 fps", "10 fps"], _reencode(PUSHT_VIDEO, fps=5)),
        data_case("data-pusht-env-state-nan", "NaN observation.environment_state (checked when present)", PUSHT,
                  [PUSHT_DATA, "observation.environment_state is NaN"],
                  _table(PUSHT_DATA, set_rows("observation.environment_state", np.nan, _episode_rows([1], [0]))),
                  copied=(PUSHT_DATA,)),
        # --- LeRobot v2.1 (the G1 sample converted by LeRobot)
        data_case("data-v21-video-missing", "an episode's video missing", G1_V21, ["episode_000001.mp4", "not found"],
                  _unlink(V21_VIDEO_1)),
        data_case("data-v21-video-short", "a 1 s video for a 7.4 s episode", G1_V21, ["episode_000001.mp4", "truncated"],
                  _reencode(V21_VIDEO_1, seconds=1.0)),
        data_case("data-v21-fps", "a 15 fps video in a 30 fps dataset", G1_V21, ["episode_000001.mp4", "15 fps"],
                  _reencode(V21_VIDEO_1, fps=15, seconds=0.5)),
        data_case("data-v21-stats-garbage", "meta/episodes_stats.jsonl is not JSON", G1_V21,
                  [f"{v21}/meta/episodes_stats.jsonl", "JSON"], _v21_jsonl("meta/episodes_stats.jsonl", "{not json\n")),
        data_case("data-v21-stats-empty", "per-episode stats without values (LeRobot's converter fails)", G1_V21,
                  [v21, "conversion failed"], _v21_jsonl("meta/episodes_stats.jsonl",
                                                         "".join(f'{{"episode_index": {i}}}\n' for i in range(3)))),
        data_case("data-v21-tasks-empty", "meta/tasks.jsonl lists no task", G1_V21, [f"{v21}/meta/tasks.jsonl", "no tasks"],
                  _v21_jsonl("meta/tasks.jsonl", "")),
        data_case("data-v21-episodes-missing", "meta/episodes.jsonl missing", G1_V21,
                  [f"{v21}/meta/episodes.jsonl", "not found"], _unlink("meta/episodes.jsonl")),
        data_case("data-v21-extra-episode-file", "a data file for an episode the metadata does not list", G1_V21,
                  ["episode_000007.parquet", "not listed"], _v21_extra_episode_file),
        data_case("data-v21-state-nan", "NaN states in an episode", G1_V21, [V21_DATA_1, "observation.state is NaN"],
                  _v21_nan_state, copied=(V21_DATA_1,)),
        data_case("data-v21-dangling-link", "an episode's video is a link to a file that is gone", G1_V21,
                  ["episode_000001.mp4", "not found"], _dangling(V21_VIDEO_1)),
        data_case("data-g1-dangling-link", "meta/tasks.parquet is a link to a file that is gone", G1,
                  ["meta/tasks.parquet", "not found"], _dangling("meta/tasks.parquet")),
        # --- raw video folders
        built_case("data-raw-caption-alone", "a caption without its video", _raw_caption_without_video,
                   ["metas/lonely.txt", "without a video"]),
        built_case("data-raw-video-alone", "a video without its caption", _raw_video_without_caption,
                   ["videos/pick_01.mp4", "without a caption"]),
        built_case("data-raw-caption-blank", "a blank caption", _raw_empty_caption, ["metas/pick_02.txt", "empty"]),
        built_case("data-raw-undecodable", "an MP4 header over zeros", _raw_undecodable, ["videos/pick_01.mp4"]),
        built_case("data-raw-h264-damaged", "16 bytes flipped in an H.264 stream", _raw_flipped,
                   ["videos/pick_01.mp4", "corrupt"]),
        built_case("data-raw-empty", "a raw folder with no videos", _raw_empty, ["empty/videos", "0 episodes"]),
        # --- sources
        built_case("data-source-missing", "ingest.source that does not exist", lambda w: w / "no-such-dataset",
                   ["no-such-dataset", "no such folder"], subprocess=True),
        built_case("data-source-file", "ingest.source is a file", _a_file, ["dataset.zip", "not a folder"]),
        built_case("data-source-unknown-format", "a folder that is no dataset", _not_a_dataset,
                   ["notes", "cannot tell the format"]),
        built_case("data-source-hub-offline", "a Hub repo id while offline", lambda w: Path("flywheel-test/nope"),
                   ["flywheel-test/nope", "Hub"]),
        data_case("data-format-mismatch", "ingest.format raw-videos for a LeRobot dataset", G1,
                  [g1, "lerobot-v3.0", "raw-videos"], lambda root: None, extra=["--set", "ingest.format=raw-videos"]),
    ]


# --------------------------------------------------------------------------------------------------- config


def _config_file(name: str, text: str | bytes) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        path = ctx.work / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        ctx.values["config"] = str(path)
    return setup


def config_case(name: str, what: str, sets: list[str], names: list[str], command: str = "ingest", **kw) -> Case:
    argv = [command, "--home", "{home}"]
    for item in sets:
        argv += ["--set", item]
    return Case(name, "config", what, argv, names, **kw)


def file_case(name: str, what: str, text: str | bytes, names: list[str], command: str = "iterate",
              file_name: str = "my.yaml", **kw) -> Case:
    return Case(name, "config", what, [command, "--home", "{home}", "--config", "{config}"], names,
                _config_file(file_name, text), **kw)


def config_cases() -> list[Case]:
    return [
        Case("config-file-missing", "config", "--config names no file", ["iterate", "--home", "{home}", "--config",
             "{work}/missing.yaml"], ["missing.yaml", "not found"], subprocess=True),
        Case("config-file-directory", "config", "--config names a folder", ["iterate", "--home", "{home}", "--config",
             "{work}"], [r"--config|config file|is a directory|not a file"]),
        file_case("config-yaml-unclosed", "a YAML list never closed", "train:\n  steps: [1, 2\n",
                  ["my.yaml", "not valid YAML", "line"]),
        file_case("config-yaml-tab", "a tab for indentation", "train:\n\tsteps: 3\n", ["my.yaml", "YAML"]),
        file_case("config-yaml-binary", "a binary file as config", random_bytes(400, seed=3), ["my.yaml"]),
        file_case("config-yaml-list", "a YAML list at the top", "- train\n- clips\n", ["my.yaml", "mapping"]),
        file_case("config-yaml-scalar-section", "a section that is a number", "train: 5\n", ["my.yaml", "train"]),
        file_case("config-unknown-section", "section 'trian'", "trian:\n  steps: 3\n", ["my.yaml", "trian", "unknown key"],
                  subprocess=True),
        file_case("config-unknown-key", "train.stepz", "train:\n  stepz: 3\n", ["my.yaml", "train.stepz", "unknown key"]),
        file_case("config-yaml-inf", "train.learning_rate: .inf in the file", "train:\n  learning_rate: .inf\n",
                  ["my.yaml", "train.learning_rate"]),
        file_case("config-yaml-bad-domain", "domain: 'My Robot' in the file", "domain: My Robot\n",
                  ["my.yaml", "domain"]),
        Case("config-validate-bad", "config", "`flywheel config --validate` on a bad file", ["config", "--validate",
             "{config}"], ["my.yaml", "train.rank"], _config_file("my.yaml", "train:\n  rank: 0\n")),
        config_case("config-set-unknown", "--set train.x=1", ["train.x=1"], ["--set train.x=1", "unknown key"],
                    subprocess=True),
        config_case("config-set-no-equals", "--set train.steps (no value)", ["train.steps"], ["--set 'train.steps'",
                    "KEY=VALUE"]),
        config_case("config-set-empty-part", "--set train..steps=3", ["train..steps=3"], ["train..steps=3"]),
        config_case("config-set-bad-yaml", "--set generate.seeds=[0,1", ["generate.seeds=[0,1"],
                    ["generate.seeds=\\[0,1", "not valid YAML"]),
        config_case("config-set-lr-inf", "--set train.learning_rate=.inf", ["train.learning_rate=.inf"],
                    ["train.learning_rate", "finite"]),
        config_case("config-set-lr-nan", "--set train.learning_rate=.nan", ["train.learning_rate=.nan"],
                    ["train.learning_rate"]),
        config_case("config-set-rank-zero", "--set train.rank=0", ["train.rank=0"], ["train.rank", "greater than 0"]),
        config_case("config-set-steps-text", "--set train.steps=ten", ["train.steps=ten"], ["train.steps", "integer"]),
        config_case("config-set-val-fraction", "--set ingest.val_fraction=1.5", ["ingest.val_fraction=1.5"],
                    ["ingest.val_fraction"]),
        config_case("config-set-fractions-sum", "val 0.6 + test 0.5", ["ingest.val_fraction=0.6",
                    "ingest.test_fraction=0.5"], ["ingest", "val_fraction \\+ test_fraction"]),
        config_case("config-set-seeds-empty", "--set evaluate.seeds=[]", ["evaluate.seeds=[]"], ["evaluate.seeds"]),
        config_case("config-set-seeds-text", "--set generate.seeds=[a,b]", ["generate.seeds=[a,b]"], ["generate.seeds"]),
        config_case("config-set-pass-rates", "min pass rate above max", ["gates.curation.min_pass_rate=0.9",
                    "gates.curation.max_pass_rate=0.5"], ["gates.curation", "min_pass_rate"]),
        config_case("config-set-safety", "--set model.safety=maybe", ["model.safety=maybe"], ["model.safety"]),
        config_case("config-set-resize", "--set clips.resize=zoom", ["clips.resize=zoom"], ["clips.resize"]),
        config_case("config-set-method", "--set train.method=qlora", ["train.method=qlora"], ["train.method"]),
        config_case("config-set-num-frames", "--set clips.num_frames=16 (not 4k+1)", ["clips.num_frames=16"],
                    ["clips.num_frames"]),
        config_case("config-set-section-value", "--set train=5", ["train=5"], ["--set train=5", "train"]),
        config_case("config-set-preset-unknown", "--set model.preset=cosmos-9b (no such preset or folder)",
                    ["model.preset=cosmos-9b"], ["model.preset|cosmos-9b"], command="clips",
                    may_create=("manifests",)),
    ]


# ------------------------------------------------------------------------------------------------------ CLI


def cli_cases() -> list[Case]:
    return [
        Case("cli-iterations-zero", "cli", "--iterations 0", ["iterate", "--home", "{home}", "--iterations", "0"],
             ["--iterations 0"], subprocess=True),
        Case("cli-iterations-negative", "cli", "--iterations -2", ["iterate", "--home", "{home}", "--iterations", "-2"],
             ["--iterations -2"]),
        Case("cli-iterations-text", "cli", "--iterations two", ["iterate", "--home", "{home}", "--iterations", "two"],
             ["--iterations", "invalid int value"]),
        Case("cli-unknown-command", "cli", "`flywheel frobnicate`", ["frobnicate"], ["frobnicate", "invalid choice"]),
        Case("cli-unknown-option", "cli", "`flywheel train --stepz 3`", ["train", "--home", "{home}", "--stepz", "3"],
             ["--stepz"]),
        Case("cli-home-under-file", "cli", "--home below a regular file", ["ingest", "--home", "{work}/afile/home"],
             ["afile"], setup=lambda ctx: (ctx.work / "afile").write_text("x")),
        Case("cli-home-is-file", "cli", "--home is a regular file", ["ingest", "--home", "{work}/afile"],
             ["afile"], setup=lambda ctx: (ctx.work / "afile").write_text("x")),
        Case("cli-gc-keep-negative", "cli", "flywheel gc --keep-datasets -1", ["gc", "--home", "{home}",
             "--keep-datasets", "-1"], ["--keep-datasets"]),
        Case("cli-gc-age-nan", "cli", "flywheel gc --min-age-hours nan", ["gc", "--home", "{home}",
             "--min-age-hours", "nan"], ["--min-age-hours"]),
        Case("cli-evaluate-only-empty", "cli", "`flywheel evaluate --only` on a home with no adapter",
             ["evaluate", "--home", "{home}", "--only"], ["adapter|training_clips"]),
        Case("cli-generate-only-empty", "cli", "`flywheel generate --only` on a home with no clips",
             ["generate", "--home", "{home}", "--only"], ["training_clips|clips"]),
        Case("cli-show-unknown-domain", "cli", "`flywheel adapters show` of a domain with no adapters",
             ["adapters", "show", "no-such-domain", "--home", "{home}"], ["no-such-domain"]),
        Case("cli-promote-no-version", "cli", "`flywheel adapters promote pusht-rotated` without a version",
             ["adapters", "promote", "pusht-rotated", "--home", "{home}"], ["version"]),
    ]


# --------------------------------------------------------------------------------------------------- domains


def domain_cases() -> list[Case]:
    return [
        Case("domain-spaces", "domain", "--domain 'My Robot'", ["ingest", "--home", "{home}", "--domain", "My Robot"],
             ["My Robot", "domain"], subprocess=True),
        Case("domain-traversal", "domain", "--domain ../../etc", ["ingest", "--home", "{home}", "--domain",
             "../../etc"], [r"\.\./\.\./etc"]),
        Case("domain-empty", "domain", "--domain ''", ["ingest", "--home", "{home}", "--domain", ""], ["domain"]),
        Case("domain-too-long", "domain", "a 100-character domain", ["ingest", "--home", "{home}", "--domain", "d" * 100],
             ["d{100}"]),
        Case("domain-unicode", "domain", "--domain café", ["ingest", "--home", "{home}", "--domain", "café"], ["café"]),
        Case("domain-add-upper", "domain", "`flywheel domain add Cell-A`", ["domain", "add", "Cell-A", "--home",
             "{home}"], ["Cell-A"]),
        Case("domain-add-missing-source", "domain", "`flywheel domain add cell-a --source` of a missing folder",
             ["domain", "add", "cell-a", "--source", "{work}/nowhere", "--home", "{home}"], ["nowhere", "does not exist"]),
        Case("domain-no-demonstrations", "domain", "a new domain with no source, registration or inbox",
             ["ingest", "--home", "{home}", "--domain", "cell-b"], ["cell-b", "no demonstrations"]),
        Case("domain-registration-garbage", "domain", "<home>/domains/cell-c.json is not JSON",
             ["ingest", "--home", "{home}", "--domain", "cell-c"], ["domains/cell-c.json", "JSON"],
             setup=lambda ctx: (ctx.home.joinpath("domains").mkdir(parents=True, exist_ok=True),
                                ctx.home.joinpath("domains", "cell-c.json").write_text("{oops"))),
        Case("domain-refreshed-gone", "domain", "the domain's recorded refreshed version was deleted",
             ["ingest", "--home", "{home}", "--domain", "cell-d"], ["cell-d", "gone"],
             setup=lambda ctx: (ctx.home.joinpath("domains").mkdir(parents=True, exist_ok=True),
                                ctx.home.joinpath("domains", "cell-d.json").write_text(json.dumps(
                                    {"domain": "cell-d", "refreshed": str(ctx.work / "deleted-version")})))),
        Case("domain-import-bad-name", "domain", "`flywheel adapters import --domain 'A B'`",
             ["adapters", "import", "{work}/x.safetensors", "--domain", "A B", "--home", "{home}"], ["A B"],
             setup=lambda ctx: (ctx.work / "x.safetensors").write_bytes(b"x")),
    ]


# --------------------------------------------------------------------------------------------------- adapters


def _adapter_file(ctx: Ctx) -> Path:
    from flywheel.train.adapter_io import ADAPTER_WEIGHTS

    return ctx.fixtures.adapter_home()[1] / ADAPTER_WEIGHTS


def _pickle_renamed(ctx: Ctx) -> None:
    import torch
    from safetensors.torch import load_file

    path = ctx.work / "pytorch_lora_weights.safetensors"
    torch.save(load_file(_adapter_file(ctx)), path)
    ctx.values["adapter"] = str(path)


def _pickle_bin(ctx: Ctx) -> None:
    import torch
    from safetensors.torch import load_file

    path = ctx.work / "adapter_model.bin"
    torch.save(load_file(_adapter_file(ctx)), path)
    ctx.values["adapter"] = str(path)


def _incomplete(ctx: Ctx) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(_adapter_file(ctx), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if "lora_B" not in k or "blocks.0." not in k}
    path = ctx.work / "pytorch_lora_weights.safetensors"
    save_file(tensors, path, metadata=metadata)
    ctx.values["adapter"] = str(path)


def _no_alpha(ctx: Ctx) -> None:
    from safetensors.torch import load_file, save_file

    path = ctx.work / "pytorch_lora_weights.safetensors"
    save_file(load_file(_adapter_file(ctx)), path)  # without the metadata that records alpha
    ctx.values["adapter"] = str(path)


def _wrong_shapes(ctx: Ctx) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(_adapter_file(ctx), "pt") as f:
        metadata = f.metadata()
        tensors = {k: (torch.zeros(t.shape[0], t.shape[1] + 3) if "lora_A" in k and "blocks.1." in k else t)
                   for k in f.keys() for t in [f.get_tensor(k)]}
    path = ctx.work / "pytorch_lora_weights.safetensors"
    save_file(tensors, path, metadata=metadata)
    ctx.values["adapter"] = str(path)


def _truncated_adapter(ctx: Ctx) -> None:
    data = _adapter_file(ctx).read_bytes()
    path = ctx.work / "pytorch_lora_weights.safetensors"
    path.write_bytes(data[: len(data) // 2])
    ctx.values["adapter"] = str(path)


def _peft_bad_config(ctx: Ctx) -> None:
    folder = ctx.work / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{\"peft_type\": \"LORA\", ")
    shutil.copyfile(_adapter_file(ctx), folder / "adapter_model.safetensors")
    ctx.values["adapter"] = str(folder)


def _empty_dir(ctx: Ctx) -> None:
    (ctx.work / "empty").mkdir()
    ctx.values["adapter"] = str(ctx.work / "empty")


def _tamper(change: Callable[[Path], None]) -> Callable[[Ctx], None]:
    """Change the shared adapter home's trained adapter (restored after the case)."""
    def setup(ctx: Ctx) -> None:
        home, adapter = ctx.fixtures.adapter_home()
        ctx.values["saved"] = {p: p.read_bytes() for p in adapter.iterdir() if p.is_file()}
        change(adapter)
    return setup


def _untamper(ctx: Ctx) -> None:
    _, adapter = ctx.fixtures.adapter_home()
    saved = ctx.values["saved"]
    for path in adapter.iterdir():
        if path not in saved:
            path.unlink()
    for path, data in saved.items():
        path.write_bytes(data)


def _flip_weights(adapter: Path) -> None:
    from flywheel.train.adapter_io import ADAPTER_WEIGHTS

    path = adapter / ADAPTER_WEIGHTS
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))


def adapter_case(name: str, what: str, argv: list[str], names: list[str], setup=None, restore=None, **kw) -> Case:
    return Case(name, "adapter", what, argv, names, setup, home="adapter", restore=restore, **kw)


def _import(name: str, what: str, setup, names: list[str], extra: list[str] = (), **kw) -> Case:
    return adapter_case(name, what, ["adapters", "import", "{adapter}", "--domain", "pusht-rotated", "--home", "{home}",
                                     *extra], names, setup, **kw)


def adapter_cases() -> list[Case]:
    run = ["--home", "{home}", *[a for s in SMALL_TRAIN for a in ("--set", s)]]
    return [
        adapter_case("adapter-promote-unknown", "promote v99 (never registered)",
                     ["adapters", "promote", "pusht-rotated", "99", "--home", "{home}"], ["99"], subprocess=True),
        adapter_case("adapter-promote-unevaluated", "promote v1 (registered, never evaluated)",
                     ["adapters", "promote", "pusht-rotated", "1", "--home", "{home}"], ["v1", "no recorded evaluation"]),
        adapter_case("adapter-promote-unknown-domain", "promote in a domain with no adapters",
                     ["adapters", "promote", "cell-z", "1", "--home", "{home}"], ["cell-z"]),
        adapter_case("adapter-rollback-none", "rollback with no earlier champion",
                     ["adapters", "rollback", "pusht-rotated", "--home", "{home}"], ["rollback", "earlier champion"]),
        adapter_case("adapter-rollback-unknown", "rollback --to v42", ["adapters", "rollback", "pusht-rotated", "--to",
                     "42", "--home", "{home}"], ["42"]),
        adapter_case("adapter-show-unknown", "show v77", ["adapters", "show", "pusht-rotated", "77", "--home", "{home}"],
                     ["77"]),
        adapter_case("adapter-lineage-no-champion", "lineage without a champion or version",
                     ["adapters", "lineage", "pusht-rotated", "--home", "{home}"], ["pusht-rotated", "champion"]),
        _import("adapter-import-pickle-renamed", "a torch pickle renamed .safetensors", _pickle_renamed,
                ["pytorch_lora_weights.safetensors", "safetensors"], subprocess=True),
        _import("adapter-import-pickle-bin", "a pickled .bin adapter", _pickle_bin, ["adapter_model.bin", "pickle"]),
        _import("adapter-import-incomplete", "lora_B tensors of one block removed", _incomplete,
                ["pytorch_lora_weights.safetensors", "lora_B|without both"]),
        _import("adapter-import-no-alpha", "a LoRA file that does not record its alpha", _no_alpha,
                ["pytorch_lora_weights.safetensors", "alpha"]),
        _import("adapter-import-shapes", "lora_A of one block with the wrong input size", _wrong_shapes,
                ["pytorch_lora_weights.safetensors", "does not fit"]),
        _import("adapter-import-truncated", "a safetensors file cut at half", _truncated_adapter,
                ["pytorch_lora_weights.safetensors"]),
        _import("adapter-import-rank", "--rank 8 for a rank-4 file", lambda ctx: ctx.values.update(
                adapter=str(_adapter_file(ctx))), ["rank"], extra=["--rank", "8"]),
        _import("adapter-import-peft-json", "a peft folder whose adapter_config.json is cut", _peft_bad_config,
                ["adapter_config.json", "JSON"]),
        _import("adapter-import-empty-dir", "an empty folder", _empty_dir, ["empty"]),
        _import("adapter-import-missing", "a path that does not exist", lambda ctx: ctx.values.update(
                adapter=str(ctx.work / "nowhere.safetensors")), ["nowhere.safetensors", "not found"]),
        adapter_case("adapter-tampered-register", "one bit of the trained adapter's weights flipped; `flywheel train` "
                     "reuses it and registers", ["train", *run], ["pytorch_lora_weights.safetensors", "sha256|changed"],
                     _tamper(_flip_weights), _untamper, subprocess=True),
        adapter_case("adapter-tampered-generate", "the same, then `flywheel generate --only` with it",
                     ["generate", "--only", "--set", "generate.adapter=1", "--set", "generate.max_videos=1", *run],
                     ["pytorch_lora_weights.safetensors", "sha256|changed"], _tamper(_flip_weights), _untamper),
        adapter_case("adapter-tampered-evaluate", "the same, then `flywheel evaluate --only`",
                     ["evaluate", "--only", "--set", "evaluate.max_clips=1", *run],
                     ["pytorch_lora_weights.safetensors", "sha256|changed"], _tamper(_flip_weights), _untamper),
        adapter_case("adapter-record-deleted", "the adapter's .files.json deleted, then `flywheel train`",
                     ["train", *run], [".files.json", "not found"],
                     _tamper(lambda a: (a / ".files.json").unlink()), _untamper),
        adapter_case("adapter-file-added", "a file added to the adapter, then `flywheel generate --only`",
                     ["generate", "--only", "--set", "generate.adapter=1", "--set", "generate.max_videos=1", *run],
                     ["notes.txt", "added"], _tamper(lambda a: (a / "notes.txt").write_text("x")), _untamper),
        adapter_case("adapter-generate-unknown-version", "generate.adapter=99",
                     ["generate", "--only", "--set", "generate.adapter=99", *run], ["99"]),
        adapter_case("adapter-generate-outside", "generate.adapter = a folder outside the home's store",
                     ["generate", "--only", "--set", "generate.adapter={work}/elsewhere", *run],
                     ["elsewhere", "adapter"], setup=lambda ctx: (
                         shutil.copytree(ctx.fixtures.adapter_home()[1], ctx.work / "elsewhere"))),
        adapter_case("adapter-evaluate-base", "evaluate.adapter=base", ["evaluate", "--only", "--set",
                     "evaluate.adapter=base", *run], ["evaluate.adapter"]),
        adapter_case("adapter-init-missing", "train.init_adapter = a folder that does not exist",
                     ["train", "--set", "train.init_adapter={work}/gone", *run], ["gone", "init_adapter"]),
    ]


def all_cases() -> list[Case]:
    return data_cases() + config_cases() + cli_cases() + domain_cases() + adapter_cases()


# ================================================================================================ fixtures


class Fixtures:
    """Shared, expensive inputs, built on first use: a home with a trained, registered adapter (v1)."""

    def __init__(self, root: Path, runner: Runner):
        self.root, self.runner = root, runner
        self._adapter: tuple[Path, Path] | None = None

    def adapter_home(self) -> tuple[Path, Path]:
        if self._adapter is None:
            home = self.root / "adapter-home"
            argv = ["train", "--home", str(home), *[a for s in SMALL_TRAIN for a in ("--set", s)]]
            started = time.perf_counter()
            code, output = self.runner.call(argv)
            if code != 0:
                raise RuntimeError(f"the adapter fixture failed (exit {code}):\n{output[-4000:]}")
            adapters = sorted((home / "adapters").iterdir())
            assert len(adapters) == 1, adapters
            print(f"  fixture: adapter home ready in {time.perf_counter() - started:.0f}s", flush=True)
            self._adapter = home, adapters[0]
        return self._adapter


# ================================================================================================ running


class Runner:
    """Runs `flywheel ARGV` in this process (flywheel.cli.main, output captured at the fd level) or as a
    subprocess (`python -m flywheel.cli`); returns (exit code, output)."""

    def __init__(self, timeout_s: int = 900):
        self.timeout_s = timeout_s

    def call(self, argv: list[str], subprocess_: bool = False) -> tuple[int, str]:
        return self._subprocess(argv) if subprocess_ else self._in_process(argv)

    def _subprocess(self, argv: list[str]) -> tuple[int, str]:
        try:
            done = subprocess.run([sys.executable, "-m", "flywheel.cli", *argv], cwd=REPO, capture_output=True,
                                  text=True, timeout=self.timeout_s, env=os.environ.copy())
        except subprocess.TimeoutExpired as e:
            return 124, f"timed out after {self.timeout_s}s\n{e.stdout or ''}{e.stderr or ''}"
        return done.returncode, done.stdout + done.stderr

    def _in_process(self, argv: list[str]) -> tuple[int, str]:
        from flywheel.cli import main

        env = dict(os.environ)
        cwd = os.getcwd()
        with tempfile.TemporaryFile(mode="w+b") as capture:
            sys.stdout.flush()
            sys.stderr.flush()
            saved = os.dup(1), os.dup(2)
            os.dup2(capture.fileno(), 1)
            os.dup2(capture.fileno(), 2)
            previous = signal.signal(signal.SIGALRM, _timeout)
            signal.alarm(self.timeout_s)
            try:
                code = main(argv)
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # what the interpreter would do: the traceback, exit code 1
                traceback.print_exc()
                code = 1
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, previous)
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
                os.environ.clear()
                os.environ.update(env)
                os.chdir(cwd)
            capture.seek(0)
            return int(code), capture.read().decode(errors="replace")


def _log_line(line: str) -> None:
    print(line, flush=True)


class CaseTimeout(Exception):
    pass


def _timeout(signum, frame):
    raise CaseTimeout("the case ran past its time limit")


def message_of(output: str) -> str:
    """The error message: from the first `error:` / `refused:` line (ours or argparse's) to the end."""
    lines = _plain(output).splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^(error|refused): ", line) or re.match(r"^flywheel[\w ]*: error: ", line):
            return "\n".join(lines[i:]).strip()
    return ""


def _plain(output: str) -> str:
    """Terminal output without progress bars' carriage-return frames."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in output.replace("\r\n", "\n").split("\n"))


@dataclasses.dataclass
class CaseResult:
    name: str
    category: str
    what: str
    command: str
    mode: str
    exit_code: int
    message: str           # the first line of the error message
    full_message: str      # all of it
    seconds: float
    clean_error: bool      # exit 2, no traceback, names what is wrong
    nothing_left: bool
    checks: dict
    problems: list[str]

    @property
    def passed(self) -> bool:
        return self.clean_error and self.nothing_left


def run_case(case: Case, root: Path, runner: Runner, fixtures: Fixtures, subprocess_: bool) -> CaseResult:
    work = root / case.name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    # A home per category, not per case: creating a home's MLflow and Dagster stores costs ~10 s under load. The
    # checks compare the home before and after each case, so a leftover is still blamed on the case that left it.
    home = {"adapter": lambda: fixtures.adapter_home()[0], "fresh": lambda: work / "home",
            "shared": lambda: root.parent / "homes" / case.category}[case.home]()
    ctx = Ctx(work=work, home=home, fixtures=fixtures, values={"home": str(home), "work": str(work)})
    if case.setup:
        case.setup(ctx)
    argv = [a.format(**ctx.values) for a in case.argv]
    data = Path(ctx.values["data"]) if "data" in ctx.values else None
    data_before = tree_digest(data) if data else None
    before = home_state(home)
    versions_before = registry_versions(home)
    started = time.perf_counter()
    try:
        code, output = runner.call(argv, subprocess_)
    finally:
        if case.restore:
            case.restore(ctx)
    seconds = time.perf_counter() - started
    after = home_state(home)
    message = message_of(output)
    problems = []
    if code != 2:
        problems.append(f"exit code {code}, expected 2")
    traceback_seen = bool(TRACEBACK.search(output))
    if traceback_seen:
        problems.append("traceback printed")
    if not message:
        problems.append("no error message line")
    missing = [n for n in case.names if not re.search(n, message)]
    if missing:
        problems.append(f"message does not name {missing}")
    new = sorted(after.artifacts - before.artifacts)
    unexpected = [a for a in new if a.split("/")[0] not in case.may_create]
    leftovers = [x for x in after.leftovers() if x not in before.leftovers()]
    problems += [f"left {x}" for x in leftovers]
    problems += [f"new artifact {a}" for a in unexpected]
    if registry_versions(home) != versions_before:
        problems.append("registry versions changed")
    input_changed = data is not None and tree_digest(data) != data_before
    if input_changed:
        problems.append(f"the input {data} changed")
    siblings = [p.name for p in (data.parent.iterdir() if data and data.parent.is_dir() else [])
                if p.name.endswith(("_old", "_v30"))]
    if siblings:
        problems.append(f"left {siblings} next to the input")
    clean = code == 2 and not traceback_seen and bool(message) and not missing
    nothing_left = not (leftovers or unexpected or input_changed or siblings) and registry_versions(home) == versions_before
    checks = {"traceback": traceback_seen, "names_missing": missing, "tmp": len(after.tmp) - len(before.tmp),
              "partial": len(after.partial) - len(before.partial), "work": len(after.work) - len(before.work),
              "running_mlflow": len(after.running_mlflow), "unfinished_dagster": len(after.unfinished_dagster),
              "new_artifacts": new}
    first = message.splitlines()[0] if message else (_plain(output).strip().splitlines() or [""])[-1]
    if first.endswith("invalid configuration") and len(message.splitlines()) > 1:
        first += " / " + message.splitlines()[1].strip()  # the first line alone names nothing
    scratch = root.parent
    command = "flywheel " + " ".join(_shorten(a, scratch) for a in argv)
    return CaseResult(case.name, case.category, case.what, command, "subprocess" if subprocess_ else "in-process", code,
                      _anonymize(first, scratch)[:300], _anonymize(message, scratch)[:1500], round(seconds, 2), clean,
                      nothing_left, checks, problems)


def _anonymize(text: str, root: Path) -> str:
    """Scratch and repository paths shortened (`<work>/...`, `datasets/...`), for the committed table."""
    return text.replace(str(root), "<work>").replace(str(REPO) + "/", "")


def _shorten(arg: str, root: Path) -> str:
    """One command-line argument as a shell would need it."""
    text = _anonymize(arg, root)
    return f"'{text}'" if (" " in text or not text) and not text.startswith("<") else text


def run_bad_inputs(root: Path, patterns: list[str] | None, all_subprocess: bool, log=_log_line,
                   runner: Runner | None = None) -> list[CaseResult]:
    runner = runner or Runner()
    fixtures = Fixtures(root / "fixtures", runner)
    cases = [c for c in all_cases() if not patterns or any(fnmatch.fnmatch(c.name, p) for p in patterns)]
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    results = []
    for i, case in enumerate(cases, 1):
        modes = [True] if all_subprocess else ([False, True] if case.subprocess else [False])
        for sub in modes:
            try:
                result = run_case(case, root / "cases", runner, fixtures, sub)
            except Exception as e:  # the harness itself failed to build the case: a failed case, said why
                result = CaseResult(case.name, case.category, case.what, " ".join(case.argv), "setup", -1,
                                    f"harness error: {type(e).__name__}: {e}"[:300], "", 0.0, False, False, {},
                                    [traceback.format_exc()[-2000:]])
            results.append(result)
            mark = "ok  " if result.passed else "FAIL"
            log(f"  [{i:3d}/{len(cases)}] {mark} {case.name:34s} {result.mode:10s} exit {result.exit_code} "
                f"{result.seconds:6.1f}s  {result.message[:110]}" + ("" if result.passed else f"\n        {result.problems}"))
    return results


# ================================================================================================ kill trials

# The small pipeline the refresh trials run on (minutes on 2 loaded cores instead of ~15); gates.curation lets a
# low pass rate through, so the refresh always has something to fold in.
SMALL_PIPELINE = [*SMALL_TRAIN, "evaluate.max_clips=1", "evaluate.seeds=[0]", "generate.max_videos=4",
                  "generate.seeds=[0]", "label.idm.steps=60", "refresh.usefulness.seeds=[0,1]",
                  "refresh.usefulness.idm.steps=40", "gates.curation.min_pass_rate=0"]
# Each train trial checkpoints at another interval: another artifact key, the same tensors (a resumed run equals
# an uninterrupted one), so one uninterrupted run is the reference of every trial.
CHECKPOINT_EVERY = [5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27]


def sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def start_cli(argv: list[str], log: Path) -> subprocess.Popen:
    """`python -m flywheel.cli ARGV` in a process group of its own (so a SIGKILL takes every process it started)."""
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "flywheel.cli", *argv], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env=os.environ.copy())


def kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def snapshot(home: Path, kind: str) -> dict:
    """Where a killed process stood: its checkpoints, temp dirs and the artifacts of `kind`."""
    state = home_state(home)
    checkpoints = sorted(p.name for p in (home / "work").glob("*/checkpoint-*")) if (home / "work").is_dir() else []
    return {"checkpoints": checkpoints, "tmp": state.tmp, "work": state.work, "running_mlflow": state.running_mlflow,
            "unfinished_dagster": state.unfinished_dagster,
            "artifacts": sorted(a for a in state.artifacts if a.startswith(kind + "/"))}


def phase_of(at_kill: dict, before: dict, kind: str) -> str:
    new = [a for a in at_kill["artifacts"] if a not in before["artifacts"]]
    if new:
        return f"after the {kind} artifact was written"
    if any(t.startswith(kind + "/") for t in at_kill["tmp"]):
        return f"while writing the {kind} artifact"
    if at_kill["checkpoints"]:
        return f"training, after {len(at_kill['checkpoints'])} checkpoint(s) ({at_kill['checkpoints'][-1]})"
    if at_kill["work"]:
        return "training, before its first checkpoint"
    return "starting up (imports, upstream stages reused)" if not at_kill["tmp"] else "writing another artifact"


def adapter_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    from flywheel.train.adapter_io import ADAPTER_WEIGHTS

    return load_file(adapter_dir / ADAPTER_WEIGHTS)


def same_tensors(a: dict, b: dict) -> list[str]:
    """Names of tensors that differ (a missing or extra name counts)."""
    import torch

    return sorted(k for k in set(a) | set(b) if k not in a or k not in b or not torch.equal(a[k], b[k]))


def dataset_tensors(root: Path) -> dict:
    """Every numeric column of every data table, and every decoded video frame, of a dataset version."""
    import numpy as np
    import pandas as pd

    from flywheel.data.video import read_frames

    out = {}
    for path in sorted((root / "data").rglob("*.parquet")):
        table = pd.read_parquet(path)
        for column in table.columns:
            values = table[column].to_numpy()
            out[f"{path.relative_to(root)}:{column}"] = (np.stack(values) if values.dtype == object else values)
    for path in sorted((root / "videos").rglob("*.mp4")):
        out[f"{path.relative_to(root)}:frames"] = read_frames(path)
    return out


def differing_arrays(a: dict, b: dict) -> list[str]:
    import numpy as np

    return sorted(k for k in set(a) | set(b) if k not in a or k not in b or a[k].shape != b[k].shape
                  or not np.array_equal(a[k], b[k], equal_nan=True))


def intact(home: Path, versions: list[tuple], dirs: list[Path]) -> list[str]:
    """Problems with what existed before a trial: registry versions gone or changed, artifact files changed."""
    from flywheel.errors import IntegrityError
    from flywheel.store import verify_dir

    problems = []
    now = registry_versions(home)
    problems += [f"registry version {v} changed or gone" for v in versions if v not in now]
    for path in dirs:
        try:
            verify_dir(path)
        except IntegrityError as e:
            problems.append(str(e)[:200])
    return problems


@dataclasses.dataclass
class KillTrial:
    target: str             # train | refresh
    trial: int
    command: str
    delay_s: float          # after the start (or, `after`, after the work began)
    after: str              # start | work
    phase: str              # where the process stood when it was killed
    at_kill: dict           # leftovers right after the kill
    rerun_exit: int
    rerun_s: float
    identical: bool         # the rerun's result equals the uninterrupted run's, tensor for tensor
    differing: list[str]
    previous_intact: bool
    leftovers: list[str]    # after the rerun: tmp, partial, scratch, RUNNING / unfinished runs
    duplicate_versions: bool
    problems: list[str]

    @property
    def passed(self) -> bool:
        return not self.problems


def kill_at_random(argv: list[str], home: Path, log: Path, rng: random.Random, expected_s: float, after: str,
                   work_glob: str) -> tuple[float, bool, subprocess.Popen]:
    """Start the command and SIGKILL it at a random moment: uniform over the expected run (after="start") or over
    its work once it began (after="work": a scratch / temp dir matching `work_glob` appeared). Returns the delay,
    whether the kill landed before the process ended, and the process."""
    process = start_cli(argv, log)
    started = time.perf_counter()
    if after == "work":
        while not list(home.glob(work_glob)) and process.poll() is None and time.perf_counter() - started < 900:
            time.sleep(0.05)
        delay = rng.uniform(0.0, expected_s)
    else:
        delay = rng.uniform(0.05, 0.95) * expected_s
    until = time.perf_counter() + delay
    while process.poll() is None and time.perf_counter() < until:
        time.sleep(0.02)
    landed = process.poll() is None
    kill_group(process)
    return round(time.perf_counter() - started, 2), landed, process


def timed_reference(argv: list[str], home: Path, log_path: Path, work_glob: str) -> tuple[float, float]:
    """Run the command uninterrupted as a subprocess: (seconds in all, seconds from when its work began, i.e.
    a path matching `work_glob` appeared under the home, to the end)."""
    process = start_cli(argv, log_path)
    started, work_began = time.perf_counter(), None
    while process.poll() is None:
        if work_began is None and list(home.glob(work_glob)):
            work_began = time.perf_counter()
        time.sleep(0.05)
    ended = time.perf_counter()
    if process.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed (exit {process.returncode}):\n"
                           f"{log_path.read_text(errors='replace')[-4000:]}")
    return ended - started, ended - (work_began or started)


def train_trials(root: Path, runner: Runner, rng: random.Random, count: int, log=print) -> list[KillTrial]:
    """SIGKILL `flywheel train` at random moments; rerun; compare with the uninterrupted adapter."""
    home = root / "train-home"
    root.mkdir(parents=True, exist_ok=True)
    base = ["train", "--home", str(home), *sets(SMALL_TRAIN)]
    code, output = runner.call(["clips", "--home", str(home)])  # upstream once; every run below reuses it
    if code != 0:
        raise RuntimeError(f"preparing the train home failed (exit {code}):\n{output[-4000:]}")
    reference_s, work_s = timed_reference([*base, "--set", "train.checkpoint_every=10"], home,
                                          root / "train-reference.log", "work/adapters-*")
    (reference,) = [home / a for a in home_state(home).artifacts if a.startswith("adapters/")]
    expected = adapter_tensors(reference)
    log(f"  train reference: {reference.name} in {reference_s:.0f}s (training and writing {work_s:.0f}s)")
    trials = []
    for trial in range(count):
        argv = [*base, "--set", f"train.checkpoint_every={CHECKPOINT_EVERY[trial % len(CHECKPOINT_EVERY)]}",
                "--set", f"train.keep_checkpoints={1 + trial % 3}"]
        after = "start" if trial % 2 == 0 else "work"
        trials.append(one_trial("train", trial, argv, home, root, runner, rng, "adapters",
                                reference_s if after == "start" else work_s, after, "work/adapters-*",
                                lambda new: same_tensors(adapter_tensors(new), expected), log))
    return trials


def refresh_trials(root: Path, runner: Runner, rng: random.Random, count: int, log=print) -> list[KillTrial]:
    """SIGKILL `flywheel refresh --only` at random moments; rerun; compare with the uninterrupted version."""
    home = root / "refresh-home"
    root.mkdir(parents=True, exist_ok=True)
    base = ["--home", str(home), *sets(SMALL_PIPELINE)]
    code, output = runner.call(["curate", *base])
    if code != 0:
        raise RuntimeError(f"preparing the refresh home failed (exit {code}):\n{output[-4000:]}")
    reference_s, work_s = timed_reference(["refresh", "--only", *base, "--set",
                                           "refresh.dataset.repo_id=flywheel/refreshed-0"], home,
                                          root / "refresh-reference.log", "datasets/.tmp-*")
    (reference,) = [home / a for a in home_state(home).artifacts if a.startswith("datasets/")]
    expected = dataset_tensors(reference)
    episodes = json.loads((reference / "meta" / "info.json").read_text())["total_episodes"]
    log(f"  refresh reference: {reference.name} ({episodes} episodes) in {reference_s:.0f}s (writing and the "
        f"usefulness report {work_s:.0f}s)")
    trials = []
    for trial in range(count):
        argv = ["refresh", "--only", *base, "--set", f"refresh.dataset.repo_id=flywheel/refreshed-{trial + 1}"]
        after = "start" if trial % 2 == 0 else "work"
        trials.append(one_trial("refresh", trial, argv, home, root, runner, rng, "datasets",
                                reference_s if after == "start" else work_s, after, "datasets/.tmp-*",
                                lambda new: differing_arrays(dataset_tensors(new), expected), log))
    return trials


def one_trial(target: str, trial: int, argv: list[str], home: Path, root: Path, runner: Runner, rng: random.Random,
              kind: str, expected_s: float, after: str, work_glob: str, compare: Callable[[Path], list[str]],
              log=print) -> KillTrial:
    before = snapshot(home, kind)
    versions = registry_versions(home)
    previous = [home / a for a in home_state(home).artifacts]
    for attempt in range(3):  # a kill that came after the process ended is no trial: draw another moment
        delay, landed, process = kill_at_random(argv, home, root / f"{target}-{trial}-{attempt}.log", rng,
                                                expected_s * (0.7 ** attempt), after, work_glob)
        if landed:
            break
        log(f"  {target} trial {trial}: the process ended before the kill at {delay:.1f}s; another moment")
    at_kill = snapshot(home, kind)
    phase = phase_of(at_kill, before, kind) if landed else "never killed (ended first)"
    started = time.perf_counter()
    code, output = runner.call(argv)
    rerun_s = round(time.perf_counter() - started, 1)
    after_state = home_state(home)
    new = [home / a for a in sorted(after_state.artifacts - set(a for a in before["artifacts"]))
           if a.startswith(kind + "/")]
    problems = [] if landed else ["the kill never landed"]
    if code != 0:
        problems.append(f"rerun exit {code}: {message_of(output)[:300] or _plain(output)[-300:]}")
    differing = []
    if len(new) != 1:
        problems.append(f"{len(new)} new {kind} artifacts after the rerun, expected 1")
    else:
        differing = compare(new[0])
        if differing:
            problems.append(f"{len(differing)} tensors differ from the uninterrupted run ({differing[:3]})")
    lost = intact(home, versions, previous)
    problems += lost
    leftovers = after_state.leftovers()
    problems += [f"left {x}" for x in leftovers]
    now = registry_versions(home)
    duplicates = len({s for _, _, s in now}) != len(now)
    if duplicates:
        problems.append("duplicate registry versions (two versions of one source)")
    result = KillTrial(target, trial, "flywheel " + " ".join(_shorten(a, root) for a in argv), delay, after, phase,
                       {k: v for k, v in at_kill.items() if k != "artifacts"}, code, rerun_s, not differing and len(new) == 1,
                       differing[:10], not lost, leftovers, duplicates, problems)
    log(f"  {'ok  ' if result.passed else 'FAIL'} {target} trial {trial}: killed at {delay:.1f}s ({after}) "
        f"{phase}; rerun exit {code} in {rerun_s:.0f}s" + ("" if result.passed else f"\n        {problems}"))
    return result


# ================================================================================================ concurrency


@dataclasses.dataclass
class Concurrency:
    processes: list[dict]   # command, domain, exit code, seconds, last message
    adapters: list[str]     # adapter artifacts in the home
    adapter_keys: int       # distinct adapter keys the processes asked for
    versions: list[tuple]   # registry versions
    duplicate_versions: bool
    leftovers: list[str]
    problems: list[str]

    @property
    def passed(self) -> bool:
        return not self.problems


def concurrency(root: Path, log=print) -> Concurrency:
    """4 `flywheel train` processes at once on one home: 2 domains (the same demonstrations, another training
    seed), 2 identical processes per domain (a same-key pair). Every upstream artifact is wanted by all four."""
    home = root / "concurrent-home"
    domains = {"pusht-rotated": [], "pusht-rotated-b": ["--set", "ingest.source=datasets/pusht_rotated",
                                                        "--set", "train.seed=1"]}
    commands = [(domain, ["train", "--home", str(home), "--domain", domain, *sets(SMALL_TRAIN), *extra])
                for domain, extra in domains.items() for _ in range(2)]
    started = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    processes = [start_cli(argv, root / f"concurrent-{i}.log") for i, (_, argv) in enumerate(commands)]
    finished = []
    for (domain, argv), process, i in zip(commands, processes, range(len(commands))):
        try:
            code = process.wait(timeout=max(1.0, 2400 - (time.perf_counter() - started)))
        except subprocess.TimeoutExpired:
            kill_group(process)
            code = 124
        output = (root / f"concurrent-{i}.log").read_text(errors="replace")
        finished.append({"domain": domain, "command": "flywheel " + " ".join(_shorten(a, root) for a in argv),
                         "exit_code": code, "seconds": round(time.perf_counter() - started, 1),
                         "traceback": bool(TRACEBACK.search(output)),
                         "last_line": (message_of(output) or _plain(output).strip().splitlines()[-1])[:200]})
    state = home_state(home)
    adapters = sorted(a for a in state.artifacts if a.startswith("adapters/"))
    versions = registry_versions(home)
    problems = [f"{p['domain']} process exited {p['exit_code']}: {p['last_line']}" for p in finished if p["exit_code"]]
    if len(adapters) != len(domains):
        problems.append(f"{len(adapters)} adapter artifacts for {len(domains)} keys")
    per_model = {}
    for name, version, source in versions:
        per_model.setdefault(name, []).append(version)
    if sorted(per_model) != sorted(f"flywheel-{d}" for d in domains) or any(len(v) != 1 for v in per_model.values()):
        problems.append(f"registry versions {per_model}, expected one per domain")
    duplicates = len({s for _, _, s in versions}) != len(versions)
    problems += [f"left {x}" for x in state.leftovers()]
    result = Concurrency(finished, adapters, len(domains), versions, duplicates, state.leftovers(), problems)
    log(f"  {'ok  ' if result.passed else 'FAIL'} 4 processes, exits {[p['exit_code'] for p in finished]}, "
        f"{len(adapters)} adapters, versions {per_model}" + ("" if result.passed else f"\n        {problems}"))
    return result


# ================================================================================================ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", action="append", choices=["bad-inputs", "kill", "concurrency"],
                        help="run these parts (default: all)")
    parser.add_argument("--only", action="append", metavar="GLOB", help="bad-input cases whose name matches")
    parser.add_argument("--subprocess", action="store_true", help="run every bad-input case as a subprocess")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where reliability.{json,md} go")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--train-kills", type=int, default=6)
    parser.add_argument("--refresh-kills", type=int, default=4)
    args = parser.parse_args(argv)
    parts = args.part or ["bad-inputs", "kill", "concurrency"]
    work = args.work or Path(tempfile.mkdtemp(prefix="flywheel-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner()
    started = time.perf_counter()
    report: dict = {"parts": parts, "machine": machine(), "scratch": str(work)}
    if "bad-inputs" in parts:
        print(f"bad inputs (scratch {work})", flush=True)
        report["bad_inputs"] = [dataclasses.asdict(r) | {"passed": r.passed}
                                for r in run_bad_inputs(work / "bad-inputs", args.only, args.subprocess, runner=runner)]
    if "kill" in parts:
        rng = random.Random(args.seed)
        print("kill trials", flush=True)
        trials = train_trials(work / "kill", runner, rng, args.train_kills, log=_log)
        trials += refresh_trials(work / "kill", runner, rng, args.refresh_kills, log=_log)
        report["kill_trials"] = [dataclasses.asdict(t) | {"passed": t.passed} for t in trials]
    if "concurrency" in parts:
        print("concurrency", flush=True)
        result = concurrency(work / "concurrency", log=_log)
        report["concurrency"] = dataclasses.asdict(result) | {"passed": result.passed}
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["summary"] = summary_of(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reliability.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (args.out / "reliability.md").write_text(markdown(report))
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {args.out / 'reliability.json'} and reliability.md")
    return 0 if report["summary"]["all_passed"] else 1


def _log(line: str) -> None:
    print(line, flush=True)


def machine() -> dict:
    import importlib.metadata as md

    versions = {name: md.version(name) for name in ("torch", "dagster", "mlflow", "lerobot", "diffusers", "peft")}
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), **versions}


def summary_of(report: dict) -> dict:
    out: dict = {}
    passed = True
    cases = report.get("bad_inputs") or []
    if cases:
        out["bad_inputs"] = {"runs": len(cases), "distinct_cases": len({c["name"] for c in cases}),
                             "subprocess_runs": sum(c["mode"] == "subprocess" for c in cases),
                             "clean_error_pct": round(100 * sum(c["clean_error"] for c in cases) / len(cases), 1),
                             "nothing_left_pct": round(100 * sum(c["nothing_left"] for c in cases) / len(cases), 1),
                             "tracebacks": sum(bool(c["checks"].get("traceback")) for c in cases),
                             "failed": [f"{c['name']} ({c['mode']})" for c in cases if not c["passed"]]}
        passed &= not out["bad_inputs"]["failed"]
    trials = report.get("kill_trials") or []
    if trials:
        out["kill_trials"] = {
            "trials": len(trials), "train": sum(t["target"] == "train" for t in trials),
            "refresh": sum(t["target"] == "refresh" for t in trials),
            "killed_mid_run": sum(not t["phase"].startswith("never") for t in trials),
            "reruns_ok": sum(t["rerun_exit"] == 0 for t in trials),
            "bit_identical": sum(t["identical"] for t in trials),
            "previous_versions_intact": sum(t["previous_intact"] for t in trials),
            "partial_artifacts": sum(sum(x.startswith("partial") for x in t["leftovers"]) for t in trials),
            "running_runs": sum(sum("RUNNING" in x or "unfinished" in x for x in t["leftovers"]) for t in trials),
            "tmp_dirs": sum(sum(x.startswith("tmp ") for x in t["leftovers"]) for t in trials),
            "failed": [f"{t['target']} {t['trial']}" for t in trials if not t["passed"]]}
        passed &= not out["kill_trials"]["failed"]
    if "concurrency" in report:
        c = report["concurrency"]
        out["concurrency"] = {"exit_codes": [p["exit_code"] for p in c["processes"]], "adapters": len(c["adapters"]),
                              "adapter_keys": c["adapter_keys"], "registry_versions": len(c["versions"]),
                              "duplicate_versions": c["duplicate_versions"], "passed": c["passed"]}
        passed &= c["passed"]
    out["all_passed"] = bool(passed)
    return out


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict) -> str:
    s = report["summary"]
    m = report["machine"]
    lines = ["# Reliability suite (`benchmarks/reliability.py`)", "",
             f"{m['date']}, {m['host']}: {m['cpus']} CPUs (load average {m['load_average_at_start'][0]:.1f} at the start, "
             f"shared with other jobs), Python {m['python']}, torch {m['torch']}, dagster {m['dagster']}, mlflow "
             f"{m['mlflow']}, lerobot {m['lerobot']}; OMP_NUM_THREADS={m['omp_num_threads']}. Whole run "
             f"{report['seconds'] / 60:.1f} min. Reproduce: `python benchmarks/reliability.py`.", ""]
    if "bad_inputs" in s:
        b = s["bad_inputs"]
        lines += ["## Totals", "",
                  f"- bad inputs: **{b['distinct_cases']} distinct cases**, {b['runs']} runs ({b['subprocess_runs']} as "
                  f"`python -m flywheel.cli` subprocesses, the rest through `flywheel.cli.main` in one process): "
                  f"**{b['clean_error_pct']}% clean errors** (exit 2, no traceback, the file / field / argument named), "
                  f"**{b['nothing_left_pct']}% left nothing behind**; tracebacks: {b['tracebacks']}"]
    if "kill_trials" in s:
        k = s["kill_trials"]
        lines.append(f"- SIGKILL trials: **{k['trials']}** ({k['train']} `flywheel train`, {k['refresh']} `flywheel refresh "
                     f"--only`), {k['killed_mid_run']} killed mid-run; reruns exit 0: {k['reruns_ok']}; bit-identical to "
                     f"the uninterrupted run: **{k['bit_identical']}/{k['trials']}**; previous versions intact: "
                     f"{k['previous_versions_intact']}/{k['trials']}; after the reruns: **{k['partial_artifacts']} partial "
                     f"artifacts, {k['running_runs']} RUNNING / unfinished runs, {k['tmp_dirs']} `.tmp-*`**")
    if "concurrency" in s:
        c = s["concurrency"]
        lines.append(f"- 4 concurrent `flywheel train` on 2 domains (a same-key pair each): exit codes {c['exit_codes']}; "
                     f"{c['adapters']} adapter artifacts for {c['adapter_keys']} keys; {c['registry_versions']} registry "
                     f"versions, duplicates: {c['duplicate_versions']}")
    lines += ["", f"All criteria met: **{s['all_passed']}**", ""]
    if report.get("bad_inputs"):
        lines += ["## Bad inputs", "",
                  "Each case: a damaged copy of an embedded dataset (`datasets/g1_pick_bottle`, `g1_pick_bottle_v21`, "
                  "`pusht_rotated`, or a raw folder cut from the G1 video), a bad config, argument, domain name or "
                  "adapter, run through the CLI. Pass = exit code 2, no traceback, the message names what the `names` "
                  "column asks for, and nothing left behind (no `.tmp-*`, partial artifact, scratch dir, RUNNING MLflow "
                  "run, unfinished Dagster run, unexpected new artifact or registry version; the input unchanged).", "",
                  "| case | bad input | command | mode | exit | first line of the message | clean | nothing left | pass |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in report["bad_inputs"]:
            lines.append(f"| {c['name']} | {_cell(c['what'])} | `{_cell(c['command'])}` | {c['mode']} | {c['exit_code']} | "
                         f"{_cell(c['message'])} | {'yes' if c['clean_error'] else 'NO'} | "
                         f"{'yes' if c['nothing_left'] else 'NO'} | {'pass' if c['passed'] else '**FAIL** ' + _cell('; '.join(c['problems']))[:300]} |")
        lines.append("")
    if report.get("kill_trials"):
        lines += ["## SIGKILL trials", "",
                  "The command is started as a subprocess (its own process group) and SIGKILLed after a random delay: "
                  "uniform over an uninterrupted run's length from the start (`start`), or over the work itself once its "
                  "scratch dir appeared (`work`). Then the same command runs again to the end. Train trials differ only "
                  "in `train.checkpoint_every` / `keep_checkpoints` (another artifact key, the same tensors), so every "
                  "resumed adapter is compared, tensor for tensor (`torch.equal`), with the one uninterrupted run; "
                  "refresh trials differ only in `refresh.dataset.repo_id`, and every data column and decoded video "
                  "frame of the version is compared with the uninterrupted version's.", "",
                  "| trial | killed at | phase at the kill | leftovers at the kill | rerun | bit-identical | previous intact | left after the rerun | pass |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for t in report["kill_trials"]:
            at = t["at_kill"]
            left = f"{len(at['tmp'])} tmp, {len(at['work'])} scratch, {len(at['running_mlflow'])} RUNNING MLflow, " \
                   f"{len(at['unfinished_dagster'])} unfinished Dagster"
            lines.append(f"| {t['target']} {t['trial']} | {t['delay_s']:.1f}s ({t['after']}) | {_cell(t['phase'])} | {left} | "
                         f"exit {t['rerun_exit']}, {t['rerun_s']:.0f}s | {'yes' if t['identical'] else 'NO'} | "
                         f"{'yes' if t['previous_intact'] else 'NO'} | {_cell(', '.join(t['leftovers']) or 'nothing')} | "
                         f"{'pass' if t['passed'] else '**FAIL** ' + _cell('; '.join(t['problems']))[:300]} |")
        lines.append("")
    if report.get("concurrency"):
        c = report["concurrency"]
        lines += ["## Concurrent processes", "",
                  "4 `flywheel train` processes started together on one home: domain `pusht-rotated` twice and "
                  "`pusht-rotated-b` (the same demonstrations, `train.seed=1`) twice, so all four want the same "
                  "manifest, clips and latents, and each pair the same adapter key.", "",
                  "| domain | exit | seconds | traceback | last line |", "|---|---|---|---|---|"]
        for p in c["processes"]:
            lines.append(f"| {p['domain']} | {p['exit_code']} | {p['seconds']} | {p['traceback']} | {_cell(p['last_line'])} |")
        lines += ["", f"Adapters: {', '.join(c['adapters'])}; registry versions: "
                      f"{', '.join(f'{n} v{v}' for n, v, _ in c['versions'])}; leftovers: {c['leftovers'] or 'none'}; "
                      f"{'pass' if c['passed'] else 'FAIL: ' + '; '.join(c['problems'])}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
