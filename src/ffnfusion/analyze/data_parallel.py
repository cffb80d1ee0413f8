"""Analysis over several GPUs (or CPU processes): each process measures every world-th calibration batch.

Every figure in analysis.json is a sum over batches divided by a token count, so the processes need to exchange
nothing but their sums at the end (one all-reduce). The batches are the same as in one process, so the result
equals the single-process analysis up to the order of the final additions (float64 rounding). Launch with
`torchrun --nproc-per-node N` (or `accelerate launch`): the processes join the launcher's torch.distributed group
(NCCL on GPUs, gloo on CPUs) and each takes the GPU of its local rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ffnfusion.analyze.runner import EvalCounter

PARTS = ("baseline", "teacher", "ffn_dependency", "block_dependency", "attention")


@dataclass
class DataParallel:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, batch_index: int) -> bool:
        return batch_index % self.world == self.rank

    def my_tokens(self, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
        """This process's batches, concatenated; batching them again gives back exactly those batches."""
        starts = [s for b, s in enumerate(range(0, tokens.shape[0], batch_size)) if self.mine(b)]
        if not starts:
            return tokens[:0]
        return torch.cat([tokens[s : s + batch_size] for s in starts])

    def all_reduce(self, sums: dict[str, torch.Tensor], counter: EvalCounter, batches: int) -> int:
        """Add up every process's sums (in place), evaluation counts and batch count; returns the total batches."""
        import torch.distributed as dist

        for name in sorted(sums):
            dist.all_reduce(sums[name])
        counts = [counter.sub_blocks.get(p, 0) for p in PARTS] + [counter.lm_heads.get(p, 0) for p in PARTS]
        device = next(iter(sums.values())).device
        totals = torch.tensor([*counts, batches], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        values = [int(v) for v in totals.tolist()]
        counter.sub_blocks = {p: v for p, v in zip(PARTS, values[: len(PARTS)]) if v}
        counter.lm_heads = {p: v for p, v in zip(PARTS, values[len(PARTS) : 2 * len(PARTS)]) if v}
        return values[-1]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def from_environment() -> DataParallel | None:
    """The launch's process group when started by torchrun / accelerate launch with more than one process.

    Joins the group the launcher describes in the environment (NCCL when GPUs are visible, else gloo); each process
    takes the GPU of its local rank.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DataParallel(dist.get_rank(), dist.get_world_size(), device)
