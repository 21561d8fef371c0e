"""Make the embedded real-robot sample (datasets/g1_pick_bottle, datasets/g1_pick_bottle_v21) from the G1 data.

    .venv/bin/python datasets/make_g1_sample.py --source ../shared/datasets --out datasets

The source folders (Unitree G1 + Inspire hands, MIT; see datasets/README.md for provenance) are read-only:
everything is written to temp folders next to `--out` and renamed into place. LeRobot's own dataset tools
select the episodes, and every video is re-encoded frame for frame with the encoder LeRobot uses (SVT-AV1
through PyAV, yuv420p), at GOP 30 / CRF 38 / preset 8 instead of the source's GOP 2 / CRF 30, so the sample
is 5 MB rather than 45 MB (about 39 dB PSNR against the source frames):

- `g1_pick_bottle` (v3.0): episodes 0-5 and 12-17 of the source's v3.0 folder, six from each of its two mp4s
  (LeRobot's `delete_episodes` drops the others and renumbers), then both mp4s re-encoded; `info.json` records
  the new settings.
- `g1_pick_bottle_v21` (v2.1): the source's 3 episodes, metadata copied unchanged, each video re-encoded.

LeRobot's own `reencode_video` writes files 5x larger at the same settings (measured), so the encode is here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

# 6 episodes from each of the source's two video files, so the sample keeps a v3.0 dataset's multi-file layout.
KEEP_EPISODES = [*range(0, 6), *range(12, 18)]
ENCODER = {"g": 30, "crf": 38, "preset": 8}


def reencode(src: Path, dst: Path) -> int:
    """Every frame of `src` into `dst` (same size and rate, frame i at i / fps); returns the frame count."""
    import av

    with av.open(str(src)) as source, av.open(str(dst), "w") as out:
        stream_in = source.streams.video[0]
        stream = out.add_stream("libsvtav1", rate=stream_in.average_rate)
        stream.width, stream.height, stream.pix_fmt = stream_in.width, stream_in.height, "yuv420p"
        stream.options = {k: str(v) for k, v in ENCODER.items()} | {"svtav1-params": "log-level=0"}
        count = 0
        for frame in source.decode(stream_in):
            image = av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")
            image.pts = None
            out.mux(stream.encode(image))
            count += 1
        out.mux(stream.encode(None))
    return count


def make_v30(source: Path, out: Path) -> None:
    from lerobot.datasets.dataset_tools import delete_episodes
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    src = LeRobotDataset("flywheel/g1_pick_bottle", root=source, video_backend="pyav")
    drop = [i for i in range(src.meta.total_episodes) if i not in KEEP_EPISODES]
    delete_episodes(src, drop, output_dir=out, repo_id="flywheel/g1_pick_bottle")
    for video in sorted((out / "videos").rglob("*.mp4")):
        encoded = video.with_name(f".{video.name}")
        frames = reencode(video, encoded)
        encoded.replace(video)
        print(f"{video}: {frames} frames re-encoded")
    record_encoder(out)


def make_v21(source: Path, out: Path) -> None:
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("*.mp4"))
    for video in sorted(source.rglob("*.mp4")):
        target = out / video.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        reencode(video, target)
    record_encoder(out)


def record_encoder(root: Path) -> None:
    """The new encoder settings in the video features' info (LeRobot reads them back when it re-encodes)."""
    info_path = root / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    for feature in info["features"].values():
        if feature.get("dtype") == "video":
            feature.setdefault("info", {}).update({f"video.{k}": v for k, v in ENCODER.items()})
    info_path.write_text(json.dumps(info, indent=4) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--out", type=Path, default=Path("datasets"))
    parser.add_argument("--force", action="store_true", help="replace existing sample folders")
    args = parser.parse_args()
    for name, make in (("g1_pick_bottle", make_v30), ("g1_pick_bottle_v21", make_v21)):
        final = args.out / name
        if final.exists() and not args.force:
            raise SystemExit(f"{final} exists; pass --force to replace it")
        with tempfile.TemporaryDirectory(dir=args.out, prefix=f".tmp-{name}-") as tmp:
            make(args.source / name, Path(tmp) / name)
            if final.exists():
                shutil.rmtree(final)
            (Path(tmp) / name).rename(final)
        print(f"{final}: {sum(p.stat().st_size for p in final.rglob('*') if p.is_file()) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
