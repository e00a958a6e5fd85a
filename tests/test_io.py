import os

import pandas as pd
import pytest

from slidesnake.io import atomic_path, write_json, write_table


def test_atomic_file_renamed_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists()
    assert os.listdir(tmp_path) == []
    with atomic_path(target) as tmp:
        tmp.write_text("done")
        assert not target.exists()
    assert target.read_text() == "done"


def test_atomic_directory_replaces_previous(tmp_path):
    target = tmp_path / "store.zarr"
    for content in ("first", "second"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "x").write_text(content)
    assert (target / "x").read_text() == "second"
    assert sorted(os.listdir(tmp_path)) == ["store.zarr"]


def test_failed_directory_write_keeps_previous(tmp_path):
    target = tmp_path / "store.zarr"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "x").write_text("good")
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            raise ValueError
    assert (target / "x").read_text() == "good"
    assert sorted(os.listdir(tmp_path)) == ["store.zarr"]


def test_write_table_and_json(tmp_path):
    df = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    for suffix in (".csv", ".tsv", ".parquet"):
        write_table(df, tmp_path / f"t{suffix}")
    assert pd.read_parquet(tmp_path / "t.parquet").equals(df)
    assert pd.read_csv(tmp_path / "t.tsv", sep="\t").equals(df)
    write_json({"k": 1}, tmp_path / "m.json")
    assert (tmp_path / "m.json").read_text().strip().startswith("{")


def test_leftover_of_killed_attempt_is_removed(tmp_path):
    target = tmp_path / "store.zarr"
    stale = tmp_path / f".tmp-999999-{target.name}"
    stale.mkdir()
    (stale / "half").write_text("x")
    (tmp_path / ".tmp-1-other.zarr").mkdir()  # another output's temporary is left alone
    with atomic_path(target) as tmp:
        tmp.mkdir()
    assert sorted(os.listdir(tmp_path)) == [".tmp-1-other.zarr", "store.zarr"]


def test_stale_cleanup_leaves_other_outputs_live_temporaries(tmp_path):
    """Slides A1 and X-A1 (or NEW-A1, the predict prefix) write side by side: cleaning A1's stale
    temporaries must not delete X-A1's live one (a glob `.tmp-*-A1.zarr` matched it)."""
    live = {name: tmp_path / f".tmp-4242-{name}" for name in ("X-A1.zarr", "NEW-A1.zarr", "A1.zarr.bak")}
    for p in live.values():
        p.mkdir()
        (p / "features").write_text("being written")
    dotted = tmp_path / ".tmp-7-A1Xzarr"  # a regex-special `.` in the name matches itself only
    dotted.write_text("x")
    stale = tmp_path / ".tmp-999999-A1.zarr"
    stale.mkdir()
    with atomic_path(tmp_path / "A1.zarr") as tmp:
        tmp.mkdir()
    assert not stale.exists()
    assert all((p / "features").read_text() == "being written" for p in live.values())
    assert dotted.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["A1.zarr", dotted.name] + [p.name for p in live.values()]
    )
