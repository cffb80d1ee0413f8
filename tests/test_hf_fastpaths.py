"""The fused checkpoint in transformers' own fast paths: dynamic and static KV caches, left padding, eager and sdpa,
torch.compile of the decode step, bf16/fp16, hidden states and loss, Auto classes, device_map and the tokenizer.

The plan removes the FIRST block's attention (so KV-cache entries do not line up with block indices), fuses an FFN
run behind a kept attention, and runs two whole blocks in parallel; 6 layers become 3 blocks, 2 with attention.
"""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, CompileConfig

import ffnfusion  # noqa: F401  (registers DeciLM with the Auto classes)
from analysis_fakes import save_with_tokenizer
from conftest import tiny_model
from ffnfusion.formats.plan import Plan
from ffnfusion.fuse import engine_support, fuse
from ffnfusion.surgery import fuse_model
from reference import reference_logits, rel_err

PLAN = Plan(remove_attention=[0, 2, 3], fuse_ffn=[[1, 2, 3]], parallel_blocks=[[4, 5]])
STEPS = 6
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def case(request) -> tuple[torch.nn.Module, torch.nn.Module]:
    model = tiny_model(request.param, seed=21)
    return model, fuse_model(model, PLAN)


def _ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _reference_greedy(model, ids: torch.Tensor, steps: int = STEPS) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy tokens of the plan's reference (full recomputation, no cache) and each step's logits."""
    logits = []
    for _ in range(steps):
        step = reference_logits(model, PLAN, ids)[:, -1]
        logits.append(step)
        ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=1)
    return ids, logits


def _generate(model, ids, mask, cache: str | None, **kw):
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=STEPS,
        do_sample=False,
        cache_implementation=cache,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
        **kw,
    )


def _left_padded() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    short, long = _ids(1, 4, seed=1), _ids(1, 7, seed=2)
    ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask, [short, long]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_matches_reference(case, attn: str, cache: str) -> None:
    """Dynamic and static cache, eager and sdpa, one batch of equal rows and one left-padded: reference tokens."""
    model, fused = case
    fused.set_attn_implementation(attn)
    ids = _ids(2, 6, seed=3)
    want, want_logits = _reference_greedy(model, ids)
    out = _generate(fused, ids, torch.ones_like(ids), None if cache == "dynamic" else cache)
    assert torch.equal(out.sequences, want)
    for got, ref in zip(out.logits, want_logits, strict=True):
        assert rel_err(got, ref) <= 1e-4

    padded, mask, rows = _left_padded()
    out = _generate(fused, padded, mask, None if cache == "dynamic" else cache)
    for i, row in enumerate(rows):
        want, want_logits = _reference_greedy(model, row)
        assert torch.equal(out.sequences[i, -want.shape[1] :], want[0]), (i, attn, cache)
        for got, ref in zip(out.logits, want_logits, strict=True):
            assert rel_err(got[i : i + 1], ref) <= 1e-4


def test_empty_plan_gives_the_original_tokens_in_every_path() -> None:
    model = tiny_model("qwen3", seed=5)
    fused = fuse_model(model, Plan())
    ids, mask, _ = _left_padded()
    for attn in ("sdpa", "eager"):
        model.set_attn_implementation(attn)
        fused.set_attn_implementation(attn)
        for cache in (None, "static"):
            want = _generate(model, ids, mask, cache)
            got = _generate(fused, ids, mask, cache)
            assert torch.equal(got.sequences, want.sequences), (attn, cache)
            for g, w in zip(got.logits, want.logits, strict=True):
                assert rel_err(g, w) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype: torch.dtype) -> None:
    """bf16/fp16: the empty plan decodes the original's tokens; the fused model matches the reference in that dtype
    to its rounding, and its static-cache tokens equal its dynamic-cache tokens."""
    model = tiny_model("llama", seed=6).to(dtype)
    ids, mask, _ = _left_padded()
    empty = fuse_model(model, Plan())
    for cache in (None, "static"):
        assert torch.equal(_generate(empty, ids, mask, cache).sequences, _generate(model, ids, mask, cache).sequences)
    fused = fuse_model(model, PLAN)
    plain = _ids(2, 9, seed=4)
    with torch.no_grad():
        assert rel_err(fused(plain).logits.float(), reference_logits(model, PLAN, plain).float()) < 3e-2
    dynamic = _generate(fused, ids, mask, None).sequences
    assert torch.equal(_generate(fused, ids, mask, "static").sequences, dynamic)


def test_autocast_keeps_attention_in_half_precision(monkeypatch) -> None:
    """An fp32 model under bf16 autocast (how heal trains): q and k reach attention in bf16, not promoted to fp32 by
    fp32 RoPE tables, and the logits stay within bf16 rounding of the fp32 reference."""
    fused = fuse_model(tiny_model("llama", seed=8), PLAN)
    ids = _ids(2, 9, seed=6)
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        want = fused(ids).logits
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fused(ids).logits
            cos, sin = fused.model.rotary_emb(fused.model.embed_tokens(ids), torch.arange(9)[None])
    assert seen and set(seen) == {(torch.bfloat16,) * 3}
    assert cos.dtype == sin.dtype == torch.bfloat16
    assert rel_err(got.float(), want) < 3e-2


def test_hidden_states_loss_and_tuple_output() -> None:
    model = tiny_model("qwen2", seed=7)
    ids = _ids(2, 8, seed=5)
    labels = ids.clone()
    labels[0, :3] = -100
    empty = fuse_model(model, Plan())
    with torch.no_grad():
        want = model(ids, labels=labels, output_hidden_states=True)
        got = empty(ids, labels=labels, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states) == 7
    for g, w in zip(got.hidden_states, want.hidden_states, strict=True):
        assert rel_err(g, w) <= 1e-5
    assert abs(float(got.loss) - float(want.loss)) <= 1e-5

    fused = fuse_model(model, PLAN)
    with torch.no_grad():
        out = fused(ids, labels=labels, output_hidden_states=True)
        ref = reference_logits(model, PLAN, ids)
        as_tuple = fused(ids, labels=labels, return_dict=False)
    want_loss = F.cross_entropy(ref[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert abs(float(out.loss) - float(want_loss)) <= 1e-5
    assert len(out.hidden_states) == 4  # embeddings + 3 blocks, the last one normalised
    assert rel_err(fused.lm_head(out.hidden_states[-1]).detach(), ref) <= 1e-5
    assert torch.equal(as_tuple[0], out.loss) and torch.equal(as_tuple[1], out.logits)


def test_compiled_static_cache_decode_is_one_graph() -> None:
    """generate's own compilation of the decode step with a static cache, fullgraph, as on a GPU.

    CPU runs it with the aot_eager backend (dynamo + AOTAutograd, no code generation): about 10 s on 2 cores,
    against ~95 s for inductor's C++ code generation of the same tiny model (benchmarks/hf_generate.py compiles
    with inductor on GPUs)."""
    model = tiny_model("qwen3", seed=21)
    fused = fuse_model(model, PLAN)
    ids = _ids(2, 6, seed=3)
    want, _ = _reference_greedy(model, ids)
    config = CompileConfig(fullgraph=True, backend="aot_eager")
    config._compile_all_devices = True  # generate compiles only on accelerators unless told
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = _generate(fused, ids, torch.ones_like(ids), "static", compile_config=config)
    assert torch.equal(out.sequences, want)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert not torch._dynamo.utils.counters["graph_break"]


@pytest.fixture(scope="module")
def fused_dir(tmp_path_factory) -> tuple[torch.nn.Module, Path, Path]:
    root = tmp_path_factory.mktemp("hf")
    model = tiny_model("llama", seed=21)
    save_with_tokenizer(model, root / "model")
    fuse(str(root / "model"), PLAN, root / "fused")
    return model, root / "model", root / "fused"


def test_checkpoint_loads_with_auto_classes_device_map_and_tokenizer(fused_dir, monkeypatch) -> None:
    model, original, folder = fused_dir

    def no_prompt(*_args, **_kwargs):
        raise AssertionError("transformers asked a question")

    monkeypatch.setattr(builtins, "input", no_prompt)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("abc").input_ids == AutoTokenizer.from_pretrained(original)("abc").input_ids
    loaded = AutoModelForCausalLM.from_pretrained(folder, device_map="auto", dtype=torch.float32).eval()
    block = loaded.config.block_configs[0]
    assert block.attention.no_op and not hasattr(block.ffn, "hidden_act")  # as vLLM / SGLang / TRT-LLM read it
    ids = _ids(2, 6, seed=3)
    want, _ = _reference_greedy(model, ids)
    assert torch.equal(_generate(loaded, ids, torch.ones_like(ids), "static").sequences, want)


def test_trust_remote_code_static_cache_without_ffnfusion(fused_dir, tmp_path) -> None:
    """A Python without ffnfusion: AutoTokenizer and AutoModel through the checkpoint's own file, static cache."""
    model, _, folder = fused_dir
    ids = _ids(2, 6, seed=3)
    want, _ = _reference_greedy(model, ids)
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
        m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert not any(k.startswith("ffnfusion") for k in sys.modules), "ffnfusion was imported"
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens={STEPS}, do_sample=False,
                         cache_implementation="static")
        torch.save(out, {str(tmp_path / "out.pt")!r})
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), want)


def test_engine_table_says_how_each_verdict_is_known() -> None:
    block = {"attention": {"no_op": True, "n_heads_in_group": None}, "ffn": {"no_op": False, "ffn_mult": 1.5}}
    config = {"hidden_size": 512, "head_dim": 64, "num_attention_heads": 8, "block_configs": [block]}
    table = engine_support(config)
    assert list(table) == ["transformers", "llama.cpp", "vLLM", "SGLang", "TensorRT-LLM"]
    assert all(v.startswith("yes") for v in table.values())
    assert "verified" in table["transformers"] and "verified" in table["llama.cpp"]
    assert all("inferred" in table[e] and "not run" in table[e] for e in ("vLLM", "SGLang", "TensorRT-LLM"))
    biased = engine_support({**config, "attention_bias": True, "mlp_bias": True})
    assert biased["vLLM"].startswith("yes") and biased["llama.cpp"].startswith("no")
    assert biased["SGLang"].startswith("no") and biased["TensorRT-LLM"].startswith("no")
    parallel = engine_support({**config, "block_configs": [{**block, "parallel_blocks": 2}]})
    assert parallel["transformers"].startswith("yes") and all(
        v.startswith("no") for e, v in parallel.items() if e != "transformers"
    )


def test_benchmark_smoke(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "hf_generate.py"), "--smoke", "--out", str(tmp_path / "r.json")],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "r.json").is_file() and "ms/token" in proc.stdout
