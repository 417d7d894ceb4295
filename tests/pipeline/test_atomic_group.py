"""Writing several result files together, and cleaning up after a killed write (atomic.py)."""

import pytest

from pipeline.atomic import atomic_write_texts, remove_leftovers


def test_all_new_files_or_all_old_ones(tmp_path):
    results, scores = tmp_path / "results.json", tmp_path / "scores.csv"
    atomic_write_texts({results: "old results", scores: "old scores"})
    with pytest.raises(UnicodeEncodeError):  # the second file cannot be written
        atomic_write_texts({results: "new results", scores: "bad \ud800"})
    assert results.read_text() == "old results" and scores.read_text() == "old scores"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "scores.csv"]  # no temporaries left
    atomic_write_texts({results: "new results", scores: "new scores"})
    assert results.read_text() == "new results" and scores.read_text() == "new scores"


def test_leftovers_of_a_killed_write_are_removed_and_nothing_else(tmp_path):
    for name in (".epoch_3.pth.abc123.tmp", ".results.json.x1.tmp", "epoch_2.pth", ".epoch_notes.txt", "keep.tmp"):
        (tmp_path / name).write_text("x")
    removed = remove_leftovers(tmp_path, "epoch_*.pth")
    assert [p.name for p in removed] == [".epoch_3.pth.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".epoch_notes.txt", ".results.json.x1.tmp", "epoch_2.pth",
                                                          "keep.tmp"]
