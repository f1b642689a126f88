"""How Llama 3 is parallelized: FSDP2 units are the transformer blocks and then the root
(embeddings, final norm and output). The machinery lives in pretrain/distributed/."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pretrain.distributed.fsdp import apply_fsdp

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from pretrain.config import JobConfig
    from pretrain.distributed.parallel_dims import ParallelDims
    from pretrain.models.llama3.model import Transformer


def parallelize_llama(model: "Transformer", dims: "ParallelDims", mesh: "DeviceMesh | None", job: "JobConfig") -> "Transformer":
    if dims.fsdp_enabled or dims.dp_replicate_enabled:
        apply_fsdp(model, list(model.layers.values()), dims.fsdp_mesh(mesh), job.training, job.parallelism)
    return model
