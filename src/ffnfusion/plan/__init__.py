"""The `plan` stage: analysis.json -> plan.json (what to remove, fuse and run in parallel, under a budget)."""
