"""The decode engine every GPU-speed path shares: a graph-captured static-cache decoder (decode.py) over fused
elementwise kernels (kernels.py), and sampling with continuous batching on it (sampling.py).

`bench` times models with it and `generate` (so `--data self` of analyze, heal and run) writes corpora with it; it
belongs to no stage, so neither imports the other. Inputs: an in-memory DeciLM model; outputs: tokens and timings.
"""
