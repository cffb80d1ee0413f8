"""The `plan` stage: analysis.json + budgets -> plan.json (what to remove, fuse and parallelize), with predictions.

1. Attention to remove: lowest KL first (the analysis' per-layer scores), until the budget is spent:
   `remove_attention` N layers in all (those removed in the analysis included), or while the estimated KL stays
   <= `max_kl`, or until the predicted sequential depth reaches `target_depth`. Static scores estimate the KL of
   removing several attentions as the base KL plus the sum of the single-removal increments; the iterative mode
   (`rescore`) instead re-measures every remaining attention on the model after each removal, so it follows
   interactions and its KL is measured, not estimated.
2. Fusion: attention removal leaves runs of FFNs that execute back to back (layer s keeps its attention, layers
   s+1..e lose theirs). The last FFN of each run is left out of fusion by default (the paper found fusing it costs
   the most quality). A run longer than `max_group` is split into windows by dynamic programming: the fewest groups
   of at most `max_group` FFNs (each group is one sequential step), and among those the split with the smallest
   total dependency sum(M[i][j]) inside the groups, which is exactly the interaction that fusion discards. The DP is
   exact (O(n * max_group) windows per run) where a greedy left-to-right fill would cut wherever the size limit
   falls, even through the most dependent pair; `max_dependency` additionally forbids any group holding a pair
   with M above it.
3. Optionally (`parallel_threshold`), runs of intact layers whose block dependencies are all below the threshold
   become parallel blocks, split the same way with `max_parallel` members at most.
4. Predictions: sequential sub-blocks (depth) and a latency from a per-sub-block cost model, which measured
   numbers (`CostModel.load`) replace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ffnfusion.analyze.rescore import Rescorer
from ffnfusion.formats.analysis import Analysis
from ffnfusion.formats.plan import ENGINE_WIDTH_MULTIPLE, Plan, plan_blocks, sequential_sub_blocks, validate_plan
from ffnfusion.io.output import Input, check_output_file, write_atomic
from ffnfusion.plan.costs import CostModel

SPLIT_ALGORITHM = (
    "dynamic programming per run: fewest groups of <= max_group FFNs, then least total in-group dependency sum(M[i][j])"
)


@dataclass
class PlanSearch:
    """The plan and what the search saw on the way (for the CLI summary)."""

    plan: Plan
    removal: list[tuple[int, float]] = field(default_factory=list)  # (layer, KL after removing it), in order
    depth_before: int = 0
    depth_after: int = 0
    latency_before: float = 0.0
    latency_after: float = 0.0
    warnings: list[str] = field(default_factory=list)


def attention_free_runs(num_layers: int, removed: set[int]) -> list[list[int]]:
    """Maximal runs of layers whose FFNs execute back to back: [s, s+1, ..., e] with attention removed in s+1..e."""
    runs, current = [], [0]
    for i in range(1, num_layers):
        if i in removed:
            current.append(i)
        else:
            runs.append(current)
            current = [i]
    runs.append(current)
    return [r for r in runs if len(r) >= 2]


def _pairs(matrix: list[list[float | None]], group: list[int]) -> list[float]:
    return [matrix[i][j] or 0.0 for a, i in enumerate(group) for j in group[a + 1 :]]


def split_windows(
    layers: list[int], matrix: list[list[float | None]], max_group: int, max_dependency: float | None = None
) -> list[list[int]]:
    """Partition consecutive `layers` into groups (see the module docstring); singletons mean 'not fused'."""
    n = len(layers)
    inf = (float("inf"), float("inf"))
    best: list[tuple[float, float]] = [(0, 0.0)] + [inf] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(max(0, end - max_group), end):
            pairs = _pairs(matrix, layers[start:end])
            if pairs and max_dependency is not None and max(pairs) > max_dependency:
                continue
            candidate = (best[start][0] + 1, best[start][1] + sum(pairs))
            if candidate < best[end]:
                best[end], cut[end] = candidate, start
    groups, end = [], n
    while end > 0:
        groups.append(layers[cut[end] : end])
        end = cut[end]
    return groups[::-1]


def _fusion_groups(
    analysis: Analysis,
    removed: set[int],
    max_group: int,
    fuse_last: bool,
    max_dependency: float | None,
    taken: set[int] | frozenset[int] = frozenset(),
) -> list[list[int]]:
    groups = []
    for run in attention_free_runs(analysis.num_layers, removed):
        # A layer already in a parallel block keeps its attention, so it can only be a run's first layer.
        run = [i for i in run if i not in taken]
        candidate = run if fuse_last else run[:-1]
        if len(candidate) >= 2:
            groups += [
                g for g in split_windows(candidate, analysis.ffn_dependency, max_group, max_dependency) if len(g) > 1
            ]
    return groups


def _parallel_groups(
    analysis: Analysis, removed: set[int], fused: list[list[int]], threshold: float, max_parallel: int
) -> list[list[int]]:
    if analysis.model.has_o_bias:
        return []
    taken = {i for g in fused for i in g} | removed
    widths = analysis.model.ffn_widths
    groups, run = [], []
    for i in [*range(analysis.num_layers), None]:
        if i is not None and i not in taken and (not run or widths[i] == widths[run[-1]]):
            run.append(i)
            continue
        if len(run) >= 2:
            split = split_windows(run, analysis.block_dependency, max_parallel, threshold)
            groups += [g for g in split if len(g) > 1]
        run = [i] if i is not None and i not in taken else []
    return groups


def build_plan(
    analysis: Analysis,
    removed: set[int],
    max_group: int,
    fuse_last: bool = False,
    max_dependency: float | None = None,
    parallel_threshold: float | None = None,
    max_parallel: int = 2,
    fuse: bool = True,
    fixed_parallel: list[list[int]] | None = None,
) -> Plan:
    """The plan for a given set of removed attentions (fusion and parallel groups follow from it).

    fuse=False leaves every FFN unfused (attention removal only); `fixed_parallel` are parallel blocks chosen
    beforehand (their layers keep attention and stay out of fusion groups).
    """
    fixed = [list(g) for g in fixed_parallel or []]
    taken = {i for g in fixed for i in g}
    fused = _fusion_groups(analysis, removed, max_group, fuse_last, max_dependency, taken) if fuse else []
    parallel = (
        _parallel_groups(analysis, removed | taken, fused, parallel_threshold, max_parallel)
        if parallel_threshold is not None
        else []
    )
    parallel = sorted(fixed + parallel)
    return Plan(remove_attention=sorted(removed), fuse_ffn=fused, parallel_blocks=parallel)


def depth(plan: Plan, num_layers: int) -> int:
    return sequential_sub_blocks(plan_blocks(plan, num_layers))


def search_plan(
    analysis: Analysis,
    remove_attention: int | None = None,
    max_kl: float | None = None,
    max_group: int = 8,
    target_depth: int | None = None,
    fuse_last: bool = False,
    max_dependency: float | None = None,
    parallel_threshold: float | None = None,
    max_parallel: int = 2,
    costs: CostModel | None = None,
    rescore: Rescorer | None = None,
    *,
    fuse: bool = True,
    fixed_parallel: list[list[int]] | None = None,
) -> PlanSearch:
    """Choose attention removals under the budgets, then fusion (and parallel) groups; see the module docstring.

    For the recipes (`plan.recipes`): `fuse=False` removes attention only, and `fixed_parallel` gives parallel
    blocks chosen beforehand (their layers keep attention and stay out of fusion groups).
    """
    _check_budgets(remove_attention, max_kl, max_group, max_parallel, target_depth)
    n = analysis.num_layers
    costs = costs or CostModel.analytic(analysis)
    widths = analysis.model.ffn_widths

    def make(removed: set[int]) -> Plan:
        args = (max_group, fuse_last, max_dependency, parallel_threshold, max_parallel, fuse, fixed_parallel)
        return build_plan(analysis, removed, *args)

    keep = {i for g in fixed_parallel or [] for i in g}
    if keep & set(analysis.settings.remove_attention):
        raise ValueError(
            f"parallel blocks {fixed_parallel} need whole layers, but the analysis removed attention there"
        )
    plan, removed, kl, steps = _remove_attention(analysis, make, keep, remove_attention, max_kl, target_depth, rescore)
    depth_after = depth(plan, n)
    warnings = _budget_warnings(analysis, removed, depth_after, remove_attention, target_depth)
    engine_widths = all(w % ENGINE_WIDTH_MULTIPLE == 0 for w in widths)
    validate_plan(plan, n, widths, require_engine_widths=engine_widths, has_o_bias=analysis.model.has_o_bias)

    depth_before = depth(Plan(), n)
    latency_before = costs.latency_ms(plan_blocks(Plan(), n), widths)
    latency_after = costs.latency_ms(plan_blocks(plan, n), widths)
    budgets = dict(
        remove_attention=remove_attention,
        max_kl=max_kl,
        max_group=max_group,
        target_depth=target_depth,
        fuse_last=fuse_last,
        max_dependency=max_dependency,
        parallel_threshold=parallel_threshold,
        max_parallel=max_parallel,
    )
    latency = _latency_info(latency_before, latency_after, costs)
    depths = {"original": depth_before, "plan": depth_after}
    plan.info = _info(analysis, plan, steps, kl, rescore is not None, budgets, depths, latency, warnings)
    return PlanSearch(plan, steps, depth_before, depth_after, latency_before, latency_after, warnings)


def _check_budgets(
    remove_attention: int | None, max_kl: float | None, max_group: int, max_parallel: int, target_depth: int | None
) -> None:
    if remove_attention is not None and max_kl is not None:
        raise ValueError("give either --remove-attention N or --max-kl X, not both.")
    if remove_attention is not None and remove_attention < 0:
        raise ValueError(f"--remove-attention must be >= 0 (got {remove_attention}).")
    if max_group < 2:
        raise ValueError(f"--max-group must be at least 2 (got {max_group}): a group of one fuses nothing.")
    if max_parallel < 2:
        raise ValueError(f"--max-parallel must be at least 2 (got {max_parallel}).")
    if target_depth is not None and target_depth < 1:
        raise ValueError(f"--target-depth must be at least 1 (got {target_depth}).")


def _remove_attention(
    analysis: Analysis,
    make: Callable[[set[int]], Plan],
    keep: set[int],
    remove_attention: int | None,
    max_kl: float | None,
    target_depth: int | None,
    rescore: Rescorer | None,
) -> tuple[Plan, set[int], float, list[tuple[int, float]]]:
    """Greedy: remove the attention sub-block of least KL until a budget is met; the plan rebuilt after each step.

    Returns the plan, the removed layers, the predicted KL and the (layer, KL) steps in removal order.
    """
    n = analysis.num_layers
    removed = set(analysis.settings.remove_attention)
    static = analysis.kl_by_layer()
    kl = analysis.base_kl
    steps: list[tuple[int, float]] = []
    plan = make(removed)
    budgeted = remove_attention is not None or max_kl is not None or target_depth is not None
    while budgeted:
        if remove_attention is not None and len(removed) >= remove_attention:
            break
        if target_depth is not None and depth(plan, n) <= target_depth:
            break
        scores = rescore(removed) if rescore is not None else {i: s for i, s in static.items() if i not in removed}
        scores = {i: s for i, s in scores.items() if i not in keep}
        if not scores:
            break
        layer = min(scores, key=lambda i: (scores[i], i))
        # Static scores each include the base model's own KL; only the increment adds up.
        next_kl = scores[layer] if rescore is not None else kl + max(scores[layer] - analysis.base_kl, 0.0)
        if max_kl is not None and next_kl > max_kl:
            break
        removed.add(layer)
        kl = next_kl
        steps.append((layer, next_kl))
        plan = make(removed)
    return plan, removed, kl, steps


def _budget_warnings(
    analysis: Analysis, removed: set[int], depth_after: int, remove_attention: int | None, target_depth: int | None
) -> list[str]:
    """The budgets the search could not meet (recorded in plan.json)."""
    base = set(analysis.settings.remove_attention)
    warnings: list[str] = []
    if target_depth is not None and depth_after > target_depth:
        warnings.append(
            f"target depth {target_depth} not reached (predicted {depth_after}): the attention budget or the "
            "available layers ran out; raise the budget or --max-group"
        )
    if remove_attention is not None and len(removed) < remove_attention and target_depth is None:
        warnings.append(f"only {len(removed)} attention sub-blocks could be removed (asked for {remove_attention})")
    if remove_attention is not None and len(base) > remove_attention:
        warnings.append(
            f"the analysis was measured with {len(base)} attention sub-blocks already removed, more than the budget "
            f"of {remove_attention}; they stay removed"
        )
    return warnings


def _latency_info(before: float, after: float, costs: CostModel) -> dict[str, Any]:
    return {
        "unit": "ms per decode step",
        "original": round(before, 6),
        "plan": round(after, 6),
        "speedup": round(before / after, 4) if after else None,
        "cost_model": costs.model_dump(),
    }


def _info(
    analysis: Analysis,
    plan: Plan,
    steps: list[tuple[int, float]],
    kl: float,
    iterative: bool,
    budgets: dict[str, Any],
    depths: dict[str, int],
    latency: dict[str, Any],
    warnings: list[str],
) -> dict[str, Any]:
    from ffnfusion import __version__

    m = analysis.model
    return {
        "created_by": f"ffnfusion {__version__} plan",
        "model": {"name": m.name, "model_type": m.model_type, "num_layers": m.num_layers, "config_hash": m.config_hash},
        "analysis": {
            "schema_version": analysis.schema_version,
            "tokens_sha256": analysis.calibration.tokens_sha256,
            "remove_attention": analysis.settings.remove_attention,
        },
        "budgets": budgets,
        "attention_selection": "iterative (re-scored after each removal)" if iterative else "static (analysis KL)",
        "removal_order": [{"layer": layer, "kl": round(v, 6)} for layer, v in steps],
        "predicted_kl": round(kl, 6),
        "predicted_kl_is": "measured on the calibration data" if iterative or not steps else "additive estimate",
        "fusion": {
            "split_algorithm": SPLIT_ALGORITHM,
            "groups": [
                {
                    "layers": g,
                    "max_dependency": round(max(_pairs(analysis.ffn_dependency, g)), 6),
                    "sum_dependency": round(sum(_pairs(analysis.ffn_dependency, g)), 6),
                }
                for g in plan.fuse_ffn
            ],
        },
        "parallel": [
            {"layers": g, "max_block_dependency": round(max(_pairs(analysis.block_dependency, g)), 6)}
            for g in plan.parallel_blocks
        ],
        "predicted": {"sequential_sub_blocks": depths, "latency": latency},
        "warnings": warnings,
    }


def is_plan_file(path: Path) -> bool:
    """Whether `path` holds a plan (so `plan --overwrite` may replace it)."""
    try:
        Plan.model_validate_json(path.read_bytes())
    except (OSError, ValueError):
        return False
    return True


def check_plan_output(out: str | Path, inputs: Iterable[Input] = (), overwrite: bool = False) -> Path:
    """Refuse a plan.json location that is an input, a folder, or a file that is not an earlier plan."""
    return check_output_file(out, "plan", is_plan_file, inputs, replace=overwrite, error=FileExistsError)


def write_plan(plan: Plan, out: str | Path, overwrite: bool = False) -> Path:
    """Write plan.json atomically (a temporary file renamed into place)."""
    out = Path(out)
    check_plan_output(out, overwrite=overwrite)
    return write_atomic(out, plan.model_dump_json(indent=2) + "\n")


def check_model(analysis: Analysis, model: str) -> None:
    """Refuse an analysis made from another model than MODEL (compares the architecture, no weights loaded)."""
    from ffnfusion.adapters import adapter_for
    from ffnfusion.analyze.identity import model_identity
    from ffnfusion.formats.analysis import check_same_model
    from ffnfusion.io.source import resolve_model

    hf_config = resolve_model(model).config()
    identity = model_identity(model, adapter_for(hf_config).decilm_config(hf_config))
    check_same_model(analysis, identity)
