"""Family specs: how each model_type's config.json becomes a ModelConfig.

A family is a short parse function over a `ConfigReader` (the whitelist); the
model is assembled from shared blocks in `maxact_jax/models/`, and the weight
map lives in `converters/`. Register a new family by adding its parsers here.
"""

from maxact_jax.families import dense, gemma, moe, qwen35, qwen_vl

PARSERS = {
    **dense.PARSERS,
    **gemma.PARSERS,
    **qwen_vl.PARSERS,
    **qwen35.PARSERS,
    **moe.PARSERS,
}
