"""The `eval` stage: models + text + tasks -> eval.json / eval.md (perplexity, fidelity, zero-shot tasks)."""
