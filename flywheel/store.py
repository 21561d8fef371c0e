"""The flywheel home: where everything the pipeline writes lives, immutable and content-addressed.

Layout: `<home>/<kind>/<key>/...` where `key` is a hash of the artifact's inputs and config.
An artifact is written into a temp directory next to its final place and renamed into place only
when complete, so a crash never leaves a half-written artifact that looks finished. An artifact
that exists is never rewritten: writing the same key again returns the existing one.

What a finished artifact holds besides its own files:
  .complete    its metadata (JSON); its presence is what "finished" means
  .files.json  the sha256 and size of every file at commit, so `verify` can tell a changed, missing or
               extra file from what was written

Processes that share a home coordinate through `flock` (released by the kernel when a process dies, so a
killed writer never leaves a lock behind):
  - every temp dir (`<kind>/.tmp-<key>-<rand>`) and scratch dir (`work/<kind>-<key>`) is locked by the
    process filling it; `sweep` removes the ones whose writer is gone;
  - `lock(kind, key)` / `build(kind, key, fn)` serialize the processes that want the same artifact: the
    second one waits, then reuses what the first wrote instead of computing it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flywheel.errors import ConfigError, IntegrityError

DEFAULT_HOME = Path(".flywheel")
HOME_ENV = "FLYWHEEL_HOME"
COMPLETE_MARKER = ".complete"
FILES_MANIFEST = ".files.json"
WRITER_FILE = ".writer.json"
# Bookkeeping files of the store itself: never part of an artifact's content.
STORE_FILES = frozenset({COMPLETE_MARKER, FILES_MANIFEST, WRITER_FILE})
LOCKS_DIR = ".locks"
WORK_DIR = "work"
# Top-level folders of the home that are not artifact kinds (their own tools manage them).
NOT_KINDS = frozenset({LOCKS_DIR, WORK_DIR, "mlflow", "dagster", "inbox", "reports"})
TMP_DIR = re.compile(r"^\.tmp-(?P<key>.+)-[0-9a-f]{8}$")
LEGACY_WORK_KINDS = {"train": "adapters"}  # work/train-<key> (before work dirs were named <kind>-<key>)

log = logging.getLogger(__name__)


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    """The flywheel home: the argument, else $FLYWHEEL_HOME, else ./.flywheel; always absolute."""
    chosen = home or os.environ.get(HOME_ENV) or DEFAULT_HOME
    path = Path(chosen).expanduser().resolve()
    for folder in (path, *path.parents):  # the nearest existing one decides whether the home can be made
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"{path}: cannot be the flywheel home, {folder} is a file, not a folder; give --home "
                                  f"(or ${HOME_ENV}) a folder")
            break
    return path


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_json(obj: Any) -> str:
    """Stable hash of JSON-able data (sorted keys, no whitespace)."""
    return hash_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def hash_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: str | os.PathLike) -> str:
    """Hash of a directory: relative paths and file contents, in sorted order (the store's own files excluded)."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in STORE_FILES):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(hash_file(path).encode())
    return h.hexdigest()


def short(digest: str, n: int = 16) -> str:
    return digest[:n]


def tree_size(path: str | os.PathLike) -> int:
    """Bytes a directory occupies (its files, links not followed); 0 when it is gone."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


# ----------------------------------------------------------------------------------------------- file manifests


def file_manifest(root: str | os.PathLike) -> dict[str, dict]:
    """{relative path: {"sha256", "size"}} of every file under `root` ({"symlink": target} for a link,
    which is recorded, not followed); the store's own files are left out."""
    root = Path(root)
    files: dict[str, dict] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        # os.walk lists a link to a directory among dirnames and does not descend into it: record it as a link.
        for name in sorted([*filenames, *(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))]):
            path = Path(dirpath) / name
            relative = path.relative_to(root).as_posix()
            if path.parent == root and name in STORE_FILES:
                continue
            if path.is_symlink():
                files[relative] = {"symlink": os.readlink(path)}
            else:
                files[relative] = {"sha256": hash_file(path), "size": path.stat().st_size}
    return dict(sorted(files.items()))


def write_file_manifest(root: str | os.PathLike) -> dict[str, dict]:
    files = file_manifest(root)
    body = {"algorithm": "sha256", "files": files}
    (Path(root) / FILES_MANIFEST).write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
    return files


def verify_dir(path: str | os.PathLike) -> int:
    """Re-hash an artifact directory against the manifest written at its commit; returns the number of files
    checked. IntegrityError names the first file (in path order) that changed, disappeared or appeared."""
    path = Path(path)
    record = path / FILES_MANIFEST
    if not record.is_file():
        if not path.is_dir():
            raise IntegrityError(f"{path}: not found; the artifact was deleted (rerun the stage that makes it)")
        raise IntegrityError(f"{record}: not found, so {path} cannot be verified (it was written before flywheel "
                             "recorded file digests, or the record was deleted); delete the folder and rerun the "
                             "stage that makes it")
    try:
        expected = json.loads(record.read_text())["files"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{record}: unreadable ({e}); delete {path} and rerun the stage that makes it") from None
    present = {relative for relative in _listing(path)}
    advice = f"the artifact changed after it was written; delete {path} and rerun the stage that makes it"
    for relative in sorted(set(expected) | present):
        file = path / relative
        if relative not in present:
            raise IntegrityError(f"{file}: missing; it was part of the artifact at commit ({advice})")
        if relative not in expected:
            raise IntegrityError(f"{file}: not part of the artifact at commit, added later ({advice})")
        want = expected[relative]
        if "symlink" in want:
            if not file.is_symlink() or os.readlink(file) != want["symlink"]:
                raise IntegrityError(f"{file}: was a link to {want['symlink']} at commit ({advice})")
            continue
        if file.is_symlink():
            raise IntegrityError(f"{file}: is now a link to {os.readlink(file)}, was a file at commit ({advice})")
        size = file.stat().st_size
        if size != want["size"]:
            raise IntegrityError(f"{file}: {size} bytes, {want['size']} at commit ({advice})")
        digest = hash_file(file)
        if digest != want["sha256"]:
            raise IntegrityError(f"{file}: sha256 {digest[:16]}…, {want['sha256'][:16]}… at commit ({advice})")
    return len(expected)


def _listing(root: Path) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*filenames, *(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))]:
            path = Path(dirpath) / name
            if path.parent == root and name in STORE_FILES:
                continue
            yield path.relative_to(root).as_posix()


# ----------------------------------------------------------------------------------------------- locks


def _writer_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}


def _read_writer(path: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text())
    return {}


def _describe_writer(record: dict) -> str:
    if not record:
        return "another process"
    return f"process {record.get('pid', '?')} on {record.get('host', '?')}"


class _KeyLocks:
    """Per-file exclusive locks that are reentrant within a process: flock conflicts between two open files
    of the same process, so each lock file is opened once and counted; a threading.RLock serializes threads."""

    def __init__(self):
        self._guard = threading.Lock()
        self._entries: dict[str, dict] = {}

    @contextlib.contextmanager
    def hold(self, path: Path, what: str, blocking: bool = True) -> Iterator[bool]:
        """Yields True once held; with `blocking=False`, yields False at once when another holds it."""
        with self._guard:
            entry = self._entries.setdefault(str(path), {"rlock": threading.RLock(), "count": 0, "fd": None})
        if not entry["rlock"].acquire(blocking=blocking):
            yield False
            return
        try:
            if entry["count"] == 0:
                entry["fd"] = _flock_exclusive(path, what, blocking)
                if entry["fd"] is None:
                    yield False
                    return
            entry["count"] += 1
            try:
                yield True
            finally:
                entry["count"] -= 1
                if entry["count"] == 0:
                    # Removed while still held, so the file never outlives its use; a waiter that opened it
                    # meanwhile sees it unlinked once it gets the lock and opens the path again.
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                    os.close(entry["fd"])  # closing the file releases the flock
                    entry["fd"] = None
        finally:
            entry["rlock"].release()


def _flock_exclusive(path: Path, what: str, blocking: bool = True) -> int | None:
    """An exclusive flock on `path` (created), as an open fd; waits (saying for whom) while another holds it,
    or returns None at once when not `blocking`."""
    warned = False
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                if not _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB):
                    log.warning("%s: file locks are not supported under %s; processes sharing this home will "
                                "not wait for each other", what, path.parent)
                    return fd
            except BlockingIOError:
                if not blocking:
                    os.close(fd)
                    return None
                if not warned:
                    log.warning("%s: %s is writing it; waiting for it to finish, then reusing it", what,
                                _describe_writer(_read_writer(path)))
                    warned = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fd).st_ino:  # the holder removed it on release: lock the new file instead
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_writer_record()).encode(), 0)
            return fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise


_KEY_LOCKS = _KeyLocks()


def _claim_dir(path: Path, *, exist_ok: bool) -> int:
    """Create (or open) a directory and hold a shared flock on it for as long as the returned fd is open.

    The sweeper removes a directory only while holding its exclusive lock; a directory it removed between
    our mkdir and our flock is detected (the path no longer leads to the inode we locked) and made again.
    Shared, so that the ranks of one multi-GPU job can hold the same scratch dir."""
    for _ in range(100):
        path.mkdir(parents=True, exist_ok=exist_ok)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        if not _flock(fd, fcntl.LOCK_SH):
            return fd  # no locks on this file system: the writer record alone tells the sweeper who wrote it
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise OSError(errno.EAGAIN, f"{path}: removed repeatedly while being created; is a sweep looping?")


def _flock(fd: int, operation: int) -> bool:
    """flock, or False on a file system without locks (some network and FUSE mounts); BlockingIOError passes."""
    try:
        fcntl.flock(fd, operation)
        return True
    except BlockingIOError:
        raise
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            log.debug("%s: no file locks here (%s)", fd, e)
            return False
        raise


def _try_lock_unused(path: Path) -> tuple[int | None, bool]:
    """(fd holding an exclusive flock, True) when no process holds the directory; (None, True) when one does;
    (fd, False) on a file system without locks, where only the writer record can tell."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None, True
    try:
        return fd, _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None, True


def process_alive_here(pid: int, host: str) -> bool:
    """Whether process `pid` of `host` is alive, judged from this host (another host's process: False)."""
    return _alive_here({"pid": pid, "host": host})


def _alive_here(writer: dict) -> bool:
    """Whether a writer record names a live process of this host."""
    if writer.get("host") != socket.gethostname() or not isinstance(writer.get("pid"), int):
        return False
    try:
        os.kill(writer["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------- the store


@dataclasses.dataclass
class Swept:
    """A leftover directory: removed (or kept, with the reason) by `ArtifactStore.sweep`."""

    path: Path
    bytes: int
    reason: str
    goes: bool      # removed (or, in a dry run, would be); False: kept, `reason` says why


class ArtifactStore:
    """Immutable, content-addressed directories under the flywheel home."""

    def __init__(self, home: str | os.PathLike | None = None):
        self.home = resolve_home(home)

    def path(self, kind: str, key: str) -> Path:
        return self.home / kind / key

    def exists(self, kind: str, key: str) -> bool:
        return (self.path(kind, key) / COMPLETE_MARKER).is_file()

    def meta(self, kind: str, key: str) -> dict:
        return json.loads((self.path(kind, key) / COMPLETE_MARKER).read_text())

    # --- writing --------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def write(self, kind: str, key: str, meta: dict | None = None) -> Iterator[Path]:
        """Yield a temp dir to fill; on success it is renamed to `<home>/<kind>/<key>`.

        If the artifact already exists the caller should not have asked; use `exists` first, or `build` /
        `get_or_create`, which also wait for another process writing the same key. `meta` is written as the
        artifact's metadata on completion, so a caller may fill the dict inside the block (metrics known
        only after the work). On any exception the temp dir is removed; if the process is killed instead,
        the temp dir's lock dies with it and the next `sweep` removes it.
        """
        final = self.path(kind, key)
        if self.exists(kind, key):
            raise FileExistsError(f"artifact {kind}/{key} already exists at {final}; artifacts are immutable")
        final.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
            try:
                fd = _claim_dir(tmp, exist_ok=False)
                break
            except FileExistsError:
                continue
        try:
            (tmp / WRITER_FILE).write_text(json.dumps(_writer_record()))
            yield tmp
            (tmp / WRITER_FILE).unlink(missing_ok=True)
            write_file_manifest(tmp)
            (tmp / COMPLETE_MARKER).write_text(json.dumps(meta or {}, sort_keys=True, default=str))
            try:
                os.rename(tmp, final)
            except OSError:
                # Another writer finished the same key first: same inputs, same content; keep theirs.
                if not self.exists(kind, key):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def lock(self, kind: str, key: str) -> Iterator[None]:
        """Hold the artifact's key: another process (or thread) asking for the same key waits until this one
        leaves the block. Check `exists` inside it, so the second one reuses what the first wrote. Reentrant."""
        with _KEY_LOCKS.hold(self.home / LOCKS_DIR / kind / f"{key}.lock", f"{kind}/{key}"):
            yield

    @contextlib.contextmanager
    def try_lock(self, kind: str, key: str) -> Iterator[bool]:
        """Like `lock`, without waiting: yields whether the key is now held (False: another process has it)."""
        with _KEY_LOCKS.hold(self.home / LOCKS_DIR / kind / f"{key}.lock", f"{kind}/{key}", blocking=False) as held:
            yield held

    def build(self, kind: str, key: str, fn: Callable[[Path], Any], meta: dict | None = None) -> tuple[Path, bool]:
        """The artifact's path and whether it was reused: `fn(tmp_dir)` fills it unless it exists; a process
        asking for the same key meanwhile waits and reuses it."""
        with self.lock(kind, key):
            if self.exists(kind, key):
                return self.path(kind, key), True
            with self.write(kind, key, meta) as tmp:
                fn(tmp)
            return self.path(kind, key), False

    def get_or_create(self, kind: str, key: str, build, meta: dict | None = None) -> Path:
        """Return the artifact's path, calling `build(tmp_dir)` to create it if it does not exist."""
        return self.build(kind, key, build, meta)[0]

    def work_path(self, kind: str, key: str) -> Path:
        return self.home / WORK_DIR / f"{kind}-{key}"

    @contextlib.contextmanager
    def working(self, kind: str, key: str) -> Iterator[Path]:
        """A scratch dir `<home>/work/<kind>-<key>` for work that outlives one attempt (training checkpoints a
        rerun resumes from), held by this process while inside the block.

        Removed at exit once the artifact exists, and when the block fails leaving it empty; a failed block
        that left files (checkpoints) keeps them for the next attempt. `sweep` removes such a dir once its
        artifact exists or it has been untouched for `work_max_age_s`; `flywheel gc` removes it when its
        writer is gone."""
        path = self.work_path(kind, key)
        fd = _claim_dir(path, exist_ok=True)
        try:
            (path / WRITER_FILE).write_text(json.dumps(_writer_record()))
            try:
                yield path
            except BaseException:
                # the ranks of one multi-process job share the dir: another rank may have removed it already
                with contextlib.suppress(FileNotFoundError):
                    if not any(p.name != WRITER_FILE for p in path.iterdir()):
                        shutil.rmtree(path, ignore_errors=True)
                raise
            if self.exists(kind, key):
                shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)

    # --- checking -------------------------------------------------------------------------------------------

    def verify(self, kind: str, key: str) -> int:
        """Re-hash `<kind>/<key>` against its commit record (see `verify_dir`); returns the files checked."""
        path = self.path(kind, key)
        if not self.exists(kind, key):
            raise IntegrityError(f"{path}: no finished artifact {kind}/{key} here (no {COMPLETE_MARKER}); "
                                 "rerun the stage that makes it")
        return verify_dir(path)

    # --- listing and cleaning -------------------------------------------------------------------------------

    def kinds(self) -> list[str]:
        if not self.home.is_dir():
            return []
        return sorted(p.name for p in self.home.iterdir() if p.is_dir() and p.name not in NOT_KINDS
                      and not p.name.startswith("."))

    def artifacts(self, kind: str) -> list[str]:
        """Keys of the finished artifacts of one kind."""
        folder = self.home / kind
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and (p / COMPLETE_MARKER).is_file())

    def sweep(self, *, work_max_age_s: float | None = 7 * 86400, foreign_max_age_s: float = 86400,
              dry_run: bool = False) -> list[Swept]:
        """Remove what writers that are gone left behind; returns every leftover found (removed or kept).

        - `<kind>/.tmp-*`: a temp dir whose writer's lock is free was never finished: removed.
        - `work/<kind>-<key>`: a scratch dir whose writer is gone is removed when its artifact exists, when it
          holds nothing, or when untouched for `work_max_age_s` (None: always); otherwise it is kept, since
          it holds checkpoints the next attempt resumes from.
        A writer on another host (recorded in the dir) is trusted to be alive for `foreign_max_age_s`, in
        case the file system's locks do not reach across hosts. Live writers' dirs are never touched.
        """
        found: list[Swept] = []
        for kind in self.kinds():
            for entry in sorted((self.home / kind).iterdir()):
                match = TMP_DIR.match(entry.name)
                if match and entry.is_dir():
                    found += self._sweep_one(entry, "unfinished temp dir of a writer that is gone", True,
                                             foreign_max_age_s, dry_run)
        work = self.home / WORK_DIR
        if work.is_dir():
            for entry in sorted(work.iterdir()):
                if not entry.is_dir():
                    continue
                reason, remove = self._work_verdict(entry, work_max_age_s)
                found += self._sweep_one(entry, reason, remove, foreign_max_age_s, dry_run)
        return found

    def _work_verdict(self, path: Path, max_age_s: float | None) -> tuple[str, bool]:
        kind, _, key = path.name.rpartition("-")
        kind = LEGACY_WORK_KINDS.get(kind, kind)
        if kind and self.exists(kind, key):
            return f"scratch dir of {kind}/{key}, which is finished", True
        contents = [p for p in path.rglob("*") if p.name != WRITER_FILE]
        if not contents:
            return "empty scratch dir", True
        age = time.time() - max(p.lstat().st_mtime for p in contents)
        if max_age_s is None or age > max_age_s:
            return f"scratch dir untouched for {age / 86400:.1f} days (its artifact was never finished)", True
        return f"resumable: checkpoints of {kind}/{key} (untouched for {age / 3600:.1f} h), kept", False

    def _sweep_one(self, path: Path, reason: str, remove: bool, foreign_max_age_s: float, dry_run: bool) -> list[Swept]:
        fd, locks = _try_lock_unused(path)
        if fd is None:
            return []  # its writer is alive
        try:
            writer = _read_writer(path / WRITER_FILE)
            if not locks and (not writer or _alive_here(writer)):
                return []
            if writer.get("host") not in (None, socket.gethostname()):
                if time.time() - float(writer.get("started", 0)) < foreign_max_age_s:
                    return []
            size = tree_size(path)
            if remove and not dry_run:
                shutil.rmtree(path, ignore_errors=True)
            return [Swept(path, size, reason, remove)]
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path beside `path` to write a single file to (a stream, an encoder); renamed onto `path` when the
    block succeeds, removed when it fails: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a single file via temp + rename (for files outside the artifact store)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
