"""The flywheel home: where everything the pipeline writes lives, immutable and content-addressed.

Layout: `<home>/<kind>/<key>/...` where `key` is a hash of the artifact's inputs and config.
An artifact is written into a temp directory next to its final place and renamed into place only
when complete, so a crash never leaves a half-written artifact that looks finished. An artifact
that exists is never rewritten: writing the same key again returns the existing one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_HOME = Path(".flywheel")
HOME_ENV = "FLYWHEEL_HOME"
COMPLETE_MARKER = ".complete"


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    """The flywheel home: the argument, else $FLYWHEEL_HOME, else ./.flywheel; always absolute."""
    chosen = home or os.environ.get(HOME_ENV) or DEFAULT_HOME
    return Path(chosen).expanduser().resolve()


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
    """Hash of a directory: relative paths and file contents, in sorted order (markers excluded)."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(hash_file(path).encode())
    return h.hexdigest()


def short(digest: str, n: int = 16) -> str:
    return digest[:n]


class ArtifactStore:
    """Immutable, content-addressed directories under the flywheel home."""

    def __init__(self, home: str | os.PathLike | None = None):
        self.home = resolve_home(home)

    def path(self, kind: str, key: str) -> Path:
        return self.home / kind / key

    def exists(self, kind: str, key: str) -> bool:
        return (self.path(kind, key) / COMPLETE_MARKER).is_file()

    @contextlib.contextmanager
    def write(self, kind: str, key: str, meta: dict | None = None) -> Iterator[Path]:
        """Yield a temp dir to fill; on success it is renamed to `<home>/<kind>/<key>`.

        If the artifact already exists the caller should not have asked; use `exists` first or
        `get_or_create`. `meta` is written as the artifact's metadata on completion, so a caller may
        fill the dict inside the block (metrics known only after the work). On any exception the temp dir is removed and nothing is left behind.
        """
        final = self.path(kind, key)
        if self.exists(kind, key):
            raise FileExistsError(f"artifact {kind}/{key} already exists at {final}; artifacts are immutable")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
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

    def get_or_create(self, kind: str, key: str, build, meta: dict | None = None) -> Path:
        """Return the artifact's path, calling `build(tmp_dir)` to create it if it does not exist."""
        if not self.exists(kind, key):
            with self.write(kind, key, meta) as tmp:
                build(tmp)
        return self.path(kind, key)

    def meta(self, kind: str, key: str) -> dict:
        return json.loads((self.path(kind, key) / COMPLETE_MARKER).read_text())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a single file via temp + rename (for files outside the artifact store)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
