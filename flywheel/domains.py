"""Domains: a robot cell, a camera view or a task family, each with its own data and adapter line.

A domain is a partition key of every Dagster asset. Where its demonstrations come from, in this order:
`ingest.source` when set; the domain's newest refreshed dataset version (recorded in its registration when
the build-on decision accepted it; unless `ingest.follow_refreshed: false`), so that each iteration builds
on the one before; the source in the domain's registration (`<home>/domains/<domain>.json`, written by
`flywheel domain add`); the inbox folder `<inbox>/<domain>`; for the embedded sample domain
(`pusht-rotated`), the sample dataset in the repository. The inbox sensor registers every LeRobot dataset
dropped into the inbox as a domain of that name; a registration (new real data) starts the domain's line
of refreshed versions again from that data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from pathlib import Path

from flywheel.errors import ConfigError, DataError
from flywheel.store import atomic_write_bytes, resolve_home

DOMAIN_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# The embedded sample: the default config's domain; its demonstrations are the sample dataset in the repository.
SAMPLE_DOMAIN = "pusht-rotated"
SAMPLE_DATASET = Path(__file__).resolve().parents[1] / "datasets" / "pusht_rotated"


def check_domain_name(name: str) -> str:
    if not DOMAIN_NAME.match(name or ""):
        raise ConfigError(f"domain {name!r}: use lower-case letters, digits, '-' and '_' (starting with a letter "
                         "or digit, at most 63 characters), e.g. 'cell-3' or 'wrist_cam'")
    return name


def domain_for_source(source: str | Path) -> str:
    """A domain name derived from a dataset's folder name (or Hub repo id): lower-case, '-' for other characters."""
    name = re.sub(r"[^a-z0-9_-]+", "-", Path(str(source).rstrip("/")).name.lower()).strip("-_")[:63]
    return check_domain_name(name or "default")


def registration_path(home: str | Path, domain: str) -> Path:
    return resolve_home(home) / "domains" / f"{check_domain_name(domain)}.json"


def register_domain(home: str | Path, domain: str, source: str | Path | None = None, **ingest: object) -> Path:
    """Record where a domain's demonstrations are (plus ingest settings such as camera_key)."""
    entry: dict[str, object] = {"domain": check_domain_name(domain), "registered_at": time.time()}
    if source is not None:
        source = Path(source).expanduser()
        if not source.exists():
            raise DataError(f"domain {domain!r}: source {source} does not exist; give a LeRobot dataset root "
                                    "or a raw video folder")
        entry["source"] = str(source.resolve())
    entry.update({k: v for k, v in ingest.items() if v is not None})
    path = registration_path(home, domain)
    return atomic_write_bytes(path, (json.dumps(entry, indent=2, sort_keys=True) + "\n").encode())


def registration(home: str | Path, domain: str) -> dict:
    path = registration_path(home, domain)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); fix or delete it and register the domain again") from None


def record_refreshed_version(home: str | Path, domain: str, dataset_root: str | Path) -> Path:
    """Make a refreshed dataset version the domain's next demonstrations (the registered source is kept)."""
    entry = registration(home, domain) or {"domain": check_domain_name(domain)}
    entry.update(refreshed=str(Path(dataset_root).resolve()), refreshed_at=time.time())
    path = registration_path(home, domain)
    return atomic_write_bytes(path, (json.dumps(entry, indent=2, sort_keys=True) + "\n").encode())


def resolve_source(home: str | Path, inbox: str | Path, domain: str, configured: str | None,
                   follow_refreshed: bool = True) -> str:
    """Where the domain's demonstrations are: the configured source, its newest accepted refreshed version,
    the registered source, the inbox, or (the sample domain) the embedded sample dataset."""
    if configured:
        return configured
    entry = registration(home, domain)
    if follow_refreshed and entry.get("refreshed"):
        if not Path(entry["refreshed"]).is_dir():
            raise DataError(
                f"domain {domain!r}: its newest refreshed dataset version {entry['refreshed']} is gone; "
                f"set ingest.follow_refreshed: false, give ingest.source, or register the domain's source again "
                f"(flywheel domain add {domain} --source ...)")
        return str(entry["refreshed"])
    registered = entry.get("source")
    if registered:
        return str(registered)
    in_inbox = Path(inbox) / domain
    if in_inbox.exists():
        return str(in_inbox)
    if domain == SAMPLE_DOMAIN:
        return str(SAMPLE_DATASET)
    raise DataError(
        f"domain {domain!r} has no demonstrations: set ingest.source (e.g. --set ingest.source=/data/my_lerobot_dataset), "
        f"register it (flywheel domain add {domain} --source ...), or put a LeRobot dataset at {in_inbox}")


# ------------------------------------------------------------------------------------------ the inbox


@dataclasses.dataclass(frozen=True)
class InboxDataset:
    domain: str
    path: Path
    fingerprint: str     # changes when the dataset's metadata or any file size changes
    last_change: float   # newest mtime of any file (a copy still in progress is recent)


def scan_inbox(inbox: str | Path) -> tuple[list[InboxDataset], list[str]]:
    """LeRobot datasets in the inbox (folders with meta/info.json), and problems worth a log line."""
    inbox = Path(inbox)
    found: list[InboxDataset] = []
    problems: list[str] = []
    if not inbox.is_dir():
        return found, problems
    for folder in sorted(p for p in inbox.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (folder / "meta" / "info.json").is_file():
            problems.append(f"{folder}: no meta/info.json, not a LeRobot dataset (yet); skipped")
            continue
        if not DOMAIN_NAME.match(folder.name):
            problems.append(f"{folder}: {folder.name!r} is not a valid domain name (lower-case letters, digits, '-', "
                            "'_'); rename the folder")
            continue
        fingerprint, last_change = fingerprint_dataset(folder)
        found.append(InboxDataset(folder.name, folder.resolve(), fingerprint, last_change))
    return found, problems


def fingerprint_dataset(root: Path) -> tuple[str, float]:
    """Hash of the metadata files' contents and every file's path and size; and the newest mtime."""
    h = hashlib.sha256()
    newest = 0.0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        newest = max(newest, stat.st_mtime)
        rel = path.relative_to(root).as_posix()
        h.update(f"{rel}\0{stat.st_size}\0".encode())
        if rel.startswith("meta/") and stat.st_size < (8 << 20):
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16], newest
