"""A GGUF file's vocabulary as a `tokenizers` tokenizer.

A GGUF file has no tokenizer.json: llama.cpp's converter writes the vocabulary
as metadata (`tokenizer.ggml.*`: the model kind, the tokens, their types and
scores, the merges, the special ids and whether BOS/EOS are added). This module
builds the same tokenizer with the `tokenizers` library, so that a text corpus
or the built-in corpus is tokenized on a bare .gguf file exactly as
transformers' own GGUF tokenizer conversion does (a test holds the ids equal on
the built-in corpus). Two kinds:

- `gpt2`: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): the tokens are spelled
  in the byte-level alphabet, the merges are in the file; the text is split by
  the GPT-2 regex, or by the one the `tokenizer.ggml.pre` name stands for;
- `llama`: SentencePiece-style BPE with byte fallback (Llama 2, Mistral,
  Gemma): no merges in the file, so they are rebuilt from the vocabulary, each
  pair ranked by the score of the token it makes (Gemma: by the token's place in
  the list, as its scores do not follow its merge order); a space prefix (▁) is
  added to the text unless `tokenizer.ggml.add_space_prefix` says otherwise.
  Gemma's vocabulary spells runs of spaces with real spaces, which are spelled
  with ▁ again.

Tokens of type CONTROL (3) become special added tokens, USER_DEFINED (4) plain
added ones, so neither is cut into pieces. BOS is prepended when
`tokenizer.ggml.add_bos_token` says so (absent: yes for `llama` vocabularies,
as llama.cpp does, no for `gpt2`), EOS appended when `add_eos_token` does.
"""

from __future__ import annotations

import functools

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from maxact_jax.errors import UserError
from maxact_jax.gguf_file import GGUFFile

CONTROL, USER_DEFINED = 3, 4
SPACE = '\u2581'  # SentencePiece's visible space

# `tokenizer.ggml.pre` -> the regex that splits text before the merges (byte-level
# vocabularies whose split differs from GPT-2's; the rest use GPT-2's, the default of
# the ByteLevel pre-tokenizer). The patterns are those of the models' own tokenizer.json.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    'llama3': LLAMA3_SPLIT, 'llama-v3': LLAMA3_SPLIT, 'llama-bpe': LLAMA3_SPLIT, 'falcon3': LLAMA3_SPLIT,
    'smaug-bpe': LLAMA3_SPLIT, 'dbrx': LLAMA3_SPLIT,
    'qwen2': QWEN2_SPLIT, 'deepseek-r1-qwen': QWEN2_SPLIT, 'megrez': QWEN2_SPLIT,
}
GEMMA_ARCHITECTURES = ('gemma', 'gemma2', 'gemma3')


@functools.cache
def byte_alphabet() -> dict[int, str]:
  """GPT-2's map from bytes to printable characters (the byte-level BPE alphabet)."""
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


@functools.lru_cache(maxsize=4)
def build(gf: GGUFFile) -> tokenizers.Tokenizer:
  """The tokenizer the file's `tokenizer.ggml.*` metadata describes (built once per file
  and process; callers do not change it)."""
  kind = gf.get('tokenizer.ggml.model', None, (str,))
  if kind is None:
    raise UserError(f'{gf.path} has no tokenizer (no tokenizer.ggml.model): give one with --tokenizer=DIR '
                    '(a directory holding tokenizer.json), or token ids with input_ids')
  tokens = gf.get('tokenizer.ggml.tokens', types=(list,))
  types = gf.get('tokenizer.ggml.token_type', None, (list,)) or [1] * len(tokens)
  if len(types) != len(tokens) or not all(isinstance(t, str) for t in tokens):
    raise UserError(f'{gf.path}: tokenizer.ggml.tokens and token_type disagree ({len(tokens)} tokens, '
                    f'{len(types)} types)')
  if kind == 'gpt2':
    tok, tokens = _byte_level(gf, tokens)
    default_bos = False
  elif kind == 'llama':
    tok, tokens = _sentencepiece(gf, tokens)
    default_bos = True
  else:
    raise UserError(f'{gf.path}: tokenizer kind {kind!r} is not supported (supported: gpt2, llama); give a '
                    'tokenizer with --tokenizer=DIR')
  _add_tokens(tok, kind, tokens, types)
  _post_processor(gf, tok, tokens, default_bos)
  return tok


def _byte_level(gf: GGUFFile, tokens: list[str]) -> tuple[tokenizers.Tokenizer, list[str]]:
  spell = byte_alphabet()
  alphabet = set(spell.values())
  # Tokens not spelled in the byte alphabet (an added token written plainly) are respelled.
  tokens = [t if set(t) <= alphabet else ''.join(spell[b] for b in t.encode('utf-8')) for t in tokens]
  merges = [tuple(m.split(' ')) for m in gf.get('tokenizer.ggml.merges', types=(list,))]
  if any(len(m) != 2 for m in merges):
    raise UserError(f'{gf.path}: tokenizer.ggml.merges holds an entry that is not two tokens')
  tok = tokenizers.Tokenizer(models.BPE(vocab=_vocab(gf, tokens), merges=merges, dropout=None, fuse_unk=False,
                                        byte_fallback=False))
  split = PRE_TOKENIZER_SPLITS.get(gf.get('tokenizer.ggml.pre', None, (str,)))
  if split is None:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  else:
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior='isolated'),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  return tok, tokens


def _sentencepiece(gf: GGUFFile, tokens: list[str]) -> tuple[tokenizers.Tokenizer, list[str]]:
  gemma = gf.architecture in GEMMA_ARCHITECTURES
  if gemma:
    # Gemma's vocabulary stores runs of spaces as spaces; the text is matched with ▁.
    tokens = [SPACE * len(t) if ' ' in t and not t.strip() else t for t in tokens]
    ranks = {t: -i for i, t in enumerate(tokens)}  # Gemma's scores do not follow its merge order
  else:
    scores = gf.get('tokenizer.ggml.scores', types=(list,))
    if len(scores) != len(tokens):
      raise UserError(f'{gf.path}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens')
    ranks = dict(zip(tokens, scores))
  vocab = _vocab(gf, tokens)
  merges = rebuild_merges(vocab, ranks)
  if gemma:
    unk = gf.get('tokenizer.ggml.unknown_token_id', None, (int,))
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None,
                                          unk_token=tokens[unk] if unk is not None else None))
    tok.normalizer = normalizers.Replace(' ', SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(' ', behavior='merged_with_previous', invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, ' '), decoders.ByteFallback(), decoders.Fuse()])
    return tok, tokens
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
  prefix = gf.get('tokenizer.ggml.add_space_prefix', True, (bool,))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme='first' if prefix else 'never',
                                               split=False)
  steps = [decoders.Replace(SPACE, ' '), decoders.ByteFallback(), decoders.Fuse()]
  if prefix:
    steps.append(decoders.Strip(content=' ', left=1, right=0))
  tok.decoder = decoders.Sequence(steps)
  return tok, tokens


def _vocab(gf: GGUFFile, tokens: list[str]) -> dict[str, int]:
  vocab: dict[str, int] = {}
  for i, t in enumerate(tokens):
    vocab.setdefault(t, i)  # a duplicated spelling keeps its first id (the tokenizers library would too)
  if len(vocab) < len(tokens) * 0.99:
    raise UserError(f'{gf.path}: tokenizer.ggml.tokens repeats {len(tokens) - len(vocab)} tokens')
  return vocab


def rebuild_merges(vocab: dict[str, int], ranks: dict[str, float]) -> list[tuple[str, str]]:
  """The merges a SentencePiece BPE vocabulary implies: every split of a token into
  two tokens of the vocabulary is a merge, ranked by the merged token's score (higher
  first), then by the lengths of its left and right parts (longer first); the splits
  of one token in the order of their parts' ids."""
  merges = []
  for token, rank in ranks.items():
    pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
    pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
    merges.extend((left, right, rank) for left, right in pairs)
  merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
  return [(left, right) for left, right, _ in merges]


def _add_tokens(tok: tokenizers.Tokenizer, kind: str, tokens: list[str], types: list[int]) -> None:
  """CONTROL tokens as special added tokens, USER_DEFINED as plain ones (so neither is cut
  into pieces). In a byte-level vocabulary a CONTROL token spelled outside the byte
  alphabet is a mislabel of llama.cpp's converter and is left alone."""
  alphabet = set(byte_alphabet().values()) if kind == 'gpt2' else None
  control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
             if ty == CONTROL and (alphabet is None or set(t) <= alphabet)]
  if control:
    tok.add_special_tokens(control)
  user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
  if user:
    tok.add_tokens(user)


SPECIAL_IDS = ('bos_token_id', 'eos_token_id', 'unknown_token_id', 'padding_token_id')


def _post_processor(gf: GGUFFile, tok: tokenizers.Tokenizer, tokens: list[str], default_bos: bool) -> None:
  """BOS/EOS around every sequence as the file says; the tokens of the special ids
  (BOS, EOS, unknown, padding) are special added tokens whatever their type."""
  named = {}
  for key in SPECIAL_IDS:
    token_id = gf.get(f'tokenizer.ggml.{key}', None, (int,))
    if token_id is None:
      continue
    if not 0 <= token_id < len(tokens):
      raise UserError(f'{gf.path}: tokenizer.ggml.{key} {token_id} is outside the vocabulary ({len(tokens)} tokens)')
    named[key] = tokens[token_id]
    if not any(t.content == named[key] for t in tok.get_added_tokens_decoder().values()):
      tok.add_special_tokens([AddedToken(named[key], special=True, normalized=False)])
  single, second, specials = '$A:0', '$B:1', []
  for which, default in (('bos', default_bos), ('eos', False)):
    name = named.get(f'{which}_token_id')
    if name is None or not gf.get(f'tokenizer.ggml.add_{which}_token', default, (bool,)):
      continue
    specials.append((name, tok.token_to_id(name)))
    if which == 'bos':
      single, second = f'{name}:0 {single}', f'{name}:1 {second}'
    else:
      single, second = f'{single} {name}:0', f'{second} {name}:1'
  tok.post_processor = processors.TemplateProcessing(single=single, pair=f'{single} {second}',
                                                     special_tokens=specials)


__all__ = ['PRE_TOKENIZER_SPLITS', 'build', 'byte_alphabet', 'rebuild_merges']
