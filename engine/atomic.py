"""Files are written to a temporary name beside their target, then renamed over it: the project's one way to write.

Every file the workbench writes (bundle, CF baseline, CF / CCA results, certificate JSON and PDF) goes through
:func:`temp_beside` and :func:`publish`, so a crash, a cancel or a full disk leaves the target as it was and no
half-written file under its name.  The temporary name is ``.NAME.XXXXXXXX.tmp`` from :func:`tempfile.mkstemp`
(created empty and exclusively, so it never overwrites a file of the user's), and the published file gets the
permissions of any new file (``0666 & ~umask``), not mkstemp's owner-only ones.

Errors are left as :class:`OSError` (naming the temporary file, as the OS does); callers turn them into their own
named exceptions, naming the target (:func:`target_of` maps a temporary name back).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

#: the temporary names :func:`temp_beside` makes: ``.NAME.XXXXXXXX.tmp``
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")


def temp_beside(target: str | os.PathLike) -> Path:
    """A new, empty temporary file of our own in ``target``'s folder (``.NAME.XXXXXXXX.tmp``), closed."""
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent))
    os.close(fd)
    return Path(name)


def chmod_as_new_file(path: str | os.PathLike) -> None:
    """Give ``path`` the permissions of a newly created file (``0666 & ~umask``); mkstemp makes it owner-only."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def publish(tmp: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Rename the finished temporary file ``tmp`` over ``target`` (permissions as a new file)."""
    chmod_as_new_file(tmp)
    os.replace(tmp, target)
    return Path(target)


def discard(paths: Iterable[str | os.PathLike]) -> None:
    """Remove temporary files (those already gone are skipped)."""
    for p in paths:
        Path(p).unlink(missing_ok=True)


@contextmanager
def written_to_temp(target: str | os.PathLike) -> Iterator[Path]:
    """``with written_to_temp(target) as tmp:`` write ``tmp``; on leaving it is renamed over ``target``.

    On any exception (``KeyboardInterrupt`` included) the temporary file is removed and ``target`` is untouched.
    """
    tmp = temp_beside(target)
    try:
        yield tmp
        publish(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` through a temporary file and a rename."""
    with written_to_temp(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def target_of(filename: str | os.PathLike) -> Path:
    """The target a temporary name of :func:`temp_beside` stands for; any other name unchanged."""
    p = Path(os.fsdecode(filename))
    m = TEMP_NAME.match(p.name)
    return p.with_name(m.group("name")) if m else p
