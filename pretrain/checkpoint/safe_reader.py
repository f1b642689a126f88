"""Reading DCP checkpoints without unpickling arbitrary objects.

DCP stores tensors as torch.save payloads (read back with `weights_only=True`) but its `.metadata`
file with plain pickle. `SafeFileSystemReader` reads that file with an unpickler that only builds
DCP's own metadata records and the few torch and pathlib values inside them, so a crafted
checkpoint cannot run code when it is loaded, resumed from or converted."""

from __future__ import annotations

import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from pretrain import torch_compat

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_ALLOWED = {
    ("torch", "Size"),
    torch_compat.LAYOUT_PICKLE_GLOBAL,
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}
_TORCH_VALUE_TYPES = (torch.dtype, torch.layout, torch.memory_format)


class UnsafeCheckpoint(pickle.UnpicklingError):
    """The metadata names a callable outside DCP's records: the file was not written by DCP."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES and not name.startswith("__"):
            value = super().find_class(module, name)
            if isinstance(value, type):  # DCP's dataclasses and enums, not its functions
                return value
        elif (module, name) in _ALLOWED:
            return super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUE_TYPES):
            return getattr(torch, name)  # torch.float32, torch.strided, torch.contiguous_format, ...
        raise UnsafeCheckpoint(f"the checkpoint metadata asks for {module}.{name}, which a DCP checkpoint never holds")


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = torch_compat.dcp_metadata_path(self, kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpoint(f"{path} does not hold DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
