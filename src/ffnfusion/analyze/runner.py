"""Sub-block-level execution of a DeciLM model, with the prefix activations of one batch cached.

Every supported family is first converted to DeciLM (`fuse_model(model, Plan())`, exact), so the analysis has one
module structure to drive: layer i is `x += o_proj(attend(N1(x)))` then `x += mlp(N2(x))`. The runner evaluates
these sub-blocks one at a time, so a perturbed run can start from the cached input of the sub-block it perturbs
instead of from the embeddings, and counts every evaluation for the cost figure in analysis.json.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Rows of the flattened [tokens, vocab] logits handled at once: bounds the float32 temporaries to ~256 MiB.
_LOGIT_ELEMENTS = 2**26


@dataclass
class Prefix:
    """Residual-stream states of one batch through the base model (attention in `removed` skipped).

    attn_in[i] is layer i's input (attn_in[L] the last layer's output), ffn_in[i] FFN i's input, attn_out[i] and
    ffn_out[i] the sub-blocks' residual contributions (attn_out[i] is None where the attention is removed).
    """

    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    attn_in: list[torch.Tensor]
    ffn_in: list[torch.Tensor]
    attn_out: list[torch.Tensor | None]
    ffn_out: list[torch.Tensor]


@dataclass
class EvalCounter:
    """Sub-block and lm_head evaluations per named part of the analysis (one batch = one unit of work)."""

    sub_blocks: dict[str, int] = field(default_factory=dict)
    lm_heads: dict[str, int] = field(default_factory=dict)

    def add(self, part: str, sub_blocks: int = 0, lm_heads: int = 0) -> None:
        self.sub_blocks[part] = self.sub_blocks.get(part, 0) + sub_blocks
        self.lm_heads[part] = self.lm_heads.get(part, 0) + lm_heads


class SubBlockRunner:
    """Runs a DeciLM model (one plain layer per original layer) sub-block by sub-block."""

    def __init__(
        self,
        model: torch.nn.Module,
        tick: Callable[[int], None] | None = None,
        device: torch.device | None = None,
    ):
        """`device`: where the activations live, for a model whose weights are loaded piecewise (streamed)."""
        layers = list(model.model.layers)
        if any(getattr(layer, "parallel", 1) != 1 or not layer.has_attention or not layer.has_ffn for layer in layers):
            raise ValueError("analysis needs the unmodified model: every layer with its own attention and FFN")
        self.model = model
        self.layers = layers
        self.num_layers = len(layers)
        self.counter = EvalCounter()
        self.part = "baseline"
        self._tick = tick
        self._device = device

    def _count(self, sub_blocks: int = 0, lm_heads: int = 0) -> None:
        self.counter.add(self.part, sub_blocks, lm_heads)
        if self._tick is not None and sub_blocks:
            self._tick(sub_blocks)

    @property
    def device(self) -> torch.device:
        return self._device or next(self.model.parameters()).device

    def embed(self, ids: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        x = self.model.model.embed_tokens(ids)
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        return x, self.model.model.rotary_emb(x, positions)

    def attention(self, i: int, x: torch.Tensor, pe: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Attention i's residual contribution (causal, no padding: calibration windows are full)."""
        layer = self.layers[i]
        self._count(1)
        return layer.self_attn.o_proj(layer.self_attn.attend(layer.input_layernorm(x), pe, None, None))

    def ffn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        self._count(1)
        return layer.mlp(layer.post_attention_layernorm(x))

    def prefix(self, ids: torch.Tensor, removed: set[int]) -> Prefix:
        x, pe = self.embed(ids)
        attn_in, ffn_in, attn_out, ffn_out = [], [], [], []
        for i in range(self.num_layers):
            attn_in.append(x)
            a = None if i in removed else self.attention(i, x, pe)
            if a is not None:
                x = x + a
            attn_out.append(a)
            ffn_in.append(x)
            f = self.ffn(i, x)
            ffn_out.append(f)
            x = x + f
        attn_in.append(x)
        return Prefix(pe, attn_in, ffn_in, attn_out, ffn_out)

    def run_layers(
        self,
        x: torch.Tensor,
        pe: tuple[torch.Tensor, torch.Tensor],
        layers: Iterable[int],
        removed: set[int],
        on_layer: Callable[[int, torch.Tensor | None, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Run whole layers from x; on_layer(j, attention contribution or None, FFN contribution) sees each."""
        for j in layers:
            a = None if j in removed else self.attention(j, x, pe)
            if a is not None:
                x = x + a
            f = self.ffn(j, x)
            x = x + f
            if on_layer is not None:
                on_layer(j, a, f)
        return x

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """float32 next-token log-probabilities [tokens, vocab] of a final residual stream [batch, seq, hidden]."""
        self._count(lm_heads=1)
        flat = x.reshape(-1, x.shape[-1])
        rows = max(1, _LOGIT_ELEMENTS // self.model.config.vocab_size)
        return torch.cat([F.log_softmax(self._logits(flat[r : r + rows]), -1) for r in range(0, flat.shape[0], rows)])

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(x)).float()

    def teacher(self, x: torch.Tensor, targets: torch.Tensor) -> Teacher:
        """The reference distribution of a final residual stream, kept in the form `compare_to_teacher` reads."""
        self._count(lm_heads=1)
        flat = x.reshape(-1, x.shape[-1])
        rows = max(1, _LOGIT_ELEMENTS // self.model.config.vocab_size)
        probs, neg_entropy = [], []
        ce = torch.zeros((), dtype=torch.float64, device=x.device)
        for r in range(0, flat.shape[0], rows):
            z = self._logits(flat[r : r + rows])
            lse = torch.logsumexp(z, -1)
            p = torch.exp(z - lse[:, None])
            # sum_v p log p = p.z - lse, written exactly as the student side computes p.z_q - lse_q, so that an
            # unchanged student cancels to exactly 0.
            neg_entropy.append(torch.linalg.vecdot(p, z) - lse)
            probs.append(p)
            ce += _cross_entropy_sum(z, lse, targets[r : r + rows])
        return Teacher(torch.cat(probs), torch.cat(neg_entropy), targets, ce)

    def compare_to_teacher(self, x: torch.Tensor, teacher: Teacher) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum over tokens of KL(teacher || model), sum of next-token cross-entropy), float64 0-d tensors.

        KL = sum_v p (log p - log q) = [p.z_p - lse_p] - [p.z_q - lse_q], so each student chunk needs only its
        logits, one logsumexp and one dot product with the cached teacher probabilities: two passes over the
        vocabulary instead of a full log_softmax plus kl_div, which dominated the attention scores on CPU.
        """
        self._count(lm_heads=1)
        flat = x.reshape(-1, x.shape[-1])
        rows = max(1, _LOGIT_ELEMENTS // self.model.config.vocab_size)
        kl = torch.zeros((), dtype=torch.float64, device=x.device)
        ce = torch.zeros((), dtype=torch.float64, device=x.device)
        for r in range(0, flat.shape[0], rows):
            z = self._logits(flat[r : r + rows])
            lse = torch.logsumexp(z, -1)
            cross = torch.linalg.vecdot(teacher.probs[r : r + rows], z) - lse
            kl += (teacher.neg_entropy[r : r + rows] - cross).double().sum()
            ce += _cross_entropy_sum(z, lse, teacher.targets[r : r + rows])
        return kl, ce


@dataclass
class Teacher:
    """The original model's next-token distribution for one batch: probabilities [tokens, vocab] (float32),
    sum_v p log p per token, the targets (-100 where none) and the original's cross-entropy sum."""

    probs: torch.Tensor
    neg_entropy: torch.Tensor
    targets: torch.Tensor
    ce_sum: torch.Tensor


def _cross_entropy_sum(z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    valid = targets >= 0
    picked = z.gather(1, targets.clamp_min(0)[:, None])[:, 0]
    return torch.where(valid, lse - picked, torch.zeros_like(lse)).double().sum()


def next_token_targets(ids: torch.Tensor) -> torch.Tensor:
    """Flattened [batch * seq] next-token ids, -100 at each sequence's last position."""
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    return targets.reshape(-1)
