"""The artifact store: immutable, content-addressed, never half-written."""

import pytest

from flywheel.store import ArtifactStore, hash_json, hash_tree


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
