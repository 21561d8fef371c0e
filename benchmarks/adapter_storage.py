"""Adapter storage: how many bytes the MLflow registry adds on top of the home's adapter store.

For each flywheel home given (each after one `flywheel iterate`), measures:

- `adapters_bytes`: apparent size of <home>/adapters (the trained adapters, content-addressed);
- `registry_bytes`: apparent size of the LoggedModels' artifact folders (<home>/mlflow/artifacts/*/models);
- `extra_disk_bytes`: what the registry adds on disk: blocks of every file under both trees, each inode
  counted once (a hard link costs nothing), minus the blocks of the adapter store alone;
- `storage`: the LoggedModels' `flywheel.artifact_storage` tag (hardlinks | copy | upload; absent before).

Homes are read, never written. Run one iteration per home first, e.g. with the tiny settings of the tests:

    flywheel iterate --home /tmp/home-before ...   # at the commit before "store each adapter once"
    flywheel iterate --home /tmp/home-after ...    # at this commit
    python benchmarks/adapter_storage.py --label before=/tmp/home-before --label after=/tmp/home-after \
        --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sqlite3
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()] if root.is_dir() else []


def apparent(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def disk(paths: list[Path]) -> int:
    """Allocated bytes, each inode once."""
    seen: dict[tuple[int, int], int] = {}
    for p in paths:
        st = p.stat()
        seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return sum(seen.values())


def measure(home: Path) -> dict:
    adapters = files(home / "adapters")
    registry = [p for models in (home / "mlflow" / "artifacts").glob("*/models") for p in files(models)]
    with sqlite3.connect(f"file:{home / 'mlflow' / 'mlflow.db'}?mode=ro", uri=True) as conn:
        versions = conn.execute("SELECT count(*) FROM model_versions").fetchone()[0]
        storage = sorted({v for (v,) in conn.execute(
            "SELECT tag_value FROM logged_model_tags WHERE tag_key = 'flywheel.artifact_storage'")})
    return {"home": str(home), "model_versions": versions, "adapter_files": len(adapters),
            "adapters_bytes": apparent(adapters), "registry_files": len(registry), "registry_bytes": apparent(registry),
            "adapters_disk_bytes": disk(adapters), "extra_disk_bytes": disk(adapters + registry) - disk(adapters),
            "storage": storage or ["(untagged: full copy)"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", action="append", required=True, metavar="NAME=HOME")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    rows = {}
    for item in args.label:
        name, home = item.split("=", 1)
        rows[name] = measure(Path(home).resolve())
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "python": platform.python_version(), "flywheel_commit": commit, "homes": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adapter-storage.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Adapter storage: bytes the MLflow registry adds ({result['date']}, {result['machine']})", "",
             "`python benchmarks/adapter_storage.py` on homes after one `flywheel iterate` with the tests' tiny "
             "settings (`train.rank=4`, 4 steps). Apparent bytes, and the disk blocks the registry adds with each "
             "inode counted once.", "",
             "| home | versions | adapter store bytes | registry artifact bytes | registry adds on disk | storage |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['model_versions']} | {r['adapters_bytes']:,} | {r['registry_bytes']:,} | "
                     f"{r['extra_disk_bytes']:,} | {', '.join(r['storage'])} |")
    lines += ["", f"flywheel commit {commit}; homes: " + ", ".join(f"{n} = `{r['home']}`" for n, r in rows.items())]
    (args.out / "adapter-storage.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
