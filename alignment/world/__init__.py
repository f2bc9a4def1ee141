"""The procedural tiny world: caption grammar, renderer, oracle, reward-model pairs, pre-training.

Import submodules explicitly (``from alignment.world.oracle import oracle_alignment``); importing
the package loads nothing heavy.
"""
