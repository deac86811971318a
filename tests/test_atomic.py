"""engine.atomic: every file is written to a temporary name of its own beside the target, then renamed.

What a user would notice: a failed or interrupted write leaves the file they had as it was and no stray file; a
file of theirs that happens to look like one of our temporary names is never touched; written files have the
permissions of any new file; errors can name the file asked for.
"""

from __future__ import annotations

import os

import pytest

from engine.atomic import TEMP_NAME, publish, target_of, temp_beside, write_text, written_to_temp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_text_replaces_the_target_with_new_file_permissions(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old\n", encoding="utf-8")
    os.chmod(target, 0o600)
    write_text(target, "new ü\n")
    assert target.read_text(encoding="utf-8") == "new ü\n"
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_failed_write_leaves_the_target_and_no_temporary_file(tmp_path):
    target = tmp_path / "cert.json"
    target.write_text("the user's certificate\n", encoding="utf-8")
    with pytest.raises(KeyboardInterrupt):
        with written_to_temp(target) as tmp:
            tmp.write_text("half", encoding="utf-8")
            raise KeyboardInterrupt
    assert target.read_text(encoding="utf-8") == "the user's certificate\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cert.json"]


def test_temporary_names_are_new_files_never_a_users_file(tmp_path):
    target = tmp_path / "incident.h5"
    theirs = tmp_path / ".incident.h5.tmp"          # a fixed temporary name would have overwritten this
    theirs.write_text("mine\n", encoding="utf-8")
    names = {temp_beside(target).name for _ in range(20)}
    assert len(names) == 20 and all(TEMP_NAME.match(n) for n in names)
    assert theirs.read_text(encoding="utf-8") == "mine\n"
    assert all(target_of(tmp_path / n) == target for n in names)
    assert target_of(theirs) == theirs and target_of("notes.txt").name == "notes.txt"


def test_publish_into_a_missing_folder_raises_oserror_naming_nothing_written(tmp_path):
    with pytest.raises(OSError):
        write_text(tmp_path / "gone" / "x.json", "{}")
    assert list(tmp_path.iterdir()) == []
    tmp = temp_beside(tmp_path / "a.txt")
    tmp.write_text("a", encoding="utf-8")
    with pytest.raises(OSError):
        publish(tmp, tmp_path / "gone" / "a.txt")   # the caller removes what is left (engine.atomic.discard)
    assert tmp.exists()
