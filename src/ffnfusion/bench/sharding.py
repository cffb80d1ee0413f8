"""Tensor parallelism for the DeciLM model (original or fused) through `torch.distributed.tensor.parallel`.

Megatron-style sharding: q/k/v and gate/up are column-parallel, o and down row-parallel, so each attention and
each FFN sub-block costs exactly one all-reduce (the row-parallel layer's partial sums). A fused FFN group is one
wide FFN and shards like any other, which is where fusion saves collectives: one all-reduce for the whole group
instead of one per original layer.

Fixed collectives outside the blocks, per forward pass (prefill or one decode step):
- the embedding stays replicated: a lookup reads only the batch's rows, so sharding it would save memory but add
  an all-reduce per step;
- the LM head is column-parallel over the vocabulary, followed by one all-gather of the logits.
So a forward pass issues `expected_all_reduces(model)` all-reduces (= the plan's sequential sub-blocks) and one
all-gather.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from ffnfusion.modeling.modeling_decilm import DeciLMForCausalLM

LM_HEAD_ALL_GATHERS = 1


class TensorParallelError(ValueError):
    """The model cannot be sharded over this many ranks; the message lists every reason."""


def tp_problems(model: DeciLMForCausalLM, tp: int) -> list[str]:
    """Why `model` cannot be sharded `tp` ways (empty when it can)."""
    if tp < 1:
        return [f"tensor-parallel size must be >= 1, got {tp}"]
    problems: list[str] = []
    for i, layer in enumerate(model.model.layers):
        if layer.parallel > 1:
            # Member p's heads and FFN rows are contiguous slices of the wide projections, and the block applies
            # o_proj and the member FFN inputs through einsum views of whole weights; a contiguous column shard
            # would cut across members.
            problems.append(
                f"layer {i} is a block-parallel group of {layer.parallel} layers; block-parallel groups are not "
                "supported under tensor parallelism (fuse FFNs instead, or run on one device)"
            )
            continue
        if layer.has_attention:
            attn = layer.self_attn
            if attn.n_heads % tp or attn.n_kv_heads % tp:
                # Every rank must hold whole query heads and the KV heads those queries read.
                problems.append(
                    f"layer {i}: {attn.n_heads} query heads and {attn.n_kv_heads} KV heads must both be divisible "
                    f"by the tensor-parallel size {tp}"
                )
        if layer.has_ffn and layer.mlp.intermediate_size % tp:
            problems.append(f"layer {i}: FFN width {layer.mlp.intermediate_size} is not divisible by {tp}")
    return problems


def tp_plan(model: DeciLMForCausalLM) -> dict[str, ParallelStyle]:
    """The `parallelize_module` plan: fully qualified module name -> parallel style."""
    plan: dict[str, ParallelStyle] = {}
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        if layer.has_attention:
            for name in ("q_proj", "k_proj", "v_proj"):
                plan[f"{prefix}.self_attn.{name}"] = ColwiseParallel()
            plan[f"{prefix}.self_attn.o_proj"] = RowwiseParallel()
        if layer.has_ffn:
            plan[f"{prefix}.mlp.gate_proj"] = ColwiseParallel()
            plan[f"{prefix}.mlp.up_proj"] = ColwiseParallel()
            plan[f"{prefix}.mlp.down_proj"] = RowwiseParallel()
    plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    return plan


def shard_model(model: DeciLMForCausalLM, mesh: DeviceMesh) -> DeciLMForCausalLM:
    """Shard `model` in place over the 1-D `mesh` and return it.

    Every rank must hold the same full weights (they are scattered from rank 0), or the model may live on the meta
    device, to be materialised afterwards with `to_empty` (see `init_random_`). Activations between blocks stay
    replicated plain tensors, so the model's own forward, KV cache and generation code run unchanged.
    """
    if mesh.ndim != 1:
        raise TensorParallelError(f"expected a 1-D device mesh, got {mesh.ndim} dimensions")
    tp = mesh.size()
    if problems := tp_problems(model, tp):
        raise TensorParallelError(f"cannot shard the model {tp} ways:\n  - " + "\n  - ".join(problems))
    parallelize_module(model, mesh, tp_plan(model))
    for layer in model.model.layers:
        if layer.has_attention:
            # The forward reads head counts off the tensors; these attributes are kept per rank so that code sizing
            # a KV cache from them allocates this rank's share.
            layer.self_attn.n_heads //= tp
            layer.self_attn.n_kv_heads //= tp
    return model


def expected_all_reduces(model: DeciLMForCausalLM) -> int:
    """All-reduces per forward pass of the sharded model: one per attention and one per FFN sub-block."""
    return sum(int(layer.has_attention) + int(layer.has_ffn) for layer in model.model.layers)


def count_collectives(fn: Callable[[], Any]) -> dict[str, int]:
    """Run `fn` and count the collectives it issues, by name (e.g. {"all_reduce": 43, "all_gather_into_tensor": 1})."""
    from torch.distributed.tensor.debug import CommDebugMode

    with warnings.catch_warnings():
        # CommDebugMode's module tracker hooks every module for backward and warns about the model's dataclass
        # outputs; this count never runs backward.
        warnings.filterwarnings("ignore", message="For backward hooks to be called")
        with CommDebugMode() as comm:
            fn()
    return {getattr(op, "__name__", str(op)).split(".")[0]: n for op, n in comm.get_comm_counts().items()}


@torch.no_grad()
def init_random_(model: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Random weights for speed-only runs, written into each rank's local shards (norms get ones).

    Every rank draws from the same seed in the same order, so replicated tensors (embedding, norms) are identical
    across ranks, as a replicated layout requires.
    """
    gen_device = next(model.parameters()).device
    gen = torch.Generator(device=gen_device).manual_seed(seed)
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        if "norm" in name:
            local.fill_(1.0)
        elif name.endswith("bias"):
            local.zero_()
        else:
            local.normal_(0.0, std, generator=gen)
    return model


@contextlib.contextmanager
def process_group(tp: int, device: str | None = None) -> Iterator[tuple[DeviceMesh, torch.device]]:
    """The torchrun-launched process group (joined, or created and torn down here) and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp:
        raise ValueError(
            f"tensor parallelism over {tp} ranks needs {tp} processes, found WORLD_SIZE={world}: launch with "
            f"`torchrun --nproc-per-node {tp} ...`"
        )
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    created = not dist.is_initialized()
    if created:
        backend = "nccl" if kind == "cuda" else "gloo"
        device_id = dev if kind == "cuda" else None
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, device_id=device_id)
        else:
            # A plain single process (no torchrun): a private one-rank group.
            init = f"tcp://127.0.0.1:{_free_port()}"
            dist.init_process_group(backend, init_method=init, rank=0, world_size=1, device_id=device_id)
    try:
        yield init_device_mesh(kind, (tp,)), dev
    finally:
        if created:
            dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
