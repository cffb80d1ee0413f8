"""The `heal` stage: distillation from the original model (teacher) into the fused one (student).

stage.py runs it (settings, data, Trainer, output), loss.py holds the chunked KL + cosine loss, budget.py turns
--tokens / --minutes / --max-epochs into steps, the automatic batch size and the progress bar.
"""
