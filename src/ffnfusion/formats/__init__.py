"""The files that pass between stages (plan.json, analysis.json, eval.json, bench.json, run.json, corpus
folders): their schemas, versions and loaders, which say what is wrong with an old or foreign file."""
