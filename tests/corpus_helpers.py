"""Helpers shared by the corpus, loader and bootstrap tests."""

from __future__ import annotations

import os
from typing import Sequence

from maxact_jax import cli


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
  """(exit code, stdout, stderr) of `maxact-jax <args>`."""
  capsys.readouterr()
  code = cli.main(['maxact-jax', *args])
  out, err = capsys.readouterr()
  return code, out, err


def assert_one_error(code: int, err: str, *fragments: str) -> str:
  """Exit status 2 and exactly one stderr line, `error: ...`, containing every fragment."""
  lines = err.strip().splitlines()
  assert code == 2, (code, err)
  assert len(lines) == 1 and lines[0].startswith('error: '), err
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
  return lines[0]


def train_tokenizer(texts: Sequence[str], path: str, vocab_size: int = 2000, kind: str = 'bpe') -> str:
  """Train a small tokenizer on `texts` and save it as `path` (a tokenizer.json); returns `path`.

  'bpe': byte-level BPE that prepends <s>, like Llama/Qwen-style tokenizers.
  'wordpiece': BERT-style WordPiece that wraps text in [CLS] ... [SEP].
  """
  # pylint: disable=import-outside-toplevel
  import tokenizers
  from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

  if kind == 'bpe':
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<s>', '<pad>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', 0)])
  else:
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token='[UNK]'))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=['[CLS]', '[SEP]', '[UNK]'],
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single='[CLS] $A [SEP]',
                                                       special_tokens=[('[CLS]', 0), ('[SEP]', 1)])
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tok.save(path)
  return path
