"""`maxact-jax qeval`: what quantizing every linear layer does to the model's predictions.

    maxact-jax qeval --model_path=DIR|F.gguf --schemes=w8a8,w8a8-static,w4a4+rotate [--data_path=F]
        [--calibration_samples=128] [--eval_samples=256] [--max_seq_len=2048] [--output_dir=runs/qeval]

Calibrates on the first --calibration_samples samples, evaluates every scheme
against the unquantized model on the next --eval_samples (the same batches),
prints a scheme x metric table and writes <output_dir>/json/<model>_qeval.json.
The schemes' grammar is in the README ("Quantization impact"); all the work is
in `maxact_jax.qeval`.
"""

from __future__ import annotations

from absl import flags

from maxact_jax import fixtures, qeval, qschemes
from maxact_jax.commands import common

FLAGS = flags.FlagValues()
common.define_model_flags(FLAGS)
flags.DEFINE_list('schemes', list(qschemes.DEFAULT_SCHEMES),
                  'Schemes to evaluate, comma-separated: none, w<W>a<A> (W, A: 2-8 for INT, 16 for bfloat16, fp8), '
                  'w<W>, a<A>, or a preset (' + ', '.join(qschemes.PRESETS) + '), each with +modifiers: token, '
                  'tensor, static, clip<q> (activation scale), wchannel, wtensor, g<N> (weight scale), '
                  'smooth<alpha>, rotate[<seed>], rotdown[<seed>] (transforms), router, attn (extra sites).', flag_values=FLAGS)
flags.DEFINE_string('data_path', None, 'Corpus: jsonl with input_ids (the reference format) or text. '
                    'Default: the built-in corpus.', flag_values=FLAGS)
flags.DEFINE_string('output_dir', 'runs/qeval', 'Results go to <output_dir>/json/.', flag_values=FLAGS)
flags.DEFINE_string('stats_path', None, 'A measure result (*_activation_stats.json) whose global maximum the '
                    'results record. Default: <output_dir>/json/<model>_activation_stats.json if it exists, '
                    'else the maximum over the calibration samples.', flag_values=FLAGS)
flags.DEFINE_integer('calibration_samples', 128, 'Calibrate on samples 0 .. N-1 of the corpus.', flag_values=FLAGS)
flags.DEFINE_integer('eval_samples', 256, 'Evaluate on this many samples after the calibration ones.',
                     flag_values=FLAGS)
flags.DEFINE_integer('eval_start', None, 'The first evaluation sample (default: --calibration_samples); '
                     'must not overlap the calibration samples.', flag_values=FLAGS)
flags.DEFINE_integer('max_seq_len', 2048, 'Truncate samples to this many tokens.', flag_values=FLAGS)
flags.DEFINE_integer('batch_size', 8, 'Sequences per batch (per-tensor dynamic scales are per batch).',
                     flag_values=FLAGS)
flags.DEFINE_integer('max_shapes', 4, 'At most this many padded batch lengths (each compiles once per scheme).',
                     flag_values=FLAGS)
flags.DEFINE_string('source_tokenizer', None, 'Tokenizer that made the input_ids of --data_path (see measure).',
                    flag_values=FLAGS)
flags.DEFINE_boolean('progress', True, 'Show a progress bar per pass.', flag_values=FLAGS)
flags.DEFINE_enum('demo', 'dense', fixtures.DEMO_KINDS, 'Without --model_path: which built-in demo checkpoint '
                  '(as measure\'s --demo).', flag_values=FLAGS)


def run() -> int:
  common.check_dtype(FLAGS.dtype)
  model_path = FLAGS.model_path or fixtures.ensure_demo_checkpoint(kind=FLAGS.demo)
  result = qeval.qeval(qeval.QevalOptions(
      model_path=model_path, output_dir=FLAGS.output_dir, schemes=FLAGS.schemes, data_path=FLAGS.data_path,
      stats_path=FLAGS.stats_path, calibration_samples=FLAGS.calibration_samples, eval_samples=FLAGS.eval_samples,
      eval_start=FLAGS.eval_start, max_seq_len=FLAGS.max_seq_len, batch_size=FLAGS.batch_size, dtype=FLAGS.dtype,
      max_shapes=FLAGS.max_shapes, progress=FLAGS.progress, source_tokenizer=FLAGS.source_tokenizer,
      tokenizer=FLAGS.tokenizer))
  for line in qeval.summary_lines(result.doc):
    print(line)
  print(qeval.table(result.doc))
  print(f'results: {result.path}')
  return 0
