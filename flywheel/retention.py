"""What `flywheel gc` may delete from a home: lineage-aware retention of the artifact store.

Kept, with everything they depend on:
  - every adapter the MLflow registry still needs: each domain's champion and candidate, and the earlier
    champions a rollback can return to; and the iteration that made each of them (its evaluation, synthetic
    videos, labels, curated set and refreshed dataset: the evidence behind the gate and the data it produced);
  - the newest `keep_datasets` dataset versions of each domain (refreshed versions, converted v2.1 inputs);
  - whatever an iteration that is still running made or reused (its MLflow step runs' products), and
    everything finished since the earliest running iteration started;
  - anything finished in the last `min_age_s` seconds (a safety margin for runs that record nothing), and
    anything another process holds (its key is locked) when the deletion comes.

"Depends on" follows what the artifacts record: an adapter its latent cache (`latent_cache`), a latent cache
its clips (`clip_set_path`), clips their manifest (`manifest_key`), a manifest the dataset it reads
(`dataset_root`), synthetic videos their adapter, labels their videos and inverse-dynamics model, a curated set
its labels, ... (every path or key of another artifact in an artifact's metadata or its link files). A dataset
version's base version is not followed: each version is self-contained (its provenance names its base), or no
dataset could ever go.

Everything else goes: old iterations' clips, caches, adapters, evaluations, generations and versions, a deleted
version's usefulness report, and what killed writers left (temp and scratch dirs, see ArtifactStore.sweep).

    plan(home) -> Plan   # what would go, with sizes and reasons; what stays and why
    apply(home) -> Removal   # deletes (each artifact under its key lock), reports the bytes freed

The MLflow records are read with flywheel.lineage (registry aliases and history, runs); without a lineage store
in the home nothing is registered, so only the dataset and age rules keep anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from flywheel.errors import ConfigError
from flywheel.store import COMPLETE_MARKER, ArtifactStore, Swept, hash_tree, tree_size

# Small JSON files in an artifact that name the artifacts it was made from.
LINK_FILES = ("manifest.json", "clipset.json", "cache.json", "labels.json", "curated.json", "synthetic.json",
              "adapter_card.json")
REPORTS = Path("reports") / "usefulness"  # <home>/reports/usefulness/<dataset version>: one per refreshed version
HEX_KEY = re.compile(r"^[0-9a-f]{16,64}$")


@dataclasses.dataclass
class Policy:
    keep_datasets: int = 3        # newest dataset versions kept per domain
    min_age_s: float = 3600.0     # artifacts younger than this always stay

    def __post_init__(self):
        if isinstance(self.keep_datasets, bool) or not isinstance(self.keep_datasets, int) or self.keep_datasets < 0:
            raise ConfigError(f"keep_datasets={self.keep_datasets!r} (`flywheel gc --keep-datasets N`): keep 0 or more "
                              "dataset versions per domain")
        if not isinstance(self.min_age_s, (int, float)) or not math.isfinite(self.min_age_s) or self.min_age_s < 0:
            raise ConfigError(f"min_age_s={self.min_age_s!r} (`flywheel gc --min-age-hours H`, in hours there): give a "
                              "finite age of 0 or more")


@dataclasses.dataclass
class Doomed:
    """Something `apply` deletes."""

    kind: str
    key: str
    path: Path
    bytes: int
    reason: str

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.key}"


@dataclasses.dataclass
class Plan:
    home: Path
    remove: list[Doomed]
    kept: dict[str, str]          # "kind/key" -> why it stays
    leftovers: list[Swept]        # temp/scratch dirs of writers that are gone (removed by apply)
    notes: list[str]              # what the plan could not see (e.g. no lineage store)

    @property
    def bytes(self) -> int:
        return sum(d.bytes for d in self.remove) + sum(s.bytes for s in self.leftovers)

    def lines(self) -> list[str]:
        """A table a person reads: one line per thing that goes, then the total."""
        rows = [f"{d.bytes / 1e6:10.1f} MB  {d.name:<40}  {d.reason}" for d in self.remove]
        rows += [f"{s.bytes / 1e6:10.1f} MB  {s.path.relative_to(self.home).as_posix():<40}  {s.reason}"
                 for s in self.leftovers]
        rows.append(f"{self.bytes / 1e6:10.1f} MB  in {len(self.remove)} artifact(s) and {len(self.leftovers)} "
                    f"leftover dir(s); {len(self.kept)} artifact(s) kept")
        return rows + [f"note: {n}" for n in self.notes]


@dataclasses.dataclass
class Removal:
    freed_bytes: int
    removed: list[str]            # "kind/key" or leftover paths
    skipped: dict[str, str]       # "kind/key" -> why it was left (in use, or needed after all)


# ----------------------------------------------------------------------------------------------- the home's artifacts


@dataclasses.dataclass
class Artifact:
    kind: str
    key: str
    path: Path
    finished: float               # when it was committed (its marker's mtime)
    meta: dict


def artifacts(store: ArtifactStore) -> dict[str, Artifact]:
    """Every finished artifact of the home, by "kind/key"."""
    found = {}
    for kind in store.kinds():
        for key in store.artifacts(kind):
            path = store.path(kind, key)
            marker = path / COMPLETE_MARKER
            try:
                meta = json.loads(marker.read_text())
            except (OSError, ValueError):
                meta = {}
            found[f"{kind}/{key}"] = Artifact(kind, key, path, marker.stat().st_mtime, meta)
    return found


def upstream(artifact: Artifact, everything: dict[str, Artifact]) -> set[str]:
    """The artifacts this one records as its inputs: any path `.../<kind>/<key>` or bare key of another artifact
    found in its metadata or link files. A dataset's base version is not an input (see the module doc)."""
    if artifact.kind == "datasets":
        return set()
    texts: list[str] = []
    _strings(artifact.meta, texts)
    for name in LINK_FILES:
        file = artifact.path / name
        if file.is_file() and file.stat().st_size < 1 << 20:
            try:
                _strings(json.loads(file.read_text()), texts)
            except ValueError:
                continue
    by_key = {a.key: name for name, a in everything.items()}
    found = set()
    for text in texts:
        candidate = None
        if HEX_KEY.match(text):
            candidate = by_key.get(text)
        elif os.sep in text:
            # A path to `<kind>/<key>[/file]`, whatever home it was written in (a home may be copied or moved).
            parts = Path(text).parts
            candidate = next((f"{a}/{b}" for a, b in zip(parts, parts[1:]) if f"{a}/{b}" in everything), None)
        if candidate and candidate != f"{artifact.kind}/{artifact.key}":
            found.add(candidate)
    return found


def _strings(value, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for v in value.values():
            _strings(v, out)
    elif isinstance(value, list):
        for v in value:
            _strings(v, out)


# ----------------------------------------------------------------------------------------------- what the records say


@dataclasses.dataclass
class Iteration:
    domain: str
    status: str                   # RUNNING | FINISHED | FAILED | KILLED | RECORDED (a record file only)
    started: float                # seconds since the epoch
    produced: set[str]            # artifact keys its stages produced or reused


@dataclasses.dataclass
class Records:
    adapters: dict[str, str]      # adapter "kind/key" (or "digest:<sha>") -> why the registry needs it
    iterations: list[Iteration]
    notes: list[str]


def read_records(home: Path) -> Records:
    """Registry aliases and history, and iterations, from MLflow (if the home has a lineage store) and from the
    iteration record files `<home>/iterations/<domain>/*.json`."""
    records = Records({}, _iteration_files(home), [])
    try:
        from flywheel.lineage import registry, tracking
    except ImportError:
        records.notes.append("flywheel.lineage is not installed: no adapter is protected by the registry")
        return records
    uri = tracking.tracking_uri(home)
    if uri.startswith("sqlite:") and not (tracking.mlflow_dir(home) / tracking.DB_FILE).is_file():
        records.notes.append("no MLflow store in this home: no adapter is registered")
        return records
    from flywheel.lineage.recorder import TAG_ADAPTER_PATH

    client = tracking.client(home)
    stacks: dict[str, list[str]] = {}
    for row in registry.list_adapters(home):
        domain, version = row["domain"], row["version"]
        why = [a for a in row["aliases"] if a in (registry.CHAMPION, registry.CANDIDATE)]
        if domain not in stacks:
            stacks[domain] = registry.champion_stack(home, domain)
        if version in stacks[domain][:-1]:
            why.append("an earlier champion (rollback target)")
        if not why:
            continue
        reason = f"{tracking.registered_model_name(domain)} v{version}: {', '.join(why)}"
        tags = client.get_model_version(tracking.registered_model_name(domain), version).tags
        stored = tags.get(TAG_ADAPTER_PATH, "")
        if stored and Path(stored).parent.name == "adapters":  # recorded in this home, or before it moved
            records.adapters[f"adapters/{Path(stored).name}"] = reason
        if tags.get(registry.TAG_ADAPTER_DIGEST):
            records.adapters[f"digest:{tags[registry.TAG_ADAPTER_DIGEST]}"] = reason
    experiments = tracking.flywheel_experiment_ids(client)
    if experiments:
        iterations = {}
        for run in client.search_runs(experiments, f"tags.`{tracking.TAG_KIND}` = 'iteration'", max_results=50000):
            iterations[run.info.run_id] = Iteration(run.data.tags.get(tracking.TAG_DOMAIN, ""), run.info.status,
                                                    run.info.start_time / 1000, set())
        for run in client.search_runs(experiments, f"tags.`{tracking.TAG_KIND}` = 'step'", max_results=50000):
            parent = iterations.get(run.data.tags.get(tracking.TAG_PARENT_RUN, ""))
            if parent is not None:
                parent.produced |= {v for k, v in run.data.tags.items() if k.startswith("flywheel.produces.")}
        records.iterations += list(iterations.values())
    return records


def _iteration_files(home: Path) -> list[Iteration]:
    found = []
    for file in sorted((home / "iterations").glob("*/*.json")):
        try:
            record = json.loads(file.read_text())
            produced = {str(stage["key"]) for stage in record.get("stages", {}).values() if stage.get("key")}
        except (OSError, ValueError, AttributeError, TypeError):
            continue
        found.append(Iteration(str(record.get("domain", file.parent.name)), "RECORDED", file.stat().st_mtime, produced))
    return found


# ----------------------------------------------------------------------------------------------- the plan


def plan(home: str | os.PathLike | None = None, policy: Policy | None = None) -> Plan:
    """What `apply` would delete now, and why everything else stays; deletes nothing."""
    policy = policy or Policy()
    store = ArtifactStore(home)
    everything = artifacts(store)
    records = read_records(store.home)
    kept: dict[str, str] = {}
    for name, why in [*_registry_roots(everything, records), *_running_roots(everything, records),
                      *_dataset_roots(everything, records, policy), *_young_roots(everything, policy)]:
        kept.setdefault(name, why)
    frontier = list(kept)  # what the kept ones depend on
    while frontier:
        name = frontier.pop()
        for dependency in upstream(everything[name], everything):
            if dependency not in kept:
                kept[dependency] = f"an input of {name}"
                frontier.append(dependency)
    remove = [Doomed(a.kind, a.key, a.path, tree_size(a.path), _why_it_goes(a))
              for name, a in sorted(everything.items()) if name not in kept]
    remove += _reports_that_go(store.home, everything, {d.key for d in remove if d.kind == "datasets"})
    leftovers = [s for s in store.sweep(work_max_age_s=None, dry_run=True) if s.goes]
    return Plan(store.home, remove, kept, leftovers, records.notes)


def _registry_roots(everything: dict[str, Artifact], records: Records) -> list[tuple[str, str]]:
    """The registry's adapters (found by the path recorded at registration, else by their content digest), and
    every artifact of the iterations that made them."""
    digests = {}
    if any(ref.startswith("digest:") for ref in records.adapters):
        digests = {f"digest:{hash_tree(a.path)}": name for name, a in everything.items() if a.kind == "adapters"}
    needed = {}
    for ref, why in records.adapters.items():
        name = digests.get(ref, ref)
        if name in everything:
            needed.setdefault(name, why)
    roots = list(needed.items())
    by_key = {a.key: name for name, a in everything.items()}
    for iteration in records.iterations:
        made = {by_key[k] for k in iteration.produced if k in by_key}
        if adapters := sorted(made & set(needed)):
            roots += [(name, f"made by the iteration of {needed[adapters[0]]}") for name in sorted(made)]
    return roots


def _running_roots(everything: dict[str, Artifact], records: Records) -> list[tuple[str, str]]:
    """What running iterations produced or reused so far, and everything finished since the earliest began."""
    running = [i for i in records.iterations if i.status == "RUNNING"]
    records.notes += [f"an iteration of {i.domain or 'a domain'} started {time.ctime(i.started)} is RUNNING: what it "
                      "made or reused, and everything finished since, stays" for i in running]
    by_key = {a.key: name for name, a in everything.items()}
    roots = [(by_key[key], f"used by a running iteration of {i.domain or 'a domain'}")
             for i in running for key in sorted(i.produced) if key in by_key]
    if running:
        since = min(i.started for i in running)
        roots += [(name, "finished while an iteration is running") for name, a in everything.items()
                  if a.finished >= since]
    return roots


def _dataset_roots(everything: dict[str, Artifact], records: Records, policy: Policy) -> list[tuple[str, str]]:
    roots = []
    for domain, names in _datasets_by_domain(everything, records).items():
        newest = sorted(names, key=lambda n: everything[n].finished, reverse=True)[:policy.keep_datasets]
        roots += [(name, f"dataset version {rank} of the {policy.keep_datasets} newest of {domain}")
                  for rank, name in enumerate(newest, 1)]
    return roots


def _young_roots(everything: dict[str, Artifact], policy: Policy) -> list[tuple[str, str]]:
    now = time.time()
    return [(name, f"finished {(now - a.finished) / 60:.0f} min ago (younger than min_age_s)")
            for name, a in everything.items() if now - a.finished < policy.min_age_s]


def _reports_that_go(home: Path, everything: dict[str, Artifact], doomed_versions: set[str]) -> list[Doomed]:
    reports = home / REPORTS
    if not reports.is_dir():
        return []
    gone = []
    for report in sorted(p for p in reports.iterdir() if p.is_dir()):
        if report.name in doomed_versions or f"datasets/{report.name}" not in everything:
            fate = "which goes" if report.name in doomed_versions else "which is gone"
            gone.append(Doomed("reports/usefulness", report.name, report, tree_size(report),
                               f"usefulness report of dataset version {report.name}, {fate}"))
    return gone


def _why_it_goes(artifact: Artifact) -> str:
    if artifact.kind == "datasets":
        return "an older dataset version, not read by any kept artifact"
    if artifact.kind == "adapters":
        return "no champion, candidate or rollback target, nor an input of one"
    return "not part of a kept adapter's or dataset's lineage, nor of a running iteration"


def _datasets_by_domain(everything: dict[str, Artifact], records: Records) -> dict[str, list[str]]:
    """Dataset versions grouped by domain: the domain of the iteration that refreshed them, else the external
    dataset their chain of base versions starts from."""
    domain_of_key = {}
    for iteration in records.iterations:
        for key in iteration.produced:
            domain_of_key.setdefault(key, iteration.domain)
    groups: dict[str, list[str]] = {}
    for name, artifact in everything.items():
        if artifact.kind != "datasets":
            continue
        domain = domain_of_key.get(artifact.key) or f"source {_chain_root(artifact, everything)}"
        groups.setdefault(domain, []).append(name)
    return groups


def _chain_root(artifact: Artifact, everything: dict[str, Artifact]) -> str:
    seen = set()
    while True:
        base = str(artifact.meta.get("base_root") or artifact.meta.get("source") or "")
        parent = Path(base)
        name = f"datasets/{parent.name}"
        if parent.parent.name == "datasets" and name in everything and name not in seen:
            seen.add(name)
            artifact = everything[name]
            continue
        return base or artifact.key


# ----------------------------------------------------------------------------------------------- deleting


def apply(home: str | os.PathLike | None = None, policy: Policy | None = None) -> Removal:
    """Delete what `plan` lists right now. Each artifact is deleted under its key lock (one another process
    holds is left), by a rename out of sight first, so a reader never sees half of it."""
    current = plan(home, policy)
    store = ArtifactStore(home)
    freed, removed, skipped = 0, [], {}
    for doomed in current.remove:
        if doomed.kind == "reports/usefulness":
            freed += _delete(doomed.path, doomed.path.parent)
            removed.append(doomed.name)
            continue
        with store.try_lock(doomed.kind, doomed.key) as held:
            if not held:
                skipped[doomed.name] = "another process holds it"
                continue
            freed += _delete(doomed.path, doomed.path.parent, doomed.key)
            removed.append(doomed.name)
    for swept in store.sweep(work_max_age_s=None):
        if swept.goes:
            freed += swept.bytes
            removed.append(swept.path.relative_to(store.home).as_posix())
    return Removal(freed, removed, skipped)


def _delete(path: Path, folder: Path, key: str | None = None) -> int:
    size = tree_size(path)
    hidden = folder / f".tmp-{key or path.name}-{uuid.uuid4().hex[:8]}"  # sweep finishes it if we are killed
    try:
        os.rename(path, hidden)
    except FileNotFoundError:
        return 0
    shutil.rmtree(hidden, ignore_errors=True)
    return size
