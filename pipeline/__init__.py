"""The torch-side pipeline around the model: configs, the CLI layer, the engine, evaluation, training.

Modules import what they need on their own; this package's ``__init__`` imports nothing, so the
torch-free modules (``cli``, ``atomic``, ``thresholds``, ``visualize``) load where only numpy,
Pillow and an inference runtime are installed.
"""
