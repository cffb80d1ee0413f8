"""Recipes compared at the same depth: which way of reaching `--target-depth` D loses the least quality.

Every recipe ends at exactly D sequential sub-blocks (where it can reach D at all):

- `attention`: attention removal only, lowest KL first (the planner's attention selection), no fusion.
- `fusion`: attention removal + FFN fusion of the runs it leaves, the last FFN of each run left out (the
  planner's default). Removing one attention can save two sub-blocks (the FFN joins a fused group); when that
  overshoots D, the last member of the most dependent group is taken out of it again (+1 per step).
- `parallel`: k pairs of whole layers run in parallel (the pairs with the lowest block dependency M[i][i+1]),
  the rest as `fusion` does it; k = 1 .. `max_pairs`, the k with the lowest predicted KL wins.
- `layer-drop`: plain depth pruning, the baseline a user would otherwise pick (ShortGPT): drop whole layers
  with the lowest block influence 1 - cos(x_in, x_out) (analysis.json `layers[i].block.cos_distance`) until
  D is reached; an odd remainder removes the lowest-KL attention of a kept layer. A dropped layer leaves the
  written checkpoint entirely (no dummy block), which every engine loads.

Predicted KL of each recipe (the figure `auto` compares), best source first:
- measured (`measure`, `plan --measure-recipes`): KL(original || fused model of the recipe's plan) on the
  analysis' calibration tokens, the model loaded once. Exact for every recipe.
- iterative (`rescore`, `plan --iterative`): the attention part measured after each removal; the rest of a
  recipe (fusion, parallel pairs, dropped layers) by the proxy below.
- static: the attention part as the analysis' additive estimate; the rest by the proxy.

The proxy (no model at hand) turns what the analysis measured into KL: a sub-block's perturbation of the residual
stream, relative to |x|, is its |h|/|x| times sqrt(2 * (1 - cos)) of the change; KL is second order in a small
perturbation, so KL ~ a * perturbation^2, with `a` the median of KL_i / (|h|/|x|)_i^2 over the attention
sub-blocks the analysis scored (their KL is measured). Fusion changes FFN j's input by the earlier members of its
group (sum of M[i][j]); a parallel pair changes the second layer's input by the first (block M[i][i+1]); a dropped
layer removes its whole contribution (block |h|/|x|). It ranks, it does not measure: the plan and the CLI say so.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ffnfusion.analyze.rescore import Measurer, Rescorer
from ffnfusion.formats.analysis import Analysis
from ffnfusion.formats.engines import EXTERNAL, PARALLEL_GROUPS, plan_limits
from ffnfusion.formats.plan import Plan, plan_blocks
from ffnfusion.plan.costs import CostModel
from ffnfusion.plan.search import PlanSearch, _info, _pairs, depth, search_plan

RECIPES = ("attention", "fusion", "parallel", "layer-drop")
CHOICES = ("auto", *RECIPES)
PROXY = "proxy"


@dataclass
class Recipe:
    name: str
    plan: Plan
    depth: int
    attention_kl: float  # KL of the attention removals (estimate or iterative measurement)
    proxy_kl: float  # proxy for the rest (fusion, parallel pairs, dropped layers); 0 for `attention`
    kl: float  # the figure compared: measured, or attention_kl + proxy_kl
    kl_is: str
    latency_ms: float
    reached: bool
    note: str = ""
    removal: list[tuple[int, float]] = field(default_factory=list)
    variants: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "recipe": self.name,
            "plan": self.plan.model_dump(exclude={"info", "format", "version"}),
            "sequential_sub_blocks": self.depth,
            "reached_target": self.reached,
            "predicted_kl": round(self.kl, 6) if math.isfinite(self.kl) else None,
            "predicted_kl_is": self.kl_is,
            "attention_kl": round(self.attention_kl, 6),
            "proxy_kl": round(self.proxy_kl, 6),
            "latency_ms": round(self.latency_ms, 6),
            "note": self.note,
            "not_loaded_by": plan_limits(self.plan),
            **({"variants": self.variants} if self.variants else {}),
        }


@dataclass
class RecipeComparison:
    chosen: Recipe
    recipes: list[Recipe]
    why: str
    result: PlanSearch  # the chosen plan with its info, as search_plan returns it


def proxy_scale(analysis: Analysis) -> float:
    """KL per squared relative perturbation: the median over scored attention sub-blocks of KL_i / (|h|/|x|)_i^2."""
    ratios = []
    for score in analysis.attention_importance:
        stats = analysis.layers[score.layer].attention
        if stats is not None and stats.rel_norm > 0:
            ratios.append(max(score.kl - analysis.base_kl, 0.0) / stats.rel_norm**2)
    return statistics.median(ratios) if ratios else 0.0


def fusion_proxy(analysis: Analysis, groups: list[list[int]], scale: float) -> float:
    total = 0.0
    for g in groups:
        for b, j in enumerate(g[1:], start=1):
            m = sum(analysis.ffn_dependency[i][j] or 0.0 for i in g[:b])
            total += 2 * analysis.layers[j].ffn.rel_norm ** 2 * m
    return scale * total


def parallel_proxy(analysis: Analysis, groups: list[list[int]], scale: float) -> float:
    total = 0.0
    for g in groups:
        for b, j in enumerate(g[1:], start=1):
            m = sum(analysis.block_dependency[i][j] or 0.0 for i in g[:b])
            total += 2 * analysis.layers[j].block.rel_norm ** 2 * m
    return scale * total


def drop_proxy(analysis: Analysis, layers: list[int], scale: float) -> float:
    return scale * sum(analysis.layers[i].block.rel_norm ** 2 for i in layers)


def _exact_depth(analysis: Analysis, plan: Plan, target: int) -> Plan:
    """Take FFNs back out of fused groups (the member most dependent on the rest first) until depth == target."""
    n = analysis.num_layers
    groups = [list(g) for g in plan.fuse_ffn]
    while groups and depth(plan.model_copy(update={"fuse_ffn": groups}), n) < target:
        # The last member reads every other member's output: its dependency on them is what fusion discards.
        worst = max(range(len(groups)), key=lambda k: (sum(_pairs(analysis.ffn_dependency, groups[k])), -k))
        groups[worst] = groups[worst][:-1]
        groups = [g for g in groups if len(g) > 1]
    return plan.model_copy(update={"fuse_ffn": groups})


def _candidate_pairs(analysis: Analysis, threshold: float | None) -> list[list[int]]:
    """Disjoint pairs of intact adjacent layers of equal FFN width, lowest block dependency first."""
    if analysis.model.has_o_bias:
        return []
    base = set(analysis.settings.remove_attention)
    widths = analysis.model.ffn_widths
    options = [
        (analysis.block_dependency[i][i + 1] or 0.0, i)
        for i in range(analysis.num_layers - 1)
        if i not in base and i + 1 not in base and widths[i] == widths[i + 1]
    ]
    pairs: list[list[int]] = []
    used: set[int] = set()
    for m, i in sorted(options):
        if threshold is not None and m > threshold:
            break
        if i not in used and i + 1 not in used:
            pairs.append([i, i + 1])
            used |= {i, i + 1}
    return pairs


def _memo(rescore: Rescorer | None) -> Rescorer | None:
    """Recipes walk the same removal order: re-score each removed set once."""
    if rescore is None:
        return None
    cache: dict[frozenset[int], dict[int, float]] = {}

    def scores(removed: set[int]) -> dict[int, float]:
        key = frozenset(removed)
        if key not in cache:
            cache[key] = rescore(set(removed))
        return dict(cache[key])

    return scores


def compare_recipes(
    analysis: Analysis,
    target_depth: int,
    recipe: str = "auto",
    max_group: int = 8,
    fuse_last: bool = False,
    max_dependency: float | None = None,
    parallel_threshold: float | None = None,
    max_pairs: int = 4,
    costs: CostModel | None = None,
    rescore: Rescorer | None = None,
    measure: Measurer | None = None,
    log: Callable[[str], None] | None = None,
    engines: list[str] | None = None,
) -> RecipeComparison:
    """Build every recipe at `target_depth`, predict (or measure) its KL, and pick one (see the module docstring).

    `engines` (ENGINES' spelling): the result must load in each; recipes one of them cannot run are not built (the
    parallel recipe, for any engine but transformers) and never chosen."""
    _check_settings(recipe, target_depth, max_pairs)
    say = log or (lambda _msg: None)
    n = analysis.num_layers
    costs = costs or CostModel.analytic(analysis)
    widths = analysis.model.ffn_widths
    scale = proxy_scale(analysis)
    rescore = _memo(rescore)
    measured = measure is not None
    attention_is = "iterative" if rescore is not None else "additive estimate"
    common = dict(max_group=max_group, fuse_last=fuse_last, max_dependency=max_dependency, costs=costs)

    def finish(name: str, plan: Plan, attention_kl: float, proxy: float, removal: list[tuple[int, float]]) -> Recipe:
        d = depth(plan, n)
        if measured:
            kl, kl_is = measure(plan), "measured"
            say(f"measured {name} {plan.model_dump(exclude={'info', 'format', 'version'}, exclude_defaults=True)}")
        else:
            kl = attention_kl + proxy
            kl_is = attention_is if name == "attention" else f"{attention_is} + {PROXY}"
        latency = costs.latency_ms(plan_blocks(plan, n), widths)
        return Recipe(name, plan, d, attention_kl, proxy, kl, kl_is, latency, d == target_depth, removal=removal)

    def searched(name: str, fuse: bool, pairs: list[list[int]] | None = None) -> Recipe:
        result = search_plan(
            analysis, target_depth=target_depth, rescore=rescore, fuse=fuse, fixed_parallel=pairs, **common
        )
        plan = _exact_depth(analysis, result.plan, target_depth) if fuse else result.plan
        plan = plan.model_copy(update={"info": {}})
        proxy = fusion_proxy(analysis, plan.fuse_ffn, scale) + parallel_proxy(analysis, plan.parallel_blocks, scale)
        return finish(name, plan, result.plan.info["predicted_kl"], proxy, result.removal)

    recipes = [searched("attention", fuse=False), searched("fusion", fuse=True)]

    external = [e for e in engines or [] if e in EXTERNAL]
    if external:  # not worth measuring: it could not be written
        why = f"left out: {', '.join(external)} cannot load it ({PARALLEL_GROUPS})"
        recipes.append(_unbuilt("parallel", n, why))
    else:
        recipes.append(_parallel_recipe(analysis, searched, target_depth, parallel_threshold, max_pairs))
    recipes.append(layer_drop(analysis, target_depth, scale, finish))
    for r in recipes:
        if not r.reached and not r.note:
            r.note = f"reaches {r.depth} sub-blocks, not {target_depth}"

    chosen, why = _choose(recipes, recipe, measured, target_depth, engines or [])
    result = _result(analysis, chosen, recipes, why, target_depth, costs, common)
    if engines:
        result.plan.info["recipes"]["engines"] = engines
    if warning := _engine_warning(chosen, recipes, engines or []):
        result.warnings.insert(0, warning)  # the same list as info["warnings"]
    return RecipeComparison(chosen, recipes, why, result)


def _check_settings(recipe: str, target_depth: int | None, max_pairs: int) -> None:
    if recipe not in CHOICES:
        raise ValueError(f"--recipe must be one of {', '.join(CHOICES)} (got {recipe!r}).")
    if target_depth is None or target_depth < 1:
        raise ValueError(f"recipes are compared at a --target-depth of at least 1 (got {target_depth}).")
    if max_pairs < 1:
        raise ValueError(f"--max-pairs must be at least 1 (got {max_pairs}).")


def _parallel_recipe(
    analysis: Analysis,
    searched: Callable[..., Recipe],
    target_depth: int,
    parallel_threshold: float | None,
    max_pairs: int,
) -> Recipe:
    """The best of the parallel recipes with 1..max_pairs pairs, or a "not built" one that says why there is none."""
    n = analysis.num_layers
    pairs = _candidate_pairs(analysis, parallel_threshold)
    most = min(max_pairs, len(pairs), max(0, (2 * n - target_depth) // 2))
    variants = [searched("parallel", fuse=True, pairs=sorted(pairs[:k])) for k in range(1, most + 1)]
    if variants:
        best = min(variants, key=lambda r: (not r.reached, r.kl, len(r.plan.parallel_blocks)))
        best.variants = [
            {"pairs": v.plan.parallel_blocks, "predicted_kl": round(v.kl, 6), "sequential_sub_blocks": v.depth}
            for v in variants
        ]
        best.note = f"best of {len(variants)} pair counts (1..{most}), pairs by lowest block dependency"
        return best
    if 2 * n - target_depth < 2:
        why = f"a parallel pair saves 2 sub-blocks; depth {target_depth} saves {2 * n - target_depth}"
    elif analysis.model.has_o_bias:
        why = "parallel blocks are not supported with an o_proj bias"
    else:
        why = "no pair of intact equal-width layers"
        if parallel_threshold is not None:
            why += f" with block dependency <= {parallel_threshold}"
    return _unbuilt("parallel", n, why)


def _unbuilt(name: str, num_layers: int, why: str) -> Recipe:
    """A recipe that could not be built (no plan, never chosen), listed with the reason."""
    return Recipe(name, Plan(), 2 * num_layers, 0.0, 0.0, float("inf"), "not built", 0.0, False, note=why)


def _blocked(r: Recipe, engines: list[str]) -> list[str]:
    """Why engines the user needs cannot load this recipe's plan."""
    limits = plan_limits(r.plan)
    return [f"{e}: {'; '.join(limits[e])}" for e in engines if e in limits]


def _choose(
    recipes: list[Recipe], recipe: str, measured: bool, target_depth: int, engines: list[str]
) -> tuple[Recipe, str]:
    """The recipe to write (forced by --recipe, or the lowest KL at the depth among those `engines` load) and why."""
    reached = [r for r in recipes if r.reached and not _blocked(r, engines)]
    if recipe != "auto":
        chosen = next(r for r in recipes if r.name == recipe)
        if chosen.kl_is == "not built":
            raise ValueError(f"--recipe {recipe}: cannot be built here ({chosen.note}).")
        if blocked := _blocked(chosen, engines):
            raise ValueError(f"--recipe {recipe} writes what --engines cannot load ({'; '.join(blocked)}).")
        why = "forced by --recipe"
    elif reached:
        chosen = min(reached, key=lambda r: r.kl)
        kind = "measured" if measured else "predicted"
        why = f"lowest {kind} KL of the recipes at depth {target_depth}"
    else:
        candidates = [r for r in recipes if r.kl_is != "not built" and not _blocked(r, engines)]
        if not candidates:
            raise ValueError(f"no recipe at depth {target_depth} writes what {', '.join(engines)} can load.")
        chosen = min(candidates, key=lambda r: (r.depth, r.kl))
        why = f"no recipe reaches depth {target_depth}; the shallowest one"
    if engines:
        why += f" that {', '.join(engines)} can load"
    return chosen, why


def _engine_warning(chosen: Recipe, recipes: list[Recipe], engines: list[str]) -> str | None:
    """When no engine was named and some engine cannot load the chosen plan: which ones, and the best recipe every
    engine loads."""
    limits = plan_limits(chosen.plan)
    if not limits or engines:
        return None
    portable = [r for r in recipes if r.reached and not plan_limits(r.plan)]
    best = min(portable, key=lambda r: r.kl, default=None)
    alternative = f": the best recipe they load here is {best.name} (KL {best.kl:.4f})" if best else ""
    reasons = sorted({why for whys in limits.values() for why in whys})
    only = "; only transformers (with ffnfusion) and ffnfusion's engine run it" if set(limits) >= set(EXTERNAL) else ""
    return (
        f"the {chosen.name} recipe writes what {', '.join(limits)} cannot load ({'; '.join(reasons)}){only}. To "
        f"serve with one of them, name it: --engines vllm (run.yaml: plan: {{engines: [vllm]}}){alternative}"
    )


def layer_drop(analysis: Analysis, target_depth: int, scale: float, finish: Callable[..., Recipe]) -> Recipe:
    """ShortGPT: drop the layers of lowest block influence until `target_depth` (see the module docstring)."""
    n = analysis.num_layers
    base = set(analysis.settings.remove_attention)
    plan = Plan(remove_attention=sorted(base))
    dropped: list[int] = []
    influence = {i: analysis.layers[i].block.cos_distance for i in range(n)}
    for i in sorted(range(n), key=lambda i: (influence[i], i)):
        if depth(plan, n) <= target_depth:
            break
        trial = plan.model_copy(
            update={
                "remove_attention": sorted(set(plan.remove_attention) | {i}),
                "remove_ffn": sorted(set(plan.remove_ffn) | {i}),
            }
        )
        if depth(trial, n) >= target_depth and len(dropped) < n - 1:
            plan, dropped = trial, [*dropped, i]
    removal: list[tuple[int, float]] = []
    attention_kl = analysis.base_kl
    if depth(plan, n) > target_depth:
        static = {i: s for i, s in analysis.kl_by_layer().items() if i not in plan.remove_attention}
        for i in sorted(static, key=lambda i: (static[i], i)):
            if depth(plan, n) <= target_depth:
                break
            plan = plan.model_copy(update={"remove_attention": sorted({*plan.remove_attention, i})})
            attention_kl += max(static[i] - analysis.base_kl, 0.0)
            removal.append((i, attention_kl))
    recipe = finish("layer-drop", plan, attention_kl, drop_proxy(analysis, dropped, scale), removal)
    recipe.note = f"dropped layers {sorted(dropped)} (lowest block influence)" + (
        f", attention {[i for i, _ in removal]} for the odd sub-block" if removal else ""
    )
    return recipe


def _result(
    analysis: Analysis,
    chosen: Recipe,
    recipes: list[Recipe],
    why: str,
    target_depth: int,
    costs: CostModel,
    budgets: dict[str, Any],
) -> PlanSearch:
    """The chosen plan with search_plan's info, plus every recipe's figures under info.recipes."""
    n = analysis.num_layers
    widths = analysis.model.ffn_widths
    plan = chosen.plan.model_copy(deep=True)
    depth_before = depth(Plan(), n)
    latency_before = costs.latency_ms(plan_blocks(Plan(), n), widths)
    warnings = []
    if not chosen.reached:
        warnings.append(f"target depth {target_depth} not reached by {chosen.name} (predicted {chosen.depth})")
    if not chosen.kl_is.startswith("measured") and chosen.name != "attention":
        warnings.append(
            f"the KL of the {chosen.name} recipe is partly a proxy (fusion, parallel pairs and dropped layers are not "
            "measured by the analysis); --measure-recipes measures every recipe on the model"
        )
    budget = {k: v for k, v in budgets.items() if k != "costs"} | {"target_depth": target_depth}
    info = _info(
        analysis,
        plan,
        chosen.removal,
        chosen.kl,
        chosen.kl_is in ("measured", "iterative"),
        budget,
        {"original": depth_before, "plan": chosen.depth},
        {
            "unit": "ms per decode step",
            "original": round(latency_before, 6),
            "plan": round(chosen.latency_ms, 6),
            "speedup": round(latency_before / chosen.latency_ms, 4) if chosen.latency_ms else None,
            "cost_model": costs.model_dump(),
        },
        warnings,
    )
    info["predicted_kl_is"] = chosen.kl_is
    info["attention_selection"] = (
        "iterative (re-scored after each removal)" if "iterative" in chosen.kl_is else "static (analysis KL)"
    )
    info["recipes"] = {
        "target_depth": target_depth,
        "chosen": chosen.name,
        "why": why,
        "proxy": (
            f"perturbation proxy: KL ~ {proxy_scale(analysis):.4g} x (relative change of the residual stream)^2, "
            "calibrated on the attention KLs; it ranks, it does not measure (see ffnfusion.plan.recipes)"
        ),
        "candidates": [r.summary() for r in recipes],
    }
    plan.info = info
    return PlanSearch(plan, chosen.removal, depth_before, chosen.depth, latency_before, chosen.latency_ms, warnings)
