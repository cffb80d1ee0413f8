"""`ffnfusion run`: analyze -> plan -> fuse -> heal -> eval -> bench -> report, each stage's files in one folder.

Layout of DIR:

    analysis/            analysis.json, heatmap PNGs          (analyze)
    plan.json                                                 (plan)
    fused/               fused checkpoint                     (fuse)
    healed/              healed checkpoint, training log      (heal)
    data/                held-out self-generated text for eval, when --data is `self`
    eval.json, eval.md                                        (eval)
    bench.json                                                (bench; needs a GPU)
    report.md, report.html, plan.png, tradeoff.png            (report)
    run.json             the configuration and, per stage, the key of its inputs and when it finished

A stage is skipped when its outputs exist and the key of its inputs (its own options and the keys of the stages it
reads) equals the key recorded when it last finished, so an interrupted run resumes where it stopped and a changed
option reruns that stage and everything downstream.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ffnfusion.formats.run import load_run_state
from ffnfusion.io.output import check_output_dir, write_atomic, write_marker
from ffnfusion.pipeline.config import (
    HEAL_BUDGET_KEYS,
    HEAL_SIZE_KEYS,
    HEAL_TOKENS_MAX,
    HEAL_TOKENS_MIN,
    HEAL_TOKENS_PER_PARAMETER,
    OUTPUTS,
    STAGES,
    UPSTREAM,
    RunConfig,
    RunConfigError,
    _key,
)
from ffnfusion.pipeline.preflight import preflight


class Run:
    """One run folder: its configuration, its state file, and the stages' calls."""

    def __init__(self, config: RunConfig, out: str | Path, log: Callable[[str], None] = print):
        self.config = config
        self.dir = Path(out).resolve()
        self.log = log
        self.state_file = self.dir / "run.json"
        self.state: dict[str, Any] = load_run_state(self.state_file)
        self.keys: dict[str, str] = {}
        self._default_heal_tokens: int | None = None

    def path(self, relative: str) -> Path:
        return self.dir / relative

    def _save_state(self) -> None:
        self.state["config"] = self.config.model_dump()
        write_atomic(self.state_file, json.dumps(self.state, indent=2, default=str) + "\n")

    def stage_key(self, stage: str) -> str:
        cfg = self.config
        own = {"options": getattr(cfg, stage, {}), "model": cfg.model, "seed": cfg.seed, "device": cfg.device}
        if stage in ("analyze", "heal"):
            own["data"] = cfg.data
        if stage == "eval":
            own["eval_data"] = cfg.eval_data or (None if cfg.data == "self" else cfg.data)
        return _key({"own": own, "upstream": [self.keys.get(s) for s in UPSTREAM[stage]]})

    def is_current(self, stage: str) -> bool:
        record = self.state["stages"].get(stage, {})
        outputs_exist = all(self.path(p).exists() for p in OUTPUTS[stage])
        return outputs_exist and record.get("key") == self.keys[stage]

    def execute(self, stop_after: str | None = None, skip: set[str] | None = None) -> dict[str, str]:
        """Run every stage in order; returns stage -> 'ran' | 'up to date' | 'skipped: reason'."""
        skip = skip or set()
        if unknown := skip - set(STAGES):
            raise RunConfigError(f"--skip names unknown stages {sorted(unknown)}; stages: {', '.join(STAGES)}")
        if stop_after is not None and stop_after not in STAGES:
            raise RunConfigError(f"--stop-after {stop_after!r} is not a stage; stages: {', '.join(STAGES)}")
        for needed, by in (
            ("fuse", "heal"),
            ("fuse", "eval"),
            ("fuse", "bench"),
            ("plan", "fuse"),
            ("analyze", "plan"),
        ):
            if needed in skip and by not in skip and not self.path(OUTPUTS[needed][0]).exists():
                raise RunConfigError(f"--skip {needed} leaves nothing for {by}: skip {by} too, or run {needed}.")
        last = STAGES.index(stop_after) if stop_after is not None else len(STAGES) - 1
        skipped = {stage: self._skip_reason(stage, skip) for stage in STAGES}
        will_run = [s for s in STAGES[: last + 1] if skipped[s] is None]
        self.preflight(will_run)
        for stage in STAGES[: last + 1]:  # said up front, not after the stages before have run for minutes
            if skipped[stage] not in (None, "--skip"):
                self.log(f"[{stage}] will be skipped: {skipped[stage]}")
        if "heal" in will_run and not HEAL_SIZE_KEYS & self.config.heal.keys():
            options = self.heal_options()
            samples = options.get("self_samples")
            epochs = int(options.get("max_epochs", 1))
            corpus = f", on {samples:,} sequences the teacher writes" if samples else ""
            corpus += f", each seen up to {epochs} times" if samples and epochs > 1 else ""
            self.log(
                f"[heal] budget: {options['tokens']:,} training tokens ({HEAL_TOKENS_PER_PARAMETER} per parameter)"
                f"{corpus}; set heal: {{tokens: N}} or {{minutes: M}} to change it"
            )
        # A run folder is resumed, never replaced: non-empty, it must be an earlier run's folder.
        check_output_dir(self.dir, "run", self.config.inputs(), overwrite=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_marker(self.dir, "run")
        status: dict[str, str] = {}
        for stage in STAGES:
            self.keys[stage] = self.stage_key(stage)
            reason = skipped[stage]
            if reason:
                status[stage] = f"skipped: {reason}"
                self.state["stages"].pop(stage, None)
                self.keys[stage] = "skipped"
                self.log(f"[{stage}] skipped: {reason}")
            elif self.is_current(stage):
                status[stage] = "up to date"
                self.log(f"[{stage}] up to date")
            else:
                self.log(f"[{stage}] running")
                started = time.perf_counter()
                getattr(self, f"_{stage}")()
                seconds = round(time.perf_counter() - started, 1)
                self.state["stages"][stage] = {"key": self.keys[stage], "seconds": seconds, "finished": time.time()}
                status[stage] = "ran"
                self.log(f"[{stage}] done in {seconds} s")
            self._save_state()
            if stage == stop_after:
                break
        return status

    def preflight(self, stages: list[str]) -> None:
        """Check every input of the stages that will run before the first starts (see `pipeline.preflight`)."""
        preflight(self.config, stages)

    def _skip_reason(self, stage: str, skip: set[str]) -> str | None:
        if stage in skip:
            return "--skip"
        if stage == "bench" and not self.on_gpu:
            return "needs a CUDA GPU (latency on CPU says nothing about serving speed)"
        if stage == "heal" and not self.on_gpu and not HEAL_BUDGET_KEYS & self.config.heal.keys():
            tokens = self.default_heal_tokens()
            return (
                f"no CUDA GPU: a useful heal of this model ({tokens:,} tokens) takes hours on a CPU at a few "
                "thousand tokens/s; set heal: {tokens: N} or {max_steps: N} to heal here anyway"
            )
        return None

    @property
    def on_gpu(self) -> bool:
        return _cuda() and self.config.device != "cpu"

    def default_heal_tokens(self) -> int:
        """The healing budget when the configuration names none: sized to the model (see HEAL_TOKENS_PER_PARAMETER)."""
        from ffnfusion.adapters import adapter_for
        from ffnfusion.fuse import count_parameters
        from ffnfusion.io.source import resolve_model

        if self._default_heal_tokens is None:
            hf_config = resolve_model(self.config.model).config()
            parameters = count_parameters(adapter_for(hf_config).decilm_config(hf_config))
            tokens = int(HEAL_TOKENS_PER_PARAMETER * parameters)
            self._default_heal_tokens = min(max(tokens, HEAL_TOKENS_MIN), HEAL_TOKENS_MAX)
        return self._default_heal_tokens

    def heal_options(self) -> dict[str, Any]:
        """heal's options: the configuration's, with the default budget (and a self-written corpus of that size)."""
        cfg = self.config
        options = {"data": [cfg.data], "seed": cfg.seed, **cfg.heal}
        if isinstance(options["data"], str):
            options["data"] = [options["data"]]
        if not HEAL_SIZE_KEYS & cfg.heal.keys():
            options["tokens"] = self.default_heal_tokens()
        if options.get("tokens") and "self" in options["data"] and "self_samples" not in cfg.heal:
            # A corpus the teacher writes for this budget, seen max_epochs times (default once: no sequence twice).
            # Writing a token costs about as much as training on it, so epochs > 1 buy training tokens cheaply.
            per_epoch = -(-options["tokens"] // max(1, int(options.get("max_epochs", 1))))
            options["self_samples"] = -(-per_epoch // options.get("seq_len", 512))
        return options

    # ---- the stages: thin calls of each stage's own function --------------------------------------------------

    def _analyze(self) -> None:
        from ffnfusion.analyze import analyze

        cfg = self.config
        options = {"data": cfg.data, "seed": cfg.seed, "device": cfg.device, **cfg.analyze}
        analyze(cfg.model, self.path("analysis"), overwrite=True, show_progress=True, log=self.log, **options)

    def _plan(self) -> None:
        from ffnfusion.analyze import load_analysis
        from ffnfusion.analyze.rescore import iterative_rescorer, recipe_measurer
        from ffnfusion.plan.costs import CostModel
        from ffnfusion.plan.search import write_plan
        from ffnfusion.plan.settings import PlanSettings
        from ffnfusion.plan.stage import choose_plan

        analysis = load_analysis(self.path("analysis"))
        s = PlanSettings(**self.config.plan)
        model = self.config.model
        rescore = iterative_rescorer(analysis, model=model, log=self.log) if s.iterative else None
        cost_model = CostModel.load(s.costs, analysis) if s.costs else None
        depth_alone = s.target_depth is not None and s.remove_attention is None and s.max_kl is None
        if (s.recipe is not None or s.measure_recipes) and not depth_alone:
            raise ValueError("plan.recipe and plan.measure_recipes need plan.target_depth (and no other budget)")
        if s.remove_attention is None and s.max_kl is None and s.target_depth is None:
            # A first run's budget: a quarter of the attention sub-blocks, as a starting point to look at.
            s = s.model_copy(update={"remove_attention": max(1, analysis.num_layers // 4)})
        # At a target depth alone, recipes are compared (as `plan --target-depth` does); the best predicted KL wins.
        measure = recipe_measurer(analysis, model=model, log=self.log) if s.measure_recipes else None
        result, comparison = choose_plan(analysis, s, cost_model, rescore, measure)
        if comparison is not None:
            self.log(f"plan: recipe {comparison.chosen.name} ({comparison.why})")
        for warning in result.warnings:
            self.log(f"plan: warning: {warning}")
        write_plan(result.plan, self.path("plan.json"), overwrite=True)
        p = result.plan
        self.log(
            f"plan: remove attention {p.remove_attention}, fuse {p.fuse_ffn}"
            + (f", drop FFN {p.remove_ffn}" if p.remove_ffn else "")
            + (f", parallel {p.parallel_blocks}" if p.parallel_blocks else "")
        )

    def _fuse(self) -> None:
        from ffnfusion.fuse import fuse

        summary = fuse(
            self.config.model, self.path("plan.json"), self.path("fused"), overwrite=True, **self.config.fuse
        )
        self.log(f"fused: sequential sub-blocks {summary.sub_blocks_before} -> {summary.sub_blocks_after}")

    def _heal(self) -> None:
        from ffnfusion.heal.settings import HealSettings
        from ffnfusion.heal.stage import heal

        cfg = self.config
        setting_names = set(HealSettings.model_fields)
        options = self.heal_options()
        settings = HealSettings(**{k: v for k, v in options.items() if k in setting_names})
        extra = {k: v for k, v in options.items() if k not in setting_names}
        from transformers.trainer_utils import get_last_checkpoint

        checkpoints = self.path("healed.checkpoints")
        resume = checkpoints.is_dir() and get_last_checkpoint(str(checkpoints)) is not None
        if checkpoints.is_dir() and not resume:
            # An earlier heal died before its first checkpoint (out of memory, killed): nothing to continue.
            self.log(f"heal: no checkpoint in {checkpoints} from the interrupted heal; healing again from step 0")
        summary = heal(
            self.path("fused"),
            cfg.model,
            self.path("healed"),
            settings,
            overwrite=True,
            resume=resume,
            checkpoint_dir=checkpoints,
            **extra,
        )
        self.log(f"healed: {summary.steps} steps, loss {summary.first_loss} -> {summary.last_loss}")

    def _eval_text(self) -> str:
        """Perplexity text: the user's, or held-out text the model writes from openers and a seed healing never uses."""
        cfg = self.config
        if cfg.eval_data:
            return cfg.eval_data
        if cfg.data != "self":
            self.log("eval: no eval_data given; scoring perplexity on --data (the text healing trained on)")
            return cfg.data
        from ffnfusion.data import self_generated_texts
        from ffnfusion.generate.prompts import HELD_OUT_OPENERS
        from ffnfusion.io.source import load_model, resolve_model

        target = self.path("data/eval_self.txt")
        if not target.is_file():
            source = resolve_model(cfg.model)
            model = load_model(source, "float32", cfg.device or ("cuda" if _cuda() else "cpu"))
            texts = self_generated_texts(
                model, source.tokenizer(), 32, 512, cfg.seed + 104729, key=f"eval|{cfg.model}", openers=HELD_OUT_OPENERS
            )
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("\n\n".join(texts))
        return str(target)

    def _eval(self) -> None:
        from ffnfusion.eval.stage import evaluate

        cfg = self.config
        models, labels = [cfg.model, str(self.path("fused"))], ["original", "fused"]
        if self.keys.get("heal") != "skipped":
            models.append(str(self.path("healed")))
            labels.append("healed")
        options = {"data": self._eval_text(), "seed": cfg.seed, **cfg.eval}
        if cfg.device:
            options.setdefault("device", cfg.device)
        evaluate(models, reference=cfg.model, labels=labels, out=self.path("eval.json"), **options)

    def _bench(self) -> None:
        from ffnfusion.bench.stage import bench

        cfg = self.config
        bench(cfg.model, compare=[str(self.path("fused"))], out=self.path("bench.json"), log=self.log, **cfg.bench)

    def _report(self) -> None:
        from ffnfusion.report import write_report

        write_report(self.dir)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run(
    model: str | None,
    out: str | Path,
    config: str | Path | None = None,
    stop_after: str | None = None,
    skip: set[str] | None = None,
    log: Callable[[str], None] = print,
    **overrides: Any,
) -> dict[str, str]:
    """Load the configuration (YAML file plus command-line overrides) and execute the pipeline in `out`."""
    cfg = RunConfig.load(config, model=model, **overrides)
    check_output_dir(out, "run", [*cfg.inputs(), ("run configuration", config)], overwrite=True)
    return Run(cfg, out, log).execute(stop_after=stop_after, skip=skip)
