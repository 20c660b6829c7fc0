"""`maxact-jax quant`: the paper's INT8 sanity check (and FP8, per-channel, per-token).

Calibrates thresholds on the first --calibration_samples samples of the
corpus, evaluates the fake-quantization error on the next --eval_samples, and
writes <output_dir>/json/<model>_quant_sanity.json in the reference's schema,
plus quant_sanity_summary.json over every model in that folder. All the work
is in `maxact_jax.quant`.
"""

from __future__ import annotations

from absl import flags

from maxact_jax import fixtures, quant
from maxact_jax.commands import common

FLAGS = flags.FlagValues()
common.define_model_flags(FLAGS)
flags.DEFINE_string('data_path', None, 'Corpus: jsonl with input_ids (the reference format) or text. '
                    'Default: the built-in corpus.', flag_values=FLAGS)
flags.DEFINE_string('output_dir', 'runs/quant', 'Results go to <output_dir>/json/.', flag_values=FLAGS)
flags.DEFINE_string('stats_path', None, 'A measure result (*_activation_stats.json) whose global maximum is the '
                    '`peak` tap. Default: <output_dir>/json/<model>_activation_stats.json if it exists, '
                    'else the peak of the calibration samples.', flag_values=FLAGS)
flags.DEFINE_list('taps', None, 'Explicit tap names to check (e.g. layer_16_hidden,final_layernorm); '
                  'wins over --layer_policy.', flag_values=FLAGS)
flags.DEFINE_string('layer_policy', 'peak', 'peak (the global maximum\'s tap), all_hidden (every residual '
                    'stream and the final norm), all (every activation tap), or list:L10,L24,final_layernorm.',
                    flag_values=FLAGS)
flags.DEFINE_integer('calibration_samples', 128, 'Calibrate on the first this many samples.', flag_values=FLAGS)
flags.DEFINE_integer('eval_samples', 256, 'Evaluate on the next this many samples.', flag_values=FLAGS)
flags.DEFINE_integer('max_seq_len', 4096, 'Truncate samples to this many tokens.', flag_values=FLAGS)
flags.DEFINE_integer('batch_size', 8, 'Sequences per batch.', flag_values=FLAGS)
flags.DEFINE_integer('bits', 8, 'Integer format: symmetric INT<bits> (codes -(2^(bits-1)-1) .. 2^(bits-1)-1).',
                     flag_values=FLAGS)
flags.DEFINE_float('clip_quantile', 0.999, 'The |x| quantile of the clip policy.', flag_values=FLAGS)
flags.DEFINE_integer('hist_bins', 2048, 'Bins of the reference\'s linear |x| histogram for the clip threshold.',
                     flag_values=FLAGS)
flags.DEFINE_string('family', None, 'Family label in the results (default: from the model name).',
                    flag_values=FLAGS)
flags.DEFINE_string('role', None, 'Free-text role label in the results (the reference\'s `role`).',
                    flag_values=FLAGS)
flags.DEFINE_boolean('progress', True, 'Show a progress bar per pass.', flag_values=FLAGS)


def run() -> int:
  common.check_dtype(FLAGS.dtype)
  model_path = FLAGS.model_path or fixtures.ensure_demo_checkpoint()
  opts = quant.QuantOptions(
      model_path=model_path, output_dir=FLAGS.output_dir, data_path=FLAGS.data_path,
      stats_path=FLAGS.stats_path, taps=FLAGS.taps or None, layer_policy=FLAGS.layer_policy,
      calibration_samples=FLAGS.calibration_samples, eval_samples=FLAGS.eval_samples,
      max_seq_len=FLAGS.max_seq_len, batch_size=FLAGS.batch_size, dtype=FLAGS.dtype, bits=FLAGS.bits,
      clip_quantile=FLAGS.clip_quantile, hist_bins=FLAGS.hist_bins, family=FLAGS.family, role=FLAGS.role,
      progress=FLAGS.progress, tokenizer=FLAGS.tokenizer)
  result = quant.quant(opts)
  for line in quant.summary_lines(result.doc):
    print(line)
  print(quant.table(result.doc))
  print(f'results: {result.path}\n         {result.summary_path}')
  return 0
