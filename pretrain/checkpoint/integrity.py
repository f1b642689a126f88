"""Checksums of every file of a checkpoint step, written with the step and verified before it is loaded.

Writing: right after DCP has written a step, each rank hashes the shard files it wrote itself (DCP names them
`__<rank>_<n>.distcp`), while they are still in the page cache; rank 0 gathers the lists, hashes what is left
(`.metadata`, `train_state.json`) and writes `checksums.json` before the rename that makes the step visible.
With checkpoint.async_mode this runs in the background thread that finishes the save, not on the training
thread. Loading checks every size first (a truncated file is named without reading it), then the checksums,
each rank a share of the files.

The hash is zlib.crc32, from the standard library. A checksum here is for accidental damage (a flipped bit, a
torn or truncated write, a file of another save), which a 32-bit CRC finds; it runs at about 3 GiB/s on one
core where blake2b does 0.6 and sha256 1.4 (sweeps/bench/checksum_cost.py), and zlib releases the GIL on large
buffers, so a background hash leaves the training thread alone. It does not stop someone who rewrites a
checkpoint on purpose (they would rewrite checksums.json too): the restricted unpickler of safe_reader.py is
what keeps a crafted checkpoint from running code.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Optional

MANIFEST = "checksums.json"
ALGORITHM = "crc32"
_CHUNK = 8 << 20  # bytes read at a time: large enough for zlib to release the GIL, small enough to stay in cache


def file_checksum(path: str) -> dict:
    """{"size": bytes, "crc32": 8 hex digits} of one file."""
    crc, size = 0, 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return {"size": size, ALGORITHM: f"{crc:08x}"}


def bytes_checksum(data: bytes) -> dict:
    return {"size": len(data), ALGORITHM: f"{zlib.crc32(data):08x}"}


def own_files(folder: str, rank: int) -> list[str]:
    """The shard files this rank wrote into a DCP folder (DCP prefixes them with `__<rank>_`)."""
    prefix = f"__{rank}_"
    return sorted(n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".distcp"))


def hash_files(folder: str, names: list[str]) -> dict[str, dict]:
    return {name: file_checksum(os.path.join(folder, name)) for name in names}


def write_manifest(folder: str, entries: dict[str, dict]) -> None:
    """checksums.json, on disk (fsync) before the step is renamed into place."""
    text = json.dumps({"algorithm": ALGORITHM, "files": dict(sorted(entries.items()))}, indent=1)
    with open(os.path.join(folder, MANIFEST), "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(folder: str) -> Optional[dict[str, dict]]:
    """{file name: {"size", "crc32"}}, or None when the step has no checksums.json (saved before they existed).
    ValueError when it is there but unreadable."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("algorithm") != ALGORITHM or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get(ALGORITHM), str)
            for e in files.values()
        ):
            raise ValueError(f"not a {ALGORITHM} list of files")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{MANIFEST} is unreadable ({type(e).__name__}: {e})") from None
    return files


def size_problems(folder: str, files: dict[str, dict], names: Optional[list[str]] = None) -> list[str]:
    """Files of the manifest that are missing or whose size is not the one written: no file is read."""
    problems = []
    for name in sorted(files) if names is None else names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            problems.append(f"{name} is missing")
            continue
        size, expected = os.path.getsize(path), files[name]["size"]
        if size != expected:
            cut = "truncated" if size < expected else "longer than written"
            problems.append(f"{name} has {size} bytes where {expected} were written ({cut})")
    return problems


def checksum_problems(folder: str, files: dict[str, dict], names: list[str]) -> list[str]:
    """The size check, then the checksum of each of `names` (a share of the manifest's files)."""
    problems = size_problems(folder, files, names)
    if problems:
        return problems
    for name in names:
        if file_checksum(os.path.join(folder, name))[ALGORITHM] != files[name][ALGORITHM]:
            problems.append(f"{name} does not match the checksum written with it (changed since the save)")
    return problems


def verify_folder(folder: str) -> tuple[bool, list[str]]:
    """On one process (the converter): (whether the folder has checksums, the problems found)."""
    try:
        files = read_manifest(folder)
    except ValueError as e:
        return True, [str(e)]
    if files is None:
        return False, []
    return True, checksum_problems(folder, files, sorted(files))
