"""eval.json, written by the `eval` stage and read by `report`: each model's perplexity, fidelity and task scores."""

EVAL_FORMAT = "ffnfusion-eval"
EVAL_VERSION = 1
