"""Layer-streamed analysis: the same measurements as `measure`, with one layer's weights on the device at a time.

`measure` runs each perturbed model row by row (remove sub-block i, run layers i+1..L). Here the loops are turned
inside out: layer j is loaded once per pass and advances every run that has reached it, the base run, the teacher
run, one run per dependency-matrix row and one per attention candidate. Those runs' residual streams are the
activations kept between layers, on the device when they fit and in pinned host memory otherwise. A pass covers
as many calibration sequences as the activation budget holds; more sequences mean more passes over the weights.

Every sub-block sees exactly the tensors it sees in `measure`, batch for batch, and every sum is accumulated in
the same batch order, so the two paths give the same analysis up to the kernels' own nondeterminism (none on CPU).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ffnfusion.analyze.attention import base_totals
from ffnfusion.analyze.data_parallel import DataParallel
from ffnfusion.analyze.dependency import block_contribution
from ffnfusion.analyze.layers import LayerLoader
from ffnfusion.analyze.measure import finish_measurements, new_sums
from ffnfusion.analyze.runner import SubBlockRunner, next_token_targets
from ffnfusion.analyze.stats import cos_distance_sum, sub_block_stats_sums

# Device memory left free for the working set of one batch: a layer's temporaries, logits chunks, teacher probs.
_DEVICE_RESERVE = 0.25
# Share of the host's available memory the activations may take when they live there.
_HOST_SHARE = 0.5


class ActivationStore:
    """Residual streams kept between layers: on the compute device, or in pinned host memory copied asynchronously.

    One CUDA stream does all the work, so a host buffer is never overwritten before the copy out of it is done.
    """

    def __init__(self, compute: torch.device, where: torch.device):
        self.compute = compute
        self.where = where
        self._held: dict[Any, torch.Tensor] = {}

    def put(self, key: Any, x: torch.Tensor) -> None:
        if self.where == self.compute:
            self._held[key] = x
            return
        buf = self._held.get(key)
        if buf is None or buf.shape != x.shape:
            buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=self.compute.type == "cuda")
            self._held[key] = buf
        buf.copy_(x, non_blocking=True)

    def take(self, key: Any) -> torch.Tensor:
        return self._held[key].to(self.compute, non_blocking=True)

    def clear(self) -> None:
        self._held.clear()


@dataclass
class StreamPlan:
    """How a streamed analysis fits in memory: where the activations live and how many sequences share a pass."""

    activations: str  # "device" or "cpu"
    samples_per_pass: int
    passes: int
    activation_bytes: int  # one pass's residual streams
    largest_layer_bytes: int

    def describe(self) -> str:
        return (
            f"streaming layers: {self.passes} pass(es) of {self.samples_per_pass} sequences over the weights, "
            f"{self.activation_bytes / 2**30:.2f} GiB of activations on {self.activations}, "
            f"largest layer {self.largest_layer_bytes / 2**30:.2f} GiB"
        )


def streams_per_sequence(num_layers: int, removed: set[int], matrices: bool = True) -> int:
    """Residual streams kept per calibration sequence: base, teacher, each matrix row, each attention candidate."""
    rows = 2 * (num_layers - 1) if matrices else 0
    return 1 + bool(removed) + rows + sum(1 for i in range(num_layers) if i not in removed)


def host_available_bytes() -> int:
    """Memory the OS can give without swapping (MemAvailable: free plus reclaimable page cache)."""
    try:
        import psutil
    except ImportError:  # psutil comes with accelerate; fall back to the kernel's own figure
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.virtual_memory().available)


def plan_streaming(
    loader: LayerLoader,
    samples: int,
    seq_len: int,
    batch_size: int,
    removed: set[int],
    activations: str = "auto",
    samples_per_pass: int | None = None,
    matrices: bool = True,
) -> StreamPlan:
    """Choose where the activations live and the pass size: the fewest passes that fit, on the device if possible."""
    if activations not in ("auto", "device", "cpu"):
        raise ValueError(f"--activations {activations}: use auto, device or cpu.")
    hidden = loader.config["hidden_size"]
    streams = streams_per_sequence(loader.num_layers, removed, matrices)
    per_sequence = streams * seq_len * hidden * loader.dtype.itemsize
    largest = max(loader.layer_bytes(j) for j in range(loader.num_layers))
    host_budget = int(host_available_bytes() * _HOST_SHARE)
    if loader.device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(loader.device)
        device_budget = int(free * (1 - _DEVICE_RESERVE)) - 2 * largest
        if activations == "auto":
            activations = "device" if per_sequence * samples <= device_budget else "cpu"
        budget = device_budget if activations == "device" else host_budget
    else:  # computing on the CPU: the device is the host
        activations, budget = "device", host_budget
    if samples_per_pass is None:
        fit = max(batch_size, (budget // per_sequence) // batch_size * batch_size)
        samples_per_pass = min(samples, fit)
    elif samples_per_pass < 1:
        raise ValueError(f"--stream-samples must be at least 1 (got {samples_per_pass}).")
    elif samples_per_pass % batch_size and samples_per_pass < samples:
        raise ValueError(
            f"--stream-samples {samples_per_pass} is not a multiple of --batch-size {batch_size}; "
            "use a multiple so every pass holds whole batches."
        )
    samples_per_pass = min(samples_per_pass, samples)
    return StreamPlan(
        activations=activations,
        samples_per_pass=samples_per_pass,
        passes=math.ceil(samples / samples_per_pass),
        activation_bytes=per_sequence * samples_per_pass,
        largest_layer_bytes=largest,
    )


def _batches(tokens: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for first in range(0, tokens.shape[0], batch_size):
        yield tokens[first : first + batch_size]


@dataclass
class PassProgress:
    """Sums after the completed passes, saved after each pass so that a killed run resumes at the next one."""

    path: Path
    key: str  # everything the sums depend on: a saved file with another key belongs to another run

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        return state if state.get("key") == self.key else None

    def save(self, state: dict[str, Any]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({**state, "key": self.key}, tmp)
        tmp.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


@torch.inference_mode()
def measure_streamed(
    loader: LayerLoader,
    tokens: torch.Tensor,
    removed: set[int],
    batch_size: int,
    plan: StreamPlan,
    tick: Callable[[int], None] | None = None,
    progress: PassProgress | None = None,
    log: Callable[[str], None] | None = None,
    dp: DataParallel | None = None,
    matrices: bool = True,
) -> Any:
    """`measure`'s Measurements, loading one layer at a time (see the module docstring).

    With `progress`, the sums are saved after every pass and a saved state of the same run is resumed from. With
    `dp`, this process streams its share of the batches and the sums are added up over the processes. With
    matrices=False only the statistics and attention scores are measured (what iterative planning re-scores).
    """

    all_tokens = tokens
    if dp is not None:
        tokens = dp.my_tokens(tokens, batch_size)
    passes = math.ceil(tokens.shape[0] / plan.samples_per_pass)
    device = loader.device
    runner = SubBlockRunner(loader.model, tick, device=device)
    n = runner.num_layers
    sums = new_sums(n, device)
    candidates = [i for i in range(n) if i not in removed]
    store = ActivationStore(device, device if plan.activations == "device" else torch.device("cpu"))
    batches, done = 0, 0
    saved = progress.load() if progress else None
    if saved is not None:
        sums = {k: v.to(device) for k, v in saved["sums"].items()}
        runner.counter.sub_blocks, runner.counter.lm_heads = saved["sub_blocks"], saved["lm_heads"]
        batches, done = saved["batches"], saved["passes"]
        if log:
            log(f"resuming the streamed analysis after pass {done} of {passes}")
        if tick is not None:
            tick(sum(runner.counter.sub_blocks.values()))
    try:
        for index, first in enumerate(range(0, tokens.shape[0], plan.samples_per_pass)):
            if index < done:
                continue
            chunk = list(_batches(tokens[first : first + plan.samples_per_pass], batch_size))
            batches += len(chunk)
            _stream_pass(loader, runner, store, chunk, removed, candidates, sums, matrices)
            if progress is not None and index + 1 < passes:
                progress.save(
                    {
                        "sums": {k: v.cpu() for k, v in sums.items()},
                        "sub_blocks": dict(runner.counter.sub_blocks),
                        "lm_heads": dict(runner.counter.lm_heads),
                        "batches": batches,
                        "passes": index + 1,
                    }
                )
    finally:
        loader.close()
    return finish_measurements(sums, all_tokens, candidates, runner.counter, batches, dp)


def _stream_pass(
    loader: LayerLoader,
    runner: SubBlockRunner,
    store: ActivationStore,
    chunk: list[torch.Tensor],
    removed: set[int],
    candidates: list[int],
    sums: dict[str, torch.Tensor],
    matrices: bool,
) -> None:
    """One pass over the weights for the batches in `chunk`: embeddings, every layer in turn, the LM head."""
    device = loader.device
    loader.read_ahead(0)
    loader.load_embeddings()
    pe = None
    for b, ids in enumerate(chunk):
        x, pe = runner.embed(ids.to(device))
        store.put(("base", b), x)
        if removed:
            store.put(("teacher", b), x)
    loader.release()
    for j in range(runner.num_layers):
        loader.load_layer(j)
        for b in range(len(chunk)):
            _advance(runner, store, b, j, pe, removed, candidates, sums, matrices)
        loader.release_layer(j)
    loader.load_head()
    for b, ids in enumerate(chunk):
        _finish(runner, store, b, ids.to(device), removed, candidates, sums)
    loader.release()
    store.clear()


def _advance(
    runner: SubBlockRunner,
    store: ActivationStore,
    b: int,
    j: int,
    pe: Any,
    removed: set[int],
    candidates: list[int],
    sums: dict[str, torch.Tensor],
    matrices: bool = True,
) -> None:
    """Push batch b's runs through layer j, measure them against the base run, and start the runs layer j begins."""
    n = runner.num_layers
    stats, ffn_sums, block_sums = sums["stats"], sums["ffn"], sums["block"]
    runner.part = "baseline"
    x = store.take(("base", b))
    a = None if j in removed else runner.attention(j, x, pe)
    h = x if a is None else x + a
    f = runner.ffn(j, h)
    if a is not None:
        stats[j, 0] += sub_block_stats_sums(a, x)
    stats[j, 1] += sub_block_stats_sums(f, h)
    base_block = block_contribution(a, f)
    stats[j, 2] += sub_block_stats_sums(base_block, x)
    store.put(("base", b), h + f)

    if removed:
        runner.part = "teacher"
        store.put(("teacher", b), runner.run_layers(store.take(("teacher", b)), pe, [j], set()))

    def step(key: Any, on_layer: Callable[[int, torch.Tensor | None, torch.Tensor], None] | None = None) -> None:
        store.put(key, runner.run_layers(store.take(key), pe, [j], removed, on_layer))

    rows = range(j) if matrices else range(0)
    runner.part = "ffn_dependency"
    for i in rows:

        def ffn_row(_j: int, _a: torch.Tensor | None, ffn: torch.Tensor, i: int = i) -> None:
            ffn_sums[i, j] += cos_distance_sum(f, ffn)

        step(("ffn", b, i), ffn_row)
    runner.part = "block_dependency"
    for i in rows:

        def block_row(_j: int, attention: torch.Tensor | None, ffn: torch.Tensor, i: int = i) -> None:
            block_sums[i, j] += cos_distance_sum(base_block, block_contribution(attention, ffn))

        step(("block", b, i), block_row)
    runner.part = "attention"
    for i in candidates:
        if i < j:
            step(("attention", b, i))

    # Runs that start here: row j of each matrix (layer j's FFN or whole layer removed) and attention j removed.
    if matrices and j < n - 1:
        store.put(("ffn", b, j), h)
        store.put(("block", b, j), x)
    if j not in removed:
        store.put(("attention", b, j), x + runner.ffn(j, x))


def _finish(
    runner: SubBlockRunner,
    store: ActivationStore,
    b: int,
    ids: torch.Tensor,
    removed: set[int],
    candidates: list[int],
    sums: dict[str, torch.Tensor],
) -> None:
    """Batch b's teacher distribution, the base model's loss and KL, and every attention candidate's."""
    kl_sums, ce_sums, totals = sums["kl"], sums["ce"], sums["totals"]
    targets = next_token_targets(ids)
    base_out = store.take(("base", b))
    if removed:
        runner.part = "teacher"
        teacher = runner.teacher(store.take(("teacher", b)), targets)
    else:
        runner.part = "baseline"
        teacher = runner.teacher(base_out, targets)
    runner.part = "baseline"
    base_totals(runner, base_out, teacher, removed, totals)
    runner.part = "attention"
    for i in candidates:
        kl, ce = runner.compare_to_teacher(store.take(("attention", b, i)), teacher)
        kl_sums[i] += kl
        ce_sums[i] += ce
