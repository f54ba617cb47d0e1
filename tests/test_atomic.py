"""Files and folders written whole or not at all (atomic.py)."""

import pytest

from atomic import atomic_folder, atomic_write_text, clear_leftovers, created_once


def test_a_folder_appears_whole_with_a_new_folders_mode(tmp_path):
    (tmp_path / "plain").mkdir()
    with atomic_folder(tmp_path / "out") as staging:
        (staging / "weights").write_text("w")
        assert not (tmp_path / "out").exists()  # nothing at the target until the block ends
    assert (tmp_path / "out" / "weights").read_text() == "w"
    # readable by others as a plain mkdir would be, not private as a temporary folder is
    assert (tmp_path / "out").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "plain"]


def test_a_failed_block_leaves_nothing_and_an_existing_target_is_kept_or_replaced(tmp_path):
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "out") as staging:
        (staging / "half").write_text("h")
        raise RuntimeError("killed halfway")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("k")
    with pytest.raises(OSError), atomic_folder(tmp_path / "full") as staging:  # only an empty folder gives way
        (staging / "new").write_text("n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    with atomic_folder(tmp_path / "full", replace=True) as staging:
        (staging / "new").write_text("n")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["new"]


def test_a_file_is_replaced_whole_and_leftovers_are_cleared(tmp_path):
    path = tmp_path / "lock.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["lock.json"]
    (tmp_path / ".zoo.partial-abc").mkdir()  # what a killed writer of tmp_path/zoo leaves
    (tmp_path / ".zoo.partial-def").write_text("x")
    clear_leftovers(tmp_path / "zoo")
    assert [p.name for p in tmp_path.iterdir()] == ["lock.json"]


def test_a_file_created_once_keeps_the_first_maker_and_leaves_no_partial(tmp_path):
    target = tmp_path / "store.db"
    with created_once(target) as partial:
        partial.write_text("first")
        with created_once(target) as other:  # a second process, done first
            other.write_text("second")
    assert target.read_text() == "second" and [p.name for p in tmp_path.iterdir()] == ["store.db"]
    with pytest.raises(RuntimeError), created_once(tmp_path / "never.db") as partial:
        partial.write_text("cut short")
        raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["store.db"]
