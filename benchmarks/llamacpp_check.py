"""llama.cpp runs what `ffnfusion export --format gguf` writes: perplexity agreement and the fused speedup on CPU.

Not part of CI: it needs llama.cpp binaries (llama-perplexity, llama-bench, llama-tokenize). Build them from the
source that llama-cpp-python's sdist vendors (no git access needed):

    pip download llama-cpp-python --no-deps --no-binary :all: -d /tmp/llamacpp
    tar xzf /tmp/llamacpp/llama_cpp_python-*.tar.gz -C /tmp/llamacpp
    cmake -S /tmp/llamacpp/llama_cpp_python-*/vendor/llama.cpp -B /tmp/llamacpp/build -G Ninja \
        -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF
    cmake --build /tmp/llamacpp/build -j2 --target llama-perplexity llama-bench llama-tokenize

On a CPU that advertises AMX inside a VM that does not enable it (llama-bench dies with SIGILL/SIGSEGV in
ggml_backend_amx_mul_mat on q8_0 files), add `"-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"` and the
same `-DCMAKE_CXX_FLAGS` to the first cmake command: -march=native then keeps everything but AMX.

Then, from the project root:

    PYTHONPATH=src python benchmarks/llamacpp_check.py --bin /tmp/llamacpp/build/bin --work /tmp/llamacpp/work

What it does, with SmolLM2-135M-Instruct (the Q4_1 GGUF in ../shared/assets, dequantized to fp32) as the original:
1. `ffnfusion fuse` with an empty plan (the original, in the DeciLM format: 30 blocks) and with PLAN (fused);
2. `ffnfusion export --format gguf --dtype f16` of both (the `deci` architecture, no llama.cpp converter);
3. llama-tokenize on the text must give the Hugging Face tokenizer's ids (the pre-tokenizer is right);
4. llama-perplexity on WikiText-2 raw test (LF line ends) for --chunks chunks of --ctx tokens, and the same
   windows scored in transformers (fp32): each chunk's second half, as llama-perplexity scores it;
5. llama-bench (prompt processing and generation speed) of both files, and of the original Q4_1 GGUF's
   llama-architecture perplexity as a cross-check of the deci path.
Writes `<work>/llamacpp_check.json` and prints a Markdown table.

`--bench` does only the speed part, more carefully, for every --dtypes (default f16 and q8_0). Before each dtype's
group it waits until the 1-minute load average is at most --max-load (polling every 15 s, at most --max-wait
seconds), then runs llama-bench `-p 512 -n 128 -r REPS` once per file, original and fused back to back (the order
reversed for the next dtype and the next measurement); the whole is repeated --measurements times so run-to-run noise
shows. It reports llama-bench's mean ± standard deviation over the repetitions, their median, and fused / original,
with the load average before and after each group, in `<work>/llamacpp_bench.json` and a Markdown table (`--report
JSON` prints it again). `--extra DTYPE=LABEL=FILE` adds another GGUF to that dtype's group, e.g. the original
converted by llama.cpp's own convert_hf_to_gguf.py (llama architecture), to check that the `deci` graph costs
nothing extra:

    PYTHONPATH=src python benchmarks/llamacpp_check.py --bin /tmp/llamacpp/build/bin --work /tmp/llamacpp/work \
        --bench --extra f16=llama-arch=/tmp/llamacpp/llama-arch-f16.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
GGUF = ASSETS / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = ASSETS / "data" / "wikitext2_raw_test" / "wiki.test.raw"
PLAN = ROOT / "benchmarks" / "plans" / "smollm2_cut27.json"


def sh(cmd: list[str], log: Path) -> str:
    print("$", " ".join(map(str, cmd)), flush=True)
    result = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
    log.write_text(result.stdout + "\n--- stderr ---\n" + result.stderr)
    if result.returncode:
        sys.exit(f"failed ({result.returncode}); see {log}")
    return result.stdout + result.stderr


def llama_ppl(bin_dir: Path, model: Path, text: Path, ctx: int, chunks: int, threads: int, log: Path) -> float:
    out = sh([bin_dir / "llama-perplexity", "-m", model, "-f", text, "-c", ctx, "-b", ctx, "--chunks", chunks,
              "-t", threads], log)  # fmt: skip
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", out).group(1))


def hf_ppl(folder: Path, ids: list[int], ctx: int, chunks: int, bos: int | None) -> float:
    """llama-perplexity's score in transformers: chunk i = ids[i*ctx:(i+1)*ctx] (first token -> BOS when the
    tokenizer adds one), NLL of the tokens after position ctx/2, all chunks pooled."""
    from transformers import AutoModelForCausalLM

    import ffnfusion  # noqa: F401  (DeciLM with the Auto classes)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    first, nll, count = ctx // 2, 0.0, 0
    for i in range(chunks):
        chunk = torch.tensor(ids[i * ctx : (i + 1) * ctx])
        if bos is not None:
            chunk[0] = bos
        with torch.no_grad():
            logits = model(chunk[None]).logits[0].double()
        logp = torch.log_softmax(logits[first : ctx - 1], -1)
        nll -= logp.gather(1, chunk[first + 1 :, None]).sum().item()
        count += ctx - 1 - first
    return float(torch.tensor(nll / count).exp())


def wait_for_load(max_load: float, max_wait: float) -> tuple[list[float], float]:
    """Wait (polling every 15 s, at most max_wait s) until the 1-minute load average is at most max_load."""
    t0 = time.monotonic()
    while os.getloadavg()[0] > max_load and time.monotonic() - t0 < max_wait:
        print(f"load average {os.getloadavg()[0]:.2f} > {max_load}: waiting", flush=True)
        time.sleep(15)
    return list(os.getloadavg()), time.monotonic() - t0


def cpu_busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores, /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def llama_bench(bin_dir: Path, model: Path, prompt: int, gen: int, threads: int, reps: int, log: Path) -> dict:
    out = sh([bin_dir / "llama-bench", "-m", model, "-p", prompt, "-n", gen, "-t", threads, "-r", reps, "-o", "json"],
             log)  # fmt: skip
    result: dict = {}
    for row in json.loads(out[out.index("[") : out.rindex("]") + 1]):
        result["pp" if row["n_prompt"] else "tg"] = {k: row[k] for k in ("avg_ts", "stddev_ts", "samples_ts")}
        result["cpu"], result["build"] = row.get("cpu_info"), row.get("build_commit")
    return result


def bench(args: argparse.Namespace, files: dict[str, dict[str, Path]]) -> None:
    """files: dtype -> label -> GGUF. See the module docstring (`--bench`)."""
    gen = args.gen or 128
    results: dict = {"date": time.strftime("%Y-%m-%d"), "measurements": []}
    results["settings"] = vars(args) | {"bin": str(args.bin), "work": str(args.work), "plan": str(PLAN), "gen": gen}
    results["files"] = {d: {k: str(v) for k, v in m.items()} for d, m in files.items()}
    # The load is checked before each dtype's group (its files back to back), since a group takes a minute or two and
    # another process can start at any time; the JSON is rewritten after each group.
    for m in range(args.measurements):
        entry: dict = {"runs": {}, "load": {}}
        results["measurements"].append(entry)
        for i, (dtype, models) in enumerate(files.items()):
            load, waited = wait_for_load(args.max_load, args.max_wait)
            print(f"measurement {m + 1}, {dtype}: load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
                  f"(waited {waited:.0f} s)", flush=True)  # fmt: skip
            labels = list(models)[::-1] if (m + i) % 2 else list(models)
            # Other processes' CPU time during the group: the machine's busy time less llama-bench's own. When it is
            # more than --max-other core-seconds per second the group is run again (at most --retries times).
            for attempt in range(args.retries + 1):
                busy, own, wall = cpu_busy_s(), os.times(), time.monotonic()
                runs = {}
                for label in labels:
                    log = args.work / f"bench-{dtype}-{label}-{m}.log"
                    row = llama_bench(args.bin, models[label], args.ctx, gen, args.threads, args.reps, log)
                    results["cpu"], results["llamacpp_build"] = row.pop("cpu"), f"{row.pop('build')} ({args.sdist})"
                    runs[label] = row | {"order": labels.index(label)}
                end = os.times()
                ours = end.children_user + end.children_system - own.children_user - own.children_system
                wall = time.monotonic() - wall
                other = max(0.0, cpu_busy_s() - busy - ours) / wall
                print(f"  {dtype}: {wall:.0f} s, other processes used {other:.2f} cores on average", flush=True)
                if other <= args.max_other or attempt == args.retries:
                    break
                load, waited = wait_for_load(args.max_load, args.max_wait)
            entry["runs"][dtype] = runs
            entry["load"][dtype] = {"before": load, "after": list(os.getloadavg()), "waited_s": round(waited),
                                    "other_cores": round(other, 3), "wall_s": round(wall, 1), "attempts": attempt + 1,
                                    "finished": time.strftime("%H:%M:%S")}  # fmt: skip
            (args.work / "llamacpp_bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print_bench(results)


def print_bench(results: dict) -> None:
    """The Markdown table of a `--bench` run: llama-bench's mean ± std, then the median of the repetitions (robust
    to a repetition that another process slowed down)."""
    st = results["settings"]
    print(f"\nllama-bench, {results['cpu']}, {st['threads']} threads, {st['reps']} repetitions, build "
          f"{results['llamacpp_build']}: tokens/s, mean ± std (median)\n")  # fmt: skip
    print(
        "| dtype | test | measurement (load 1 min before -> after; other processes' cores) | original | fused | "
        "fused / original (medians) | other files |"
    )
    print("|---|---|---|---:|---:|---:|---|")
    for dtype, models in results["files"].items():
        for kind, name in (("pp", f"pp{st['ctx']}"), ("tg", f"tg{st['gen']}")):
            for m, entry in enumerate(results["measurements"]):
                runs = {k: v[kind] for k, v in entry["runs"][dtype].items()}
                med = {k: statistics.median(v["samples_ts"]) for k, v in runs.items()}
                cell = {k: f"{v['avg_ts']:.1f} ± {v['stddev_ts']:.1f} ({med[k]:.1f})" for k, v in runs.items()}
                ratio = runs["fused"]["avg_ts"] / runs["original"]["avg_ts"]
                other = ", ".join(f"{k} {cell[k]}" for k in models if k not in ("original", "fused"))
                load = entry["load"][dtype]
                print(f"| {dtype} | {name} | {m + 1} ({load['before'][0]:.2f} -> {load['after'][0]:.2f}; "
                      f"{load.get('other_cores', float('nan')):.2f}) | "
                      f"{cell['original']} | {cell['fused']} | {ratio:.3f}x ({med['fused'] / med['original']:.3f}x) | "
                      f"{other} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", type=Path, help="folder with llama-perplexity, llama-bench, llama-tokenize")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llamacpp/work"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="f16")
    ap.add_argument("--gen", type=int, help="tokens generated per llama-bench run (default 64; 128 with --bench)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating llama-bench rounds per model")
    ap.add_argument("--sdist", default="0.3.36", help="llama-cpp-python version the binaries were built from")
    ap.add_argument("--skip-ppl", action="store_true", help="only the speed part (files already exported)")
    ap.add_argument("--bench", action="store_true", help="only speed: llama-bench mean ± std, see the docstring")
    ap.add_argument("--dtypes", default="f16,q8_0", help="--bench: export dtypes to time")
    ap.add_argument("--reps", type=int, default=10, help="--bench: llama-bench repetitions (-r)")
    ap.add_argument("--measurements", type=int, default=2, help="--bench: how many times to repeat the whole run")
    ap.add_argument("--max-load", type=float, default=1.0, help="--bench: wait for this 1-minute load average")
    ap.add_argument("--max-wait", type=float, default=1200, help="--bench: wait at most this long (s), then run")
    ap.add_argument("--max-other", type=float, default=0.05, help="--bench: rerun a group when other processes used "
                    "more cores than this on average while it ran")  # fmt: skip
    ap.add_argument("--retries", type=int, default=3, help="--bench: how often to rerun a disturbed group")
    ap.add_argument("--report", type=Path, help="print the table of an earlier --bench run's JSON and exit")
    ap.add_argument("--extra", action="append", default=[], metavar="DTYPE=LABEL=FILE",
                    help="--bench: another GGUF to time with that dtype's pair")  # fmt: skip
    args = ap.parse_args()
    if args.report:
        print_bench(json.loads(args.report.read_text()))
        return
    if args.bin is None:
        ap.error("--bin is required")
    from transformers import AutoTokenizer

    from ffnfusion.export import export_gguf
    from ffnfusion.formats.plan import Plan
    from ffnfusion.fuse import fuse
    from ffnfusion.io.source import export_transformers_folder

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    text = work / "wiki.test.lf.raw"
    text.write_bytes(WIKI.read_bytes().replace(b"\r\n", b"\n"))
    original = export_transformers_folder(GGUF, work / "original-hf")
    by_dtype: dict[str, dict[str, tuple[Path, Path]]] = {}
    for dtype in args.dtypes.split(",") if args.bench else [args.dtype]:
        for label, plan in (("original", Plan()), ("fused", Plan.load(PLAN))):
            folder = work / f"{label}-decilm"
            if not (folder / "config.json").is_file():
                fuse(str(original), plan, folder)
            out = work / f"{label}-{dtype}.gguf"
            t0 = time.perf_counter()
            s = export_gguf(folder, out, dtype=dtype, overwrite=True)
            print(f"exported {label} {dtype}: {s.blocks_after} blocks, {s.bytes / 2**20:.1f} MiB, pre "
                  f"{s.pre_tokenizer!r} ({s.pre_source}) in {time.perf_counter() - t0:.1f} s")  # fmt: skip
            by_dtype.setdefault(dtype, {})[label] = (folder, out)
    if args.bench:
        files = {d: {k: v[1] for k, v in m.items()} for d, m in by_dtype.items()}
        for extra in args.extra:
            dtype, label, path = extra.split("=", 2)
            files.setdefault(dtype, {})[label] = Path(path)
        bench(args, files)
        return
    models = by_dtype[args.dtype]
    args.gen = args.gen or 64

    tokenizer = AutoTokenizer.from_pretrained(models["original"][0])
    ids = tokenizer(text.read_text(encoding="utf-8"))["input_ids"]
    head = work / "head.txt"
    head.write_text(text.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    out = sh([args.bin / "llama-tokenize", "-m", models["fused"][1], "-f", head, "--ids", "--log-disable"],
             work / "tokenize.log")  # fmt: skip
    llama_ids = json.loads(out.strip().splitlines()[-1])
    hf_ids = tokenizer(head.read_text(encoding="utf-8"))["input_ids"]
    # llama.cpp adds BOS when the GGUF says so (tokenizer.ggml.add_bos_token); llama-perplexity then puts it first in
    # every chunk. Read that from llama-tokenize itself.
    bos = llama_ids[0] if len(llama_ids) == len(hf_ids) + 1 else None
    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "settings": vars(args) | {"bin": str(args.bin), "work": str(args.work), "plan": str(PLAN)},
        "tokenizer_agrees": llama_ids == ([bos] if bos is not None else []) + hf_ids,
        "tokens_checked": len(hf_ids),
        "models": {},
    }
    print("llama.cpp tokenizer agrees with transformers:", results["tokenizer_agrees"], f"({len(hf_ids)} tokens)")
    previous = work / "llamacpp_check.json"
    if args.skip_ppl and previous.is_file():
        earlier = json.loads(previous.read_text())
        results["models"] = {k: {n: v[n] for n in ("gguf", "blocks", "ppl_llamacpp", "ppl_transformers")}
                             for k, v in earlier["models"].items()}  # fmt: skip
        results["q4_1_llama_arch_ppl"] = earlier["q4_1_llama_arch_ppl"]
    else:
        for label, (folder, gguf_file) in models.items():
            log = work / f"ppl-{label}.log"
            ppl_cpp = llama_ppl(args.bin, gguf_file, text, args.ctx, args.chunks, args.threads, log)
            ppl_hf = hf_ppl(folder, ids, args.ctx, args.chunks, bos)
            blocks = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
            results["models"][label] = {"gguf": str(gguf_file), "blocks": blocks}
            results["models"][label] |= {"ppl_llamacpp": ppl_cpp, "ppl_transformers": ppl_hf}
            print(f"{label}: llama.cpp PPL {ppl_cpp:.4f}, transformers PPL {ppl_hf:.4f}", flush=True)
        results["q4_1_llama_arch_ppl"] = llama_ppl(
            args.bin, GGUF, text, args.ctx, args.chunks, args.threads, work / "ppl-q4_1.log"
        )
    # The machine may be shared: alternate the two models for --rounds rounds of one llama-bench repetition each, and
    # report the median and the best round (the least disturbed) of each.
    speeds: dict = {label: {"pp": [], "tg": []} for label in models}
    for r in range(args.rounds):
        order = list(models) if r % 2 == 0 else list(models)[::-1]
        for label in order:
            out = sh([args.bin / "llama-bench", "-m", models[label][1], "-p", args.ctx, "-n", args.gen, "-t",
                      args.threads, "-r", 1, "-o", "json"], work / f"bench-{label}-{r}.log")  # fmt: skip
            for row in json.loads(out[out.index("[") : out.rindex("]") + 1]):
                speeds[label]["pp" if row["n_prompt"] else "tg"].append(row["avg_ts"])
                results["cpu"] = row.get("cpu_info")
                results["llamacpp_build"] = f"{row.get('build_commit')} (llama-cpp-python {args.sdist})"
    results["load_average_after"] = os.getloadavg()
    for label, kinds in speeds.items():
        for kind, values in kinds.items():
            results["models"][label][f"{kind}_tokens_per_s"] = {
                "median": statistics.median(values), "best": max(values), "rounds": values}  # fmt: skip
    (work / "llamacpp_check.json").write_text(json.dumps(results, indent=2) + "\n")
    o, f = results["models"]["original"], results["models"]["fused"]
    print(f"\n| | original | fused |\n|---|---:|---:|\n| blocks | {o['blocks']} | {f['blocks']} |")
    print(f"| llama-perplexity PPL ({args.chunks} x {args.ctx}) | {o['ppl_llamacpp']:.4f} | {f['ppl_llamacpp']:.4f} |")
    print(f"| transformers PPL, same windows | {o['ppl_transformers']:.4f} | {f['ppl_transformers']:.4f} |")
    for kind, name in (("pp", f"prompt {args.ctx}"), ("tg", f"generation {args.gen}")):
        for stat in ("median", "best"):
            a, b = o[f"{kind}_tokens_per_s"][stat], f[f"{kind}_tokens_per_s"][stat]
            print(f"| {name}, tokens/s ({stat} of {args.rounds}) | {a:.1f} | {b:.1f} ({b / a:.3f}x) |")
    print(f"\nQ4_1 original (llama architecture) llama-perplexity PPL: {results['q4_1_llama_arch_ppl']:.4f}")


if __name__ == "__main__":
    main()
