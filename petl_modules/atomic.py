"""Files and folders that appear whole or not at all, with the permissions the umask gives.

A run killed while writing never leaves half a file behind: a file is written beside its place and renamed
onto it (`atomic_path`); a folder is built in a hidden staging folder beside it and renamed into place
(`staging_folder`).

Permissions follow the umask, as for a file created by `open` (0666 less the umask) or a folder created by
`mkdir` (0777 less the umask), never the private 0600 of `mkstemp` or 0700 of `mkdtemp`, so a folder shared
between users (a feature cache, an export, a backbone) stays readable by them. Libraries that write
privately (safetensors and Hugging Face `save_pretrained` write a 0600 temporary file and rename it into
place) are corrected with `follow_umask` right after they write.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    """The process umask (read by setting it and setting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode `mkdir` gives a new folder: 0777 less the umask."""
    return 0o777 & ~current_umask()


def follow_umask(path: str | os.PathLike) -> Path:
    """Give `path`, and each file and folder under it, the mode `open` or `mkdir` gives under the umask.

    Invariants: files end 0666 & ~umask, folders 0777 & ~umask; a folder keeps its set-group-ID bit (a
    group-shared folder stays one); symbolic links are neither changed nor followed. Returns `path`.
    """
    path = Path(path)
    files, folders = file_mode(), folder_mode()
    for entry in [path, *path.rglob("*")] if path.is_dir() and not path.is_symlink() else [path]:
        mode = entry.lstat().st_mode
        if stat.S_ISDIR(mode):
            os.chmod(entry, folders | (mode & stat.S_ISGID))
        elif stat.S_ISREG(mode):
            os.chmod(entry, files)
    return path


def staging_folder(path: str | os.PathLike) -> Path:
    """A new, empty, hidden folder beside `path` in which to build it; then `os.replace` it onto `path`.

    Invariants: the staging folder has the parent of `path` (created if missing), so the rename is atomic,
    and the mode of a folder `mkdir` creates (0777 & ~umask, not `mkdtemp`'s 0700), so the folder keeps
    that mode once renamed into place. The caller removes it if the build fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    os.chmod(staging, folder_mode() | (staging.stat().st_mode & stat.S_ISGID))
    return staging


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` (atomic on one file system).

    Invariants: `path` is either untouched or the whole new file; the new file has mode 0666 & ~umask
    however the writer created the temporary file (safetensors, for one, replaces it by a private 0600 file);
    on failure the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text`, flushed to disk before it replaces `path`."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def write_json_atomic(path: str | os.PathLike, data: object) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
