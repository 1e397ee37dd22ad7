"""A rank's node-local copy of the data (data.local_path, made by `python -m hvd_ba stage`): which
files a rank reads (its static training shard and its evaluation files; over a packed folder, its
whole training shards), whether a node-local folder is this user's private one, and training's
check that every file is there.
"""
from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

import numpy as np

from hvd_ba.config import ConfigError
from hvd_ba.data.manifest import FileIndex
from hvd_ba.data.pipeline import eval_files, train_sampler


def rank_files(cfg, train_index: FileIndex, val_index: FileIndex, rank: int, world: int) -> list[tuple[str, int]]:
    """(path relative to the dataset root, size in bytes) of every file rank `rank` reads from its
    node-local copy. A packed folder's: the rank's whole training shards (its validation shards
    are read from data.path, each opened once per loader worker)."""
    if cfg.data.shard != "static":
        raise ConfigError("config key 'data.shard': staging needs static shards (global shards read different "
                          f"files every epoch); set data.shard=static (it is {cfg.data.shard!r})")
    train = train_sampler(train_index, cfg, rank, world).owned()
    if train_index.shards:
        sizes = train_index.header["shard_bytes"]
        return [(train_index.shards[k], int(sizes[k])) for k in np.unique(train_index.rows["shard"][train])]
    files = [(f"train/{train_index.paths[i]}", int(train_index.sizes[i])) for i in sorted(train)]
    files += [(f"val/{val_index.paths[i]}", int(val_index.sizes[i])) for i in eval_files(len(val_index), rank, world)]
    return files


class UnsafeFolder(OSError):
    """A node-local folder that another user could have written: the message names it."""


def private_dir(path: Path, create: bool = True, readonly: bool = False) -> Path:
    """`path` as this user's private folder: made with mode 0700 when missing (its parents as
    usual); refused (UnsafeFolder) when it is a symlink, not a folder, owned by another user or
    open to group or others. Nothing is read from a refused folder. readonly (training reads
    data.local_path): owned by this user or root and writable by no one else is enough (an
    admin's read-only node-local copy, a 0755 folder of your own)."""
    path = Path(path)
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass  # another rank of this node made it, or an earlier attempt: checked below
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise UnsafeFolder(errno.ENOENT, f"node-local folder '{path}' does not exist") from None
    host = socket.gethostname()
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeFolder(errno.EPERM, f"node-local folder '{path}' on host {host} is a symlink (to "
                           f"'{os.readlink(path)}'): not followed; remove it or choose another LOCAL_DATA")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeFolder(errno.ENOTDIR, f"node-local folder '{path}' on host {host} is not a folder")
    if st.st_uid != os.geteuid() and not (readonly and st.st_uid == 0):
        raise UnsafeFolder(errno.EPERM, f"node-local folder '{path}' on host {host} is owned by {user_name(st.st_uid)}, "
                           f"not by you ({user_name(os.geteuid())}): nothing is read from it; choose another LOCAL_DATA")
    if st.st_mode & (0o022 if readonly else 0o077):
        raise UnsafeFolder(errno.EPERM, f"node-local folder '{path}' on host {host} has mode "
                           f"{stat.S_IMODE(st.st_mode):04o}: other users could plant files in it; it must be 0700 "
                           f"(chmod 700 it if it is yours, or choose another LOCAL_DATA)")
    return path


def user_name(uid: int) -> str:
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def check_staged(local: str | Path, files: list[tuple[str, int]], rank: int, world: int) -> None:
    """Training's check before its first step: every file of this rank is in the local copy
    with the size the manifest records."""
    local = private_dir(Path(local), create=False, readonly=True)
    missing = [rel for rel, size in files if not ((local / rel).is_file() and (local / rel).stat().st_size == size)]
    if missing:
        raise FileNotFoundError(
            f"rank {rank} of {world} on host {socket.gethostname()}: {len(missing)} of its {len(files)} files are "
            f"missing or of the wrong size under data.local_path '{local}' (first: {missing[0]}); stage them with "
            "`python -m hvd_ba stage` started like the training (same ranks, same data.* settings)")
