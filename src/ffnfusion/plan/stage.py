"""The `plan` stage: an analysis + PlanSettings -> the chosen plan (and, at a target depth, the recipes compared).

Input: the Analysis, the settings (budgets, limits, recipe choice), a cost model and, when the settings ask to
measure on the model, a rescorer and a recipe measurer. Output: the PlanSearch (plan, removal order, predicted
depth and latency) and the RecipeComparison when recipes were compared. Writing plan.json is the caller's
(`plan.search.write_plan`), so `ffnfusion plan` and `ffnfusion run` choose plans the same way.
"""

from __future__ import annotations

from ffnfusion.analyze.rescore import Measurer, Rescorer
from ffnfusion.formats.analysis import Analysis
from ffnfusion.plan.costs import CostModel
from ffnfusion.plan.recipes import RecipeComparison, compare_recipes
from ffnfusion.plan.search import PlanSearch, search_plan
from ffnfusion.plan.settings import PlanSettings


def choose_plan(
    analysis: Analysis,
    settings: PlanSettings,
    costs: CostModel | None = None,
    rescore: Rescorer | None = None,
    measure: Measurer | None = None,
) -> tuple[PlanSearch, RecipeComparison | None]:
    """The plan under the settings' budgets, or the best recipe at their target depth (see compares_recipes)."""
    s = settings
    engines = s.check_engines()
    if not s.compares_recipes():
        return search_plan(analysis, costs=costs, rescore=rescore, **s.budgets()), None
    s.check_recipes()
    comparison = compare_recipes(
        analysis,
        s.target_depth,
        recipe=s.recipe or "auto",
        max_group=s.max_group,
        fuse_last=s.fuse_last,
        max_dependency=s.max_dependency,
        parallel_threshold=s.parallel_threshold,
        max_pairs=s.max_pairs,
        costs=costs,
        rescore=rescore,
        measure=measure,
        engines=engines,
    )
    return comparison.result, comparison
