"""Weight map of qwen2_5_vl: the text backbone beside the vision tower.

The language model's tensors follow the default rule under a prefix that
depends on the key layout, each an explicit rule: the hub's (`model.layers...`,
`visual...`, `lm_head.weight`; also what transformers 5's save_pretrained
writes by default) and transformers 5's module names
(`model.language_model.layers...`, `model.visual...`). The vision tower is
skipped by name, and only it.
"""

from converters.weight_map import Layout, WeightMap

VISION_REASON = 'the vision tower and its merger: images are not part of the text measurement'

QWEN2_5_VL = WeightMap(layouts=(
    Layout('hub', weight_prefix='model.', lm_head_key='lm_head.weight', skip=((r'visual\.', VISION_REASON),)),
    Layout('transformers-5 modules', weight_prefix='model.language_model.', lm_head_key='lm_head.weight',
           skip=((r'model\.visual\.', VISION_REASON),)),
))

MAPS = {'qwen2_5_vl': QWEN2_5_VL}
