"""The artifact store: immutable, content-addressed, never half-written, verified, shared safely by processes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flywheel.errors import IntegrityError
from flywheel.store import FILES_MANIFEST, ArtifactStore, hash_json, hash_tree, verify_dir


def test_write_renames_into_place_and_records_meta(tmp_path):
    store = ArtifactStore(tmp_path)
    meta = {}
    with store.write("things", "abc", meta) as tmp:
        (tmp / "a.txt").write_text("hello")
        meta["count"] = 1  # filled after the work, written on completion
    assert store.exists("things", "abc")
    assert (store.path("things", "abc") / "a.txt").read_text() == "hello"
    assert store.meta("things", "abc") == {"count": 1}
    assert [p.name for p in (tmp_path / "things").iterdir()] == ["abc"]


def test_crash_mid_write_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with store.write("things", "abc") as tmp:
            (tmp / "partial.bin").write_bytes(b"x" * 10)
            raise RuntimeError("boom")
    assert not store.exists("things", "abc")
    assert list((tmp_path / "things").iterdir()) == []


def test_artifacts_are_immutable(tmp_path):
    store = ArtifactStore(tmp_path)
    store.get_or_create("things", "k", lambda d: (d / "v").write_text("1"))
    calls = []
    store.get_or_create("things", "k", lambda d: calls.append(d))
    assert calls == []  # existing artifact reused, builder not called
    with pytest.raises(FileExistsError, match="immutable"):
        with store.write("things", "k"):
            pass


def test_hashes_are_content_based(tmp_path):
    assert hash_json({"a": 1, "b": [1, 2]}) == hash_json({"b": [1, 2], "a": 1})
    assert hash_json({"a": 1}) != hash_json({"a": 2})
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("one")
    h1 = hash_tree(tmp_path / "x")
    (tmp_path / "x" / "f").write_text("two")
    assert hash_tree(tmp_path / "x") != h1


def test_home_resolution(tmp_path, monkeypatch):
    from flywheel.store import resolve_home

    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "h"))
    assert resolve_home() == (tmp_path / "h").resolve()
    assert resolve_home(tmp_path / "other") == (tmp_path / "other").resolve()
    monkeypatch.delenv("FLYWHEEL_HOME")
    monkeypatch.chdir(tmp_path)
    assert resolve_home() == (tmp_path / ".flywheel").resolve()


# ----------------------------------------------------------------------------------------------- integrity


def _adapter_like(store, key="k"):
    def fill(tmp):
        (tmp / "weights.safetensors").write_bytes(b"\x01" * 1000)
        (tmp / "card.json").write_text('{"rank": 4}')
        (tmp / "sub").mkdir()
        (tmp / "sub" / "loss.csv").write_text("step,loss\n1,0.5\n")
    return store.get_or_create("adapters", key, fill)


def test_commit_records_every_file_digest_and_verify_accepts_the_untouched_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    path = _adapter_like(store)
    record = json.loads((path / FILES_MANIFEST).read_text())["files"]
    assert sorted(record) == ["card.json", "sub/loss.csv", "weights.safetensors"]
    assert record["weights.safetensors"]["size"] == 1000
    assert store.verify("adapters", "k") == 3
    assert hash_tree(path) == hash_tree(path)  # the record itself is not content
    # The tree hash ignores the store's own files, so it is what it was before they existed.
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("weights.safetensors", "card.json"):
        (copy / name).write_bytes((path / name).read_bytes())
    (copy / "sub").mkdir()
    (copy / "sub" / "loss.csv").write_bytes((path / "sub" / "loss.csv").read_bytes())
    assert hash_tree(copy) == hash_tree(path)


@pytest.mark.parametrize("tamper, named, problem", [
    (lambda p: (p / "weights.safetensors").write_bytes(b"\x02" * 1000), "weights.safetensors", "sha256"),
    (lambda p: (p / "weights.safetensors").write_bytes(b"\x80\x04pickle"), "weights.safetensors", "bytes"),
    (lambda p: (p / "sub" / "loss.csv").unlink(), "sub/loss.csv", "missing"),
    (lambda p: (p / "extra.pt").write_bytes(b"x"), "extra.pt", "added later"),
    (lambda p: ((p / "card.json").unlink(), (p / "card.json").symlink_to("/etc/hostname")), "card.json", "link"),
])
def test_verify_names_the_first_file_that_changed(tmp_path, tamper, named, problem):
    store = ArtifactStore(tmp_path)
    path = _adapter_like(store)
    tamper(path)
    with pytest.raises(IntegrityError, match=problem) as caught:
        store.verify("adapters", "k")
    assert str(path / named) in str(caught.value) and "rerun the stage" in str(caught.value)


def test_verify_refuses_an_artifact_without_a_record(tmp_path):
    store = ArtifactStore(tmp_path)
    path = _adapter_like(store)
    (path / FILES_MANIFEST).unlink()
    with pytest.raises(IntegrityError, match="cannot be verified"):
        verify_dir(path)
    with pytest.raises(IntegrityError, match="no finished artifact"):
        store.verify("adapters", "other")


# ----------------------------------------------------------------------------------------------- processes

WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from flywheel.store import ArtifactStore
    home, mode, key = sys.argv[1:4]
    store = ArtifactStore(home)
    if mode == "hang-in-write":
        with store.write("adapters", key) as tmp:
            (tmp / "partial.bin").write_bytes(b"x" * 4096)
            print("inside", flush=True)
            time.sleep(600)
    elif mode == "hang-in-work":
        with store.working("adapters", key) as work:
            (work / "checkpoint-100").mkdir()
            (work / "checkpoint-100" / "state.pt").write_bytes(b"y" * 100)
            print("inside", flush=True)
            time.sleep(600)
    elif mode == "build":
        def fill(tmp):
            with open(Path(home) / "computed.log", "a") as log:
                log.write(f"{key}\\n")
            time.sleep(1.5)
            (tmp / "adapter.bin").write_bytes(b"z" * 100)
        print("ready", flush=True)
        path, reused = store.build("adapters", key, fill)
        print(f"done {path} reused={reused}", flush=True)
""")


def _start(home, mode, key="k1"):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(home), mode, key], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    return proc


def _wait_for(proc, word):
    line = proc.stdout.readline()
    assert word in line, (line, proc.stderr.read() if proc.poll() is not None else "")


def test_sweep_removes_what_killed_writers_left_and_spares_live_ones(tmp_path):
    store = ArtifactStore(tmp_path)
    killed_write, killed_work = _start(tmp_path, "hang-in-write", "a"), _start(tmp_path, "hang-in-work", "b")
    live = _start(tmp_path, "hang-in-write", "c")
    try:
        for proc in (killed_write, killed_work, live):
            _wait_for(proc, "inside")
        for proc in (killed_write, killed_work):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        tmps = sorted(p.name for p in (tmp_path / "adapters").iterdir())
        assert len(tmps) == 2 and all(t.startswith(".tmp-") for t in tmps)

        # A killed run's checkpoints are kept for the rerun to resume from ...
        swept = store.sweep()
        assert [(s.path.name.split("-")[1], s.goes) for s in swept] == [("a", True), ("b", False)]
        assert "resumable" in swept[1].reason and swept[0].bytes >= 4096
        assert [p.name for p in (tmp_path / "adapters").iterdir()][0].startswith(".tmp-c-")  # the live writer's
        assert (tmp_path / "work" / "adapters-b" / "checkpoint-100" / "state.pt").is_file()
        # ... until the artifact exists, or gc asks for every dead writer's scratch dir.
        assert [s.goes for s in store.sweep(work_max_age_s=None)] == [True]
        assert not (tmp_path / "work" / "adapters-b").exists()
        assert live.poll() is None and store.sweep() == []
    finally:
        for proc in (killed_write, killed_work, live):
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    assert [s.reason for s in store.sweep()] == ["unfinished temp dir of a writer that is gone"]
    assert list((tmp_path / "adapters").iterdir()) == []


def test_two_processes_wanting_the_same_artifact_compute_it_once(tmp_path):
    first, second = _start(tmp_path, "build", "same"), _start(tmp_path, "build", "same")
    try:
        outputs = []
        for proc in (first, second):
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            outputs.append(out)
    finally:
        for proc in (first, second):
            proc.kill()
    assert (tmp_path / "computed.log").read_text() == "same\n"  # one computation
    assert sorted("reused=True" in o for o in outputs) == [False, True]
    assert [p.name for p in (tmp_path / "adapters").iterdir()] == ["same"]
    assert ArtifactStore(tmp_path).verify("adapters", "same") == 1


def test_working_dir_is_kept_for_resume_only_while_it_matters(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(RuntimeError):  # failed before writing anything: nothing to resume, removed
        with store.working("adapters", "k") as work:
            raise RuntimeError("config mismatch")
    assert not work.exists()
    with pytest.raises(KeyboardInterrupt):  # failed after a checkpoint: kept for the next attempt
        with store.working("adapters", "k") as work:
            (work / "checkpoint-1").mkdir()
            raise KeyboardInterrupt
    assert (work / "checkpoint-1").is_dir()
    with store.working("adapters", "k") as again:  # the next attempt resumes in the same dir, finishes
        assert again == work and (again / "checkpoint-1").is_dir()
        store.get_or_create("adapters", "k", lambda tmp: (tmp / "a").write_text("done"))
    assert not work.exists() and store.exists("adapters", "k")

    old = store.work_path("adapters", "old")
    (old / "checkpoint-5").mkdir(parents=True)
    (old / "checkpoint-5" / "w").write_text("w")
    past = time.time() - 30 * 86400
    os.utime(old / "checkpoint-5" / "w", (past, past))
    os.utime(old / "checkpoint-5", (past, past))
    assert [(s.goes, "untouched" in s.reason) for s in store.sweep(dry_run=True)] == [(True, True)]
    assert old.exists()  # a dry run only tells
    assert [s.goes for s in store.sweep()] == [True] and not old.exists()
