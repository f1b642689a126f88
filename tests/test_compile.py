"""torch.compile: the compiled loss against the eager one, loss parallel left uncompiled, the
eager/compiled boundaries (an AsyncCollectiveTensor that TP hands the first block; full activation
checkpointing around a compiled block), and compiled FSDP and TP training runs against the eager
single-process run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, losses, run_launch, run_on_ranks

from pretrain.components.loss import build_loss_fn, cross_entropy_sum
from pretrain.config import CompileConfig

# Inductor fuses log-softmax and the sum over tokens into one kernel that reduces fp32 in another
# order than eager: about one ulp on a loss of ~150 (32 tokens, V=64). Measured (torch 2.13 CPU, 5
# seeds): at most 1.1e-7 relative on the loss, gradients (size up to ~1) bitwise equal. We allow 1e-6
# relative and 1e-6 absolute; a loss that dropped or doubled one token would be off by > 1e-2.
LOSS_RTOL = 1e-6
GRAD_ATOL = 1e-6

# Training runs, fp32 on CPU, against the eager single-process run (the parity tests show FSDP and TP
# eager runs match it within 1.5e-7). Compile adds the inductor reorderings above inside every block,
# forward and backward, and Adam can amplify such noise in tiny-gradient coordinates. Measured
# (2026-11, torch 2.13 CPU, 5 steps): at most 7.2e-8 relative for both layouts. We allow 2e-5. The
# failure this guards against, a block input whose gradient is lost at the eager/compiled boundary
# (the embedding stops learning), measured with a frozen embedding: 1.2e-4 at step 2, 8e-4 at step 5.
TRAIN_RTOL = 2e-5


def _logits_and_labels(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 8, 64, generator=g)
    labels = torch.randint(0, 64, (4, 8), generator=g)
    return logits, labels


def test_compiled_loss_equals_eager():
    logits, labels = _logits_and_labels()
    loss_fn = build_loss_fn(CompileConfig(enable=True, components=["loss"], backend="inductor"))
    assert loss_fn is not cross_entropy_sum
    results = {}
    for name, fn in {"eager": cross_entropy_sum, "compiled": loss_fn}.items():
        x = logits.clone().requires_grad_(True)
        loss = fn(x, labels)
        loss.backward()
        results[name] = (loss.detach(), x.grad)
    (ref, ref_grad), (out, grad) = results["eager"], results["compiled"]
    assert torch.allclose(ref, F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum"))
    assert out.item() == pytest.approx(ref.item(), rel=LOSS_RTOL)
    assert torch.allclose(grad, ref_grad, rtol=0, atol=GRAD_ATOL)


def test_loss_not_compiled_without_loss_component():
    assert build_loss_fn(CompileConfig(enable=True, components=["model"])) is cross_entropy_sum
    assert build_loss_fn(CompileConfig(enable=False)) is cross_entropy_sum


def test_async_collective_input_keeps_its_gradient():
    """What TP's embedding hands the first block: an AsyncCollectiveTensor with autograd history
    (Redistribute + to_local in eager). Every compiled block call must keep that history."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    from pretrain.distributed.compile import with_async_inputs_resolved

    class AsyncOutput(torch.autograd.Function):  # stands in for Redistribute(async_op=True) + to_local
        @staticmethod
        def forward(ctx, x):
            return AsyncCollectiveTensor(x.clone())

        @staticmethod
        def backward(ctx, grad):
            return grad

    def block(x, scale):
        return (x * scale).sum()

    torch._dynamo.reset()
    compiled = with_async_inputs_resolved(torch.compile(block, backend="aot_eager", fullgraph=True))
    w = torch.arange(4.0, requires_grad=True)
    x = AsyncOutput.apply(w * 2)
    assert isinstance(x, AsyncCollectiveTensor) and x.requires_grad
    out = compiled(x, 3.0)
    out.backward()
    assert out.item() == 36.0
    assert torch.equal(w.grad, torch.full((4,), 6.0))
    torch._dynamo.reset()


def _tiny_model():
    from pretrain.config import ModelConfig
    from pretrain.models import get_model_spec

    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32)
    model = get_model_spec("llama3").build_model(cfg, 32)
    model.init_weights()
    return model


def _step(model, tokens):
    """Loss, gradients (by parameter name without the checkpoint wrapper's prefix) and the bytes that
    autograd saved for backward outside the checkpointed blocks' own bookkeeping."""
    nbytes = []

    def pack(t):
        nbytes.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens[:, :-1])
    loss = cross_entropy_sum(logits, tokens[:, 1:])
    loss.backward()
    grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, sum(nbytes)


def test_full_checkpointing_stays_eager_around_the_compiled_block():
    """Full AC wraps each block in a checkpoint; compile then compiles the block inside it (traced
    into the graph, the checkpoint fails under TP on torch 2.13). Same loss, gradients and saved
    memory as eager full AC: aot_eager runs the very aten ops of eager, so exact equality."""
    import copy

    from pretrain.config import ActivationCheckpointConfig
    from pretrain.distributed.activation_checkpoint import apply_ac
    from pretrain.distributed.compile import apply_compile

    base = _tiny_model()
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    results = {}
    for name, mode, option in (("full", "full", "1"), ("op", "selective", "op")):
        for compiled in (False, True):
            torch._dynamo.reset()
            model = copy.deepcopy(base)
            apply_ac(model.layers, ActivationCheckpointConfig(mode=mode, selective_ac_option=option))
            if compiled:
                apply_compile(model.layers, CompileConfig(enable=True, backend="aot_eager"))
                for block in model.layers.values():
                    inner = block._checkpoint_wrapped_module
                    # full: the block inside the eager checkpoint; per-op policy: the wrapper, traced
                    assert (inner._compiled_call_impl is not None) == (name == "full"), name
                    assert (block._compiled_call_impl is not None) == (name == "op"), name
            results[name, compiled] = _step(model, tokens)
    torch._dynamo.reset()
    for name in ("full", "op"):
        (loss, grads, _), (ref_loss, ref_grads, _) = results[name, True], results[name, False]
        assert torch.equal(loss, ref_loss), name
        assert grads.keys() == ref_grads.keys()
        for key in grads:
            assert torch.equal(grads[key], ref_grads[key]), (name, key)
    assert results["full", True][2] == results["full", False][2]  # the checkpoint keeps only block inputs


def _loss_parallel_worker(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    mesh = init_device_mesh("cpu", (world_size,))
    logits, labels = _logits_and_labels()
    ref = logits.clone().requires_grad_(True)
    ref_loss = cross_entropy_sum(ref, labels)
    ref_loss.backward()

    # what the Trainer builds under TP with loss parallel: compile asked for, yet not applied
    loss_fn = build_loss_fn(CompileConfig(enable=True, components=["model", "loss"]), loss_parallel=True)
    assert loss_fn is cross_entropy_sum
    sharded = distribute_tensor(logits.clone(), mesh, [Shard(-1)]).requires_grad_(True)  # vocab-sharded
    with loss_parallel():
        loss = loss_fn(sharded, labels)
        loss.backward()
    assert loss.full_tensor().item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert torch.allclose(sharded.grad.full_tensor(), ref.grad, rtol=0, atol=1e-7)


@pytest.mark.multiprocess
def test_loss_parallel_is_not_compiled_and_right():
    run_on_ranks(_loss_parallel_worker, 2)


# ---- training runs (launch.py, 2 gloo processes each) --------------------------------------------

STEPS = 5
EAGER = {"single": ["training.local_batch_size=8"]}  # every layout matches it (test_parallel_parity)
COMPILED = {
    "fsdp2_compiled": ["parallelism=fsdp", "cluster.nproc_per_node=2", "training.local_batch_size=4"],
    # loss parallel is on by default under TP: the blocks are compiled, the loss stays eager
    "tp2_compiled": [
        "parallelism=tp", "parallelism.tensor_parallel_degree=2", "cluster.nproc_per_node=2",
        "training.local_batch_size=8",
    ],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("compile")
    out = {}
    for name, overrides in {**EAGER, **COMPILED}.items():
        extra = ["compile.enable=true"] if name in COMPILED else []
        args = [
            *TINY, *overrides, *extra, f"training.steps={STEPS}", f"job.name={name}",
            f"data.cache_dir={cache_dir}", "checkpoint.enable=false",
        ]
        proc = run_launch(args, cwd=root, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[name] = losses(root / "outputs" / name)
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", list(COMPILED))
def test_compiled_layout_matches_eager(runs, layout):
    eager, compiled = runs["single"], runs[layout]
    assert sorted(eager) == list(range(1, STEPS + 1))
    assert sorted(compiled) == sorted(eager)
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=TRAIN_RTOL), (layout, step, compiled[step], eager[step])

