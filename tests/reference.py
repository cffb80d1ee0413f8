"""A straightforward reference for what a plan computes, built from the ORIGINAL transformers modules.

Nothing here is shared with ffnfusion's own modeling or surgery code: it runs the original layers' attention and
MLP modules and applies the plan's semantics literally (removed sub-blocks skipped, fused FFN runs summed over
the group's input, parallel blocks summing whole-layer residual contributions).
"""

from __future__ import annotations

import torch

from ffnfusion.formats.plan import Plan


@torch.no_grad()
def reference_logits(model: torch.nn.Module, plan: Plan, input_ids: torch.Tensor) -> torch.Tensor:
    inner = model.model
    x = inner.embed_tokens(input_ids)
    positions = torch.arange(input_ids.shape[1])[None].expand(input_ids.shape[0], -1)
    pe = inner.rotary_emb(x, positions)
    removed_attn, removed_ffn = set(plan.remove_attention), set(plan.remove_ffn)
    fuse_start = {g[0]: g for g in plan.fuse_ffn}
    par_start = {g[0]: g for g in plan.parallel_blocks}

    def attention(i: int, h: torch.Tensor) -> torch.Tensor:
        layer = inner.layers[i]
        out = layer.self_attn(layer.input_layernorm(h), position_embeddings=pe, attention_mask=None)[0]
        return out

    def ffn(i: int, h: torch.Tensor) -> torch.Tensor:
        layer = inner.layers[i]
        return layer.mlp(layer.post_attention_layernorm(h))

    i = 0
    while i < len(inner.layers):
        if i in par_start:
            group = par_start[i]
            contributions = []
            for j in group:
                y = x + attention(j, x)
                contributions.append(y + ffn(j, y) - x)
            x = x + sum(contributions)
            i = group[-1] + 1
            continue
        if i not in removed_attn:
            x = x + attention(i, x)
        if i in fuse_start:
            group = fuse_start[i]
            x = x + sum(ffn(j, x) for j in group)
            i = group[-1] + 1
            continue
        if i not in removed_ffn:
            x = x + ffn(i, x)
        i += 1
    return model.lm_head(inner.norm(x))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def logits_without_ffnfusion(folder, ids: torch.Tensor, tmp_path) -> torch.Tensor:
    """Logits of the checkpoint in `folder`, computed by a fresh Python that loads it with trust_remote_code only.

    The child asserts that ffnfusion never got imported, so the checkpoint's own modeling file did the work.
    """
    import os
    import subprocess
    import sys
    import textwrap

    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert not any(k.startswith("ffnfusion") for k in sys.modules), "ffnfusion was imported"
        with torch.no_grad():
            torch.save(m(torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "logits.pt")
