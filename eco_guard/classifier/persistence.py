"""Saving and loading a trained prompt classifier, and telling whether it is stale.

A saved classifier is a folder::

    config.json          metadata: format version, topics, thresholds, training settings, data hash, ...
    calibration.json     held-out scores the thresholds are calibrated on
    head.safetensors     the linear head
    encoder/             the (fine-tuned) sentence-transformers model

:func:`swap_in` writes a new folder beside the old one and renames it into place, so readers
see the old model or the new one, never half of one; :func:`folder_lock` makes one process
train while the others wait for its result. Decision settings are saved too (a folder loads
with the ones it was last used with) but are never part of :func:`stale_keys`.

Example:
    >>> stale_keys({"data_hash": "a", "settings": {"epochs": 2}}, {"data_hash": "b", "settings": {"epochs": 2}})
    ['data_hash']
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from eco_guard.config import TrainingSettings
from eco_guard.errors import ClassifierError

__all__ = ["FORMAT_VERSION", "SavedFolder", "folder_lock", "is_saved", "read_folder", "stale_keys", "swap_in",
           "write_folder"]

FORMAT_VERSION: Final = 1
CONFIG_FILE: Final = "config.json"
HEAD_FILE: Final = "head.safetensors"
CALIBRATION_FILE: Final = "calibration.json"
ENCODER_DIR: Final = "encoder"


@dataclass(frozen=True)
class SavedFolder:
    """What a saved folder holds besides the encoder (loaded from ``encoder_dir``)."""

    metadata: dict[str, Any]
    calibration: dict[str, Any]
    head: dict[str, Any]
    encoder_dir: Path


def write_folder(path: str | Path, *, st: Any, head: Mapping[str, Any], calibration: Mapping[str, Any],
                 metadata: Mapping[str, Any]) -> None:
    """Write encoder, head, calibration scores and metadata to ``path`` (a folder)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    st.save(str(path / ENCODER_DIR), create_model_card=False)
    save_file({k: v.detach().contiguous() for k, v in head.items()}, str(path / HEAD_FILE))
    (path / CALIBRATION_FILE).write_text(json.dumps(calibration), encoding="utf-8")
    (path / CONFIG_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, **metadata}, indent=2),
                                    encoding="utf-8")


def read_folder(path: str | Path) -> SavedFolder:
    """Read a folder written by :func:`write_folder`.

    Raises:
        ClassifierError: the folder is missing, not a saved classifier, or of another format version.
    """
    from safetensors.torch import load_file

    path = Path(path)
    try:
        meta = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        calibration = json.loads((path / CALIBRATION_FILE).read_text(encoding="utf-8"))
        head = load_file(str(path / HEAD_FILE))
    except (OSError, ValueError) as exc:
        raise ClassifierError(f"{path}: not a saved prompt classifier ({exc})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ClassifierError(f"{path / CONFIG_FILE}: format_version {meta.get('format_version')} is not "
                              f"{FORMAT_VERSION}; retrain with `eco-guard train`")
    return SavedFolder(meta, calibration, head, path / ENCODER_DIR)


def is_saved(path: str | Path) -> bool:
    """Whether ``path`` holds a saved classifier's metadata."""
    return (Path(path) / CONFIG_FILE).is_file()


def stale_keys(metadata: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """The keys of ``expected`` (data hash, training settings, encoder, topics) the saved metadata disagrees on.

    Saved training settings are compared field by field over :class:`TrainingSettings`: a
    folder written when decision settings still sat among them is up to date all the same.
    """
    stale = []
    for key, want in expected.items():
        have = metadata.get(key)
        if key == "settings" and isinstance(have, dict):
            have = {k: v for k, v in have.items() if k in TrainingSettings.model_fields}
        if have != want:
            stale.append(key)
    return stale


@contextlib.contextmanager
def folder_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock on ``<path>.lock``, removed on release (a no-op where ``fcntl`` is missing).

    The holder unlinks the file before unlocking; a waiter that then gets the lock on the unlinked
    file sees it is gone and locks a fresh one, so no lock file outlives its use.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; training twice is wasteful, not wrong
        yield
        return
    lock = path.with_name(path.name + ".lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the file was removed while we waited: lock the new one
    try:
        yield
    finally:
        os.unlink(lock)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def swap_in(save: Callable[[Path], None], path: Path) -> None:
    """Save into a sibling folder with ``save``, then swap it in: readers see the old model or the new one."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    save(tmp)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
