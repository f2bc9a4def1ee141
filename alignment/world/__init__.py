"""The procedural tiny world: caption grammar, renderer, oracle, reward-model pairs, pre-training.

Import submodules explicitly (``from alignment.world.oracle import oracle_alignment``); importing
the package loads nothing heavy.
"""

from pathlib import Path

#: The bundled tiny-world models (tiny-world-sd, tiny-world-sd3, tiny-world-reward): the demo's
#: and the trainers' offline defaults.
BUNDLED_WEIGHTS = Path(__file__).resolve().parent / "weights"
