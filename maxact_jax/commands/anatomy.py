"""`maxact-jax anatomy`: persistent outlier channels, the tokens that carry them, the views.

    maxact-jax anatomy --model_path=DIR --output_dir=runs/x [--rule=sun|mad] [--sample=N --layer=L]

Reads what `maxact-jax measure` wrote for the model under <output_dir>/json/
(the activation and top-K results, <model>_channel_absmax.npz and
<model>_anatomy.json), lists the outlier channels under the chosen rule,
runs one sample again for the token x channel surface of one layer (default:
where the global maximum sits), rewrites <model>_anatomy.json and writes the
views to <output_dir>/anatomy/. All the work is in `maxact_jax.anatomy_job`.
"""

from __future__ import annotations

from absl import flags

from maxact_jax import anatomy, anatomy_job, fixtures
from maxact_jax.commands import common

FLAGS = flags.FlagValues()
flags.DEFINE_string('model_path', None, 'The checkpoint that was measured (default: the demo checkpoint).',
                    flag_values=FLAGS)
flags.DEFINE_string('output_dir', 'runs/measure', 'The --output_dir of the measure run.', flag_values=FLAGS)
flags.DEFINE_enum('rule', 'sun', anatomy.RULES, 'Outlier-channel rule at a layer: sun (max |x| > --t_val and > '
                  '--t_ratio x the layer median) or mad (robust z-score among the layer\'s channels > --mad_k).',
                  flag_values=FLAGS)
flags.DEFINE_float('t_val', anatomy.ChannelRule.t_val, 'sun rule: absolute threshold.', flag_values=FLAGS)
flags.DEFINE_float('t_ratio', anatomy.ChannelRule.t_ratio, 'sun rule: times the layer\'s median |x|.',
                   flag_values=FLAGS)
flags.DEFINE_float('mad_k', anatomy.ChannelRule.mad_k, 'mad rule: robust z-score threshold.', flag_values=FLAGS)
flags.DEFINE_float('min_layer_share', anatomy.ChannelRule.min_layer_share, 'A channel is persistent when it is '
                   'over the threshold in at least this share of the layers.', flag_values=FLAGS)
flags.DEFINE_boolean('surface', True, 'Run one sample again for the token x channel surface.', flag_values=FLAGS)
flags.DEFINE_integer('sample', None, 'Corpus index of the sample of the surface (default: the global maximum\'s).',
                     flag_values=FLAGS)
flags.DEFINE_integer('layer', None, 'Layer of the surface (default: the global maximum\'s).', flag_values=FLAGS)
flags.DEFINE_integer('surface_tokens', 64, 'Token positions shown in the surface.', flag_values=FLAGS)
flags.DEFINE_string('data_path', None, 'Corpus of the surface sample (default: what measure used).',
                    flag_values=FLAGS)
flags.DEFINE_integer('max_samples', None, 'Default: what measure used.', flag_values=FLAGS)
flags.DEFINE_integer('max_seq_len', None, 'Default: what measure used.', flag_values=FLAGS)
flags.DEFINE_string('dtype', None, f'One of {", ".join(common.DTYPES)} (default: what measure used).',
                    flag_values=FLAGS)


def run() -> int:
  if FLAGS.dtype is not None:
    common.check_dtype(FLAGS.dtype)
  common.check_positive('surface_tokens', FLAGS.surface_tokens, allow_none=False)
  model_path = FLAGS.model_path or fixtures.ensure_demo_checkpoint()
  rule = anatomy.ChannelRule(kind=FLAGS.rule, t_val=FLAGS.t_val, t_ratio=FLAGS.t_ratio, mad_k=FLAGS.mad_k,
                             min_layer_share=FLAGS.min_layer_share)
  result = anatomy_job.run_anatomy(anatomy_job.AnatomyOptions(
      model_path=model_path, output_dir=FLAGS.output_dir, rule=rule, surface=FLAGS.surface, sample=FLAGS.sample,
      layer=FLAGS.layer, surface_tokens=FLAGS.surface_tokens, data_path=FLAGS.data_path,
      max_samples=FLAGS.max_samples, max_seq_len=FLAGS.max_seq_len, dtype=FLAGS.dtype))
  for line in anatomy.summary_lines(result.doc):
    print(line)
  print(f'results: {result.path}')
  for name, path in result.views.items():
    print(f'  {name}: {path}')
  return 0
