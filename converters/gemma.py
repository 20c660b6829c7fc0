"""Weight maps of the Gemma families.

gemma, gemma2 and gemma3_text checkpoints follow the default rule (every Flax
parameter is the tensor of the same dotted name). The multimodal gemma3
checkpoints hold the language model beside a SigLIP vision tower and the
multimodal projector, which the measurement of text activations does not use:
they are skipped by name, and only they. Two key layouts exist, each an
explicit rule: the hub's (`language_model.model.layers...`, also what
transformers 5's save_pretrained writes by default) and transformers 5's
module names (`model.language_model.layers...`, save_original_format=False).
"""

from converters.weight_map import Layout, WeightMap

TEXT = WeightMap()

VISION_REASON = 'the SigLIP vision tower: images are not part of the text measurement'
PROJECTOR_REASON = 'the image-to-text projector: images are not part of the text measurement'

GEMMA3 = WeightMap(layouts=(
    Layout('hub', weight_prefix='language_model.model.', lm_head_key='language_model.lm_head.weight',
           skip=((r'vision_tower\.', VISION_REASON), (r'multi_modal_projector\.', PROJECTOR_REASON))),
    Layout('transformers-5 modules', weight_prefix='model.language_model.', lm_head_key='lm_head.weight',
           skip=((r'model\.vision_tower\.', VISION_REASON), (r'model\.multi_modal_projector\.', PROJECTOR_REASON))),
))

MAPS = {'gemma': TEXT, 'gemma2': TEXT, 'gemma3_text': TEXT, 'gemma3': GEMMA3}
