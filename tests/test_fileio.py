"""Directory publishing in engine.fileio: the destination is the old or the new tree, nothing left over."""
import os

from engine.fileio import replace_dir


def _tree(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f)).read()
            for d, _, files in os.walk(root) for f in files}


def _make(path, files):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)


def test_replace_dir_moves_into_a_missing_destination(tmp_path):
    _make(tmp_path / "staging", {"a.txt": "new"})
    replace_dir(tmp_path / "staging", tmp_path / "dest")
    assert _tree(tmp_path / "dest") == {"a.txt": "new"}
    assert sorted(os.listdir(tmp_path)) == ["dest"]


def test_replace_dir_replaces_an_existing_destination_whole(tmp_path):
    _make(tmp_path / "dest", {"a.txt": "old", "only_old.txt": "old"})
    _make(tmp_path / "staging", {"a.txt": "new"})
    replace_dir(tmp_path / "staging", tmp_path / "dest")
    assert _tree(tmp_path / "dest") == {"a.txt": "new"}  # no file of the old tree survives
    assert sorted(os.listdir(tmp_path)) == ["dest"]  # the old tree moved aside is gone too
