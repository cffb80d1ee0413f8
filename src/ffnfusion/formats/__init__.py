"""The files that pass between stages (plan.json, analysis.json, eval.json, bench.json, run.json): their schemas,
versions and loaders, which say what is wrong with an old or foreign file."""
