"""ParallelDims: parallel degrees -> validated layout -> one DeviceMesh and its derived views.

The world mesh has five dimensions, outermost first: pp, dp_replicate, dp_shard, cp, tp (a degree
of 1 keeps its dimension, so every view exists in every layout). Derived, flattened views:
  dp          = dp_replicate x dp_shard        ranks that read different data
  dp_shard_cp = dp_shard x cp                  FSDP shards parameters over these
  dp_cp       = dp_replicate x dp_shard x cp   the loss and its gradients are averaged over these

Expert parallelism borrows its ranks from dp_shard x cp, as torchtitan does: dp_shard is split into
dp_shard_mod_ep x dp_shard_in_ep (both root dimensions, only when ep > 1), and
  ep          = dp_shard_in_ep x cp            the experts are split over these (all-to-all of tokens)
  ep_tp       = (ep, tp)                       the experts' 2-D mesh when TP also splits their hidden units
  dp_mod_ep   = dp_shard_mod_ep                FSDP shards the experts over these (HSDP: with dp_replicate)
Importing this module does not import torch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch.distributed.device_mesh import init_device_mesh

from pretrain.config.degrees import Degrees
from pretrain.torch_compat import flatten_mesh

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
EP_MESH_DIMS = ("pp", "dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "cp", "tp")


@dataclass
class ParallelDims(Degrees):
    """The degrees (Degrees.from_config checks them) plus, after build_mesh, the meshes."""

    # filled by build_mesh(): the world mesh and its flattened views
    world_mesh: DeviceMesh | None = field(default=None, repr=False)
    meshes: dict = field(default_factory=dict, repr=False)

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """The world's DeviceMesh and its flattened views; None for a single process."""
        if self.world_size == 1:
            return None

        if self.ep_enabled:
            return self._build_mesh_with_ep(device_type)
        sizes = (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)
        mesh = init_device_mesh(device_type, sizes, mesh_dim_names=MESH_DIMS)
        self.world_mesh = mesh
        self.meshes = {name: mesh[name] for name in MESH_DIMS}
        self.meshes["dp"] = flatten_mesh(mesh[("dp_replicate", "dp_shard")], "dp")
        self.meshes["dp_shard_cp"] = flatten_mesh(mesh[("dp_shard", "cp")], "dp_shard_cp")
        self.meshes["dp_cp"] = flatten_mesh(mesh[("dp_replicate", "dp_shard", "cp")], "dp_cp")
        self._add_hsdp_view(mesh)
        return mesh

    def _build_mesh_with_ep(self, device_type: str) -> DeviceMesh:
        in_ep = self.ep // self.cp
        sizes = (self.pp, self.dp_replicate, self.dp_shard // in_ep, in_ep, self.cp, self.tp)
        mesh = init_device_mesh(device_type, sizes, mesh_dim_names=EP_MESH_DIMS)
        self.world_mesh = mesh
        self.meshes = {name: mesh[name] for name in ("pp", "dp_replicate", "cp", "tp")}
        self.meshes["dp_shard"] = flatten_mesh(mesh[("dp_shard_mod_ep", "dp_shard_in_ep")], "dp_shard")
        self.meshes["dp"] = flatten_mesh(mesh[("dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep")], "dp")
        self.meshes["dp_shard_cp"] = flatten_mesh(mesh[("dp_shard_mod_ep", "dp_shard_in_ep", "cp")], "dp_shard_cp")
        self.meshes["dp_cp"] = flatten_mesh(mesh[("dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "cp")], "dp_cp")
        self.meshes["ep"] = flatten_mesh(mesh[("dp_shard_in_ep", "cp")], "ep")
        self.meshes["dp_mod_ep"] = mesh["dp_shard_mod_ep"]
        with warnings.catch_warnings():  # 2-D views that mix a flattened dimension with a root one
            warnings.filterwarnings("ignore", message=".*flattened dim from root mesh.*")
            self.meshes["ep_tp"] = mesh[("ep", "tp")]
            if self.dp_replicate > 1:
                self.meshes["hsdp_mod_ep"] = mesh[("dp_replicate", "dp_shard_mod_ep")]
        self._add_hsdp_view(mesh)
        return mesh

    def _add_hsdp_view(self, mesh: DeviceMesh) -> None:
        if self.dp_replicate > 1:
            with warnings.catch_warnings():  # HSDP needs (replicate, flattened shard x cp) as one 2-D mesh
                warnings.filterwarnings("ignore", message=".*flattened dim from root mesh.*")
                self.meshes["hsdp"] = mesh[("dp_replicate", "dp_shard_cp")]

    def mesh(self, name: str) -> DeviceMesh | None:
        """A named view (pp, dp_replicate, dp_shard, cp, tp, dp, dp_shard_cp, dp_cp; with EP also ep, ep_tp,
        dp_mod_ep); None for one process."""
        return self.meshes.get(name)

    def process_groups(self) -> list:
        """The process group of every 1-D view (for timeouts); empty for one process."""
        return [m.get_group() for m in self.meshes.values() if m.ndim == 1]

    def fsdp_mesh(self) -> DeviceMesh:
        """FSDP's mesh: 1-D over dp_shard x cp, or 2-D (replicate, shard x cp) for HSDP."""
        return self.meshes["hsdp"] if self.dp_replicate > 1 else self.meshes["dp_shard_cp"]

    def expert_fsdp_mesh(self) -> DeviceMesh:
        """FSDP's mesh for the experts under EP: the FSDP ranks that hold the same experts."""
        return self.meshes["hsdp_mod_ep"] if self.dp_replicate > 1 else self.meshes["dp_mod_ep"]
