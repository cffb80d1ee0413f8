"""One DeciLM layer at a time on the device, read from the original checkpoint's tensors (streamed analysis).

Input: the DeciLM config and a tensor getter over the original weights. Output: a model skeleton whose embeddings,
layers and head are materialised one at a time (the next layer read ahead on the host) and released after use.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ffnfusion.formats.plan import Plan, plan_blocks
from ffnfusion.surgery import TensorGetter, block_tensors


class LayerLoader:
    """One DeciLM module at a time, materialised on `device` in `dtype` from the original checkpoint's tensors.

    The model object is a skeleton on the meta device; `load_layer` fills a layer's parameters and `release_layer`
    returns them to meta, so at most one layer (plus the one being read ahead on the host) holds real memory.
    """

    def __init__(self, decilm_config: dict[str, Any], get: TensorGetter, dtype: torch.dtype, device: torch.device):
        from ffnfusion.modeling.modeling_decilm import DeciLMConfig, DeciLMForCausalLM

        self.config = decilm_config
        self.get = get
        self.dtype = dtype
        self.device = device
        self.num_layers = len(decilm_config["block_configs"])
        with torch.device("meta"):
            self.model = DeciLMForCausalLM(DeciLMConfig(**decilm_config))
        self.model.eval()
        # Built on the device and never cast: RoPE frequencies stay float32, as in `fuse_model`.
        self.model.model.rotary_emb = type(self.model.model.rotary_emb)(self.model.config).to(device)
        self._blocks = plan_blocks(Plan(), self.num_layers)
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._ahead: dict[int | str, Any] = {}

    def layer_bytes(self, j: int) -> int:
        """Bytes of layer j's weights in the analysis dtype (from the config: nothing is read)."""
        layer = self.model.model.layers[j]
        return sum(p.numel() for p in layer.parameters()) * self.dtype.itemsize

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        # Cast on the host while the device works on the previous layer; pinned so the copy can run asynchronously.
        t = t.to(self.dtype)
        return t.pin_memory() if self.device.type == "cuda" and not t.is_pinned() else t

    def _read(self, part: int | str) -> dict[str, torch.Tensor]:
        if part == "head":
            tied = self.config.get("tie_word_embeddings")
            names = {"norm": "model.norm.weight", "lm_head": "model.embed_tokens.weight" if tied else "lm_head.weight"}
            return {key: self._host(self.get(name)) for key, name in names.items()}
        prefix = f"model.layers.{part}."
        return {
            name.removeprefix(prefix): self._host(t)
            for name, t in block_tensors(self.config, self._blocks[part], part, self.get)
        }

    def read_ahead(self, part: int | str) -> None:
        """Start reading layer `part` (or "head") from disk in the background."""
        if part not in self._ahead and (part == "head" or 0 <= part < self.num_layers):
            self._ahead[part] = self._pool.submit(self._read, part)

    def _take(self, part: int | str) -> dict[str, torch.Tensor]:
        self.read_ahead(part)
        tensors = self._ahead.pop(part).result()
        return {k: v.to(self.device, non_blocking=True) for k, v in tensors.items()}

    def load_layer(self, j: int) -> None:
        tensors = self._take(j)
        self.read_ahead(j + 1 if j + 1 < self.num_layers else "head")
        self.model.model.layers[j].load_state_dict(tensors, strict=True, assign=True)

    def release_layer(self, j: int) -> None:
        self.model.model.layers[j].to("meta")

    def load_embeddings(self) -> None:
        weight = self.get("model.embed_tokens.weight").to(self.dtype).to(self.device)
        self.model.model.embed_tokens.load_state_dict({"weight": weight}, strict=True, assign=True)

    def load_head(self) -> None:
        tensors = self._take("head")
        self.model.model.norm.load_state_dict({"weight": tensors["norm"]}, strict=True, assign=True)
        self.model.lm_head.load_state_dict({"weight": tensors["lm_head"]}, strict=True, assign=True)

    def release(self) -> None:
        """Everything but the layers back to meta (the embeddings and head are loaded one phase at a time)."""
        for module in (self.model.model.embed_tokens, self.model.model.norm, self.model.lm_head):
            module.to("meta")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._ahead.clear()
