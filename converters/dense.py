"""Weight maps of the dense families (llama, qwen2, qwen3).

Their checkpoints follow the default rule exactly: every Flax parameter is the
tensor of the same dotted name (Linear weights transposed).
"""

from converters.weight_map import WeightMap

MAP = WeightMap()

MAPS = {'llama': MAP, 'qwen2': MAP, 'qwen3': MAP}
