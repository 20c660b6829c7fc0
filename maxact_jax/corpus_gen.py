"""Seeded generators of the built-in corpus's synthetic documents.

Every generator here is a function `doc(rng) -> Iterator[str]` that yields the
*units* of one document (a paragraph, a function, a record, a chat turn, a
worked problem) forever; `maxact_jax.corpus` takes units until a document
reaches its target length. A document keeps one kind throughout (one
programming language, one data format, one chat template), as a real one
would. All randomness comes from the `random.Random` passed in, so a seed
fixes every byte; nothing here reads the clock, the environment or a set's
iteration order.

The word lists and templates are written for this project.
"""

from __future__ import annotations

import calendar
import datetime
import email.message
import email.policy
import fractions
import html
import json
import math
import random
import re
import string
import textwrap
import unicodedata
from typing import Callable, Iterator

Doc = Callable[[random.Random], Iterator[str]]

# ---------------------------------------------------------------------------
# Word lists.

FIRST_NAMES = ('Ada', 'Bram', 'Chiara', 'Dmitri', 'Elena', 'Farid', 'Greta', 'Hiro', 'Ines', 'Jonas',
               'Kavya', 'Luca', 'Mira', 'Nadia', 'Oskar', 'Priya', 'Quentin', 'Rosa', 'Sven', 'Tariq',
               'Uma', 'Viktor', 'Wen', 'Ximena', 'Yusuf', 'Zofia', 'Amara', 'Bilal', 'Carmen', 'Dario')
LAST_NAMES = ('Abbott', 'Brenner', 'Castillo', 'Dupont', 'Eriksen', 'Fischer', 'Gallo', 'Hayashi',
              'Ivanova', 'Jensen', 'Kowalski', 'Lindqvist', 'Moreau', 'Novak', 'Okafor', 'Petrov',
              'Quinn', 'Rossi', 'Sato', 'Thorne', 'Ueda', 'Varga', 'Walsh', 'Yilmaz', 'Zhou')
CITIES = ('Lisbon', 'Oslo', 'Nairobi', 'Kyoto', 'Valparaiso', 'Tbilisi', 'Hanoi', 'Montreal', 'Porto',
          'Krakow', 'Dakar', 'Auckland', 'Leipzig', 'Cusco', 'Tallinn', 'Mumbai', 'Seville', 'Quebec',
          'Ghent', 'Bergen', 'Trieste', 'Adelaide', 'Marrakesh', 'Busan')
NOUNS = ('bridge', 'library', 'orchard', 'harbor', 'observatory', 'railway', 'market', 'garden', 'mill',
         'school', 'museum', 'lighthouse', 'archive', 'workshop', 'canal', 'bakery', 'greenhouse',
         'reservoir', 'theater', 'clinic', 'ferry', 'vineyard', 'foundry', 'station', 'quarry')
MATERIALS = ('granite', 'oak', 'copper', 'limestone', 'glass', 'brick', 'steel', 'cedar', 'clay', 'slate')
ADJECTIVES = ('quiet', 'narrow', 'ancient', 'busy', 'modest', 'remarkable', 'crowded', 'sturdy',
              'unusual', 'elegant', 'weathered', 'spacious', 'humble', 'bright', 'forgotten', 'careful')
SUBJECTS = ('the tides', 'migrating birds', 'soil acidity', 'river sediment', 'glacier retreat',
            'medieval trade', 'bee colonies', 'coastal erosion', 'printing presses', 'wind patterns',
            'crop rotation', 'bird song', 'lichen growth', 'tidal energy', 'folk music', 'old maps')
ACTIONS = ('measured', 'catalogued', 'repaired', 'photographed', 'surveyed', 'described', 'restored',
           'documented', 'compared', 'rebuilt', 'studied', 'sketched')
MONTHS = tuple(calendar.month_name[1:])
WEEKDAYS = tuple(calendar.day_name)
WEATHER = ('foggy', 'sunny', 'windy', 'rainy', 'cold', 'humid', 'clear', 'stormy', 'mild')
FOODS = ('lentil soup', 'rye bread', 'apple cake', 'fried rice', 'tomato salad', 'fish stew',
         'mushroom risotto', 'bean chili', 'potato pancakes', 'lemon tart', 'corn fritters')
INGREDIENTS = ('onions', 'garlic', 'carrots', 'flour', 'butter', 'eggs', 'milk', 'rice', 'lentils',
               'tomatoes', 'potatoes', 'lemons', 'sugar', 'salt', 'olive oil', 'paprika', 'cumin',
               'spinach', 'beans', 'mushrooms', 'apples', 'yeast', 'honey', 'parsley')
PRODUCTS = ('kettle', 'lamp', 'backpack', 'notebook', 'bicycle bell', 'umbrella', 'teapot', 'compass',
            'headphones', 'thermos', 'desk chair', 'hand drill', 'keyboard', 'blanket', 'tent')
UNITS = ('kg', 'm', 's', 'mL', 'km/h', 'kPa', 'degC', 'lux', 'ppm', 'W')
VERBS = ('load', 'parse', 'count', 'merge', 'scale', 'filter', 'sum', 'find', 'check', 'build', 'read',
         'update', 'sort', 'score', 'split', 'clamp', 'track', 'render', 'encode', 'index')
THINGS = ('order', 'item', 'sample', 'reading', 'record', 'score', 'packet', 'event', 'price', 'weight',
          'tile', 'frame', 'ticket', 'entry', 'token', 'row', 'value', 'point', 'node', 'batch')
LOG_LEVELS = ('DEBUG', 'INFO', 'INFO', 'INFO', 'WARNING', 'ERROR')
SERVICES = ('auth', 'billing', 'search', 'scheduler', 'gateway', 'storage', 'mailer', 'indexer')


def pick(rng: random.Random, seq):
  return seq[rng.randrange(len(seq))]


def person(rng: random.Random) -> str:
  return f'{pick(rng, FIRST_NAMES)} {pick(rng, LAST_NAMES)}'


def date(rng: random.Random, start: int = 1990, stop: int = 2030) -> datetime.date:
  return datetime.date(rng.randrange(start, stop), rng.randrange(1, 13), rng.randrange(1, 29))


def timestamp(rng: random.Random) -> datetime.datetime:
  d = date(rng, 2015, 2030)
  return datetime.datetime(d.year, d.month, d.day, rng.randrange(24), rng.randrange(60), rng.randrange(60))


def plural(noun: str) -> str:
  return noun + ('es' if noun.endswith(('s', 'x', 'ch', 'sh')) else 's')


def snake(rng: random.Random) -> str:
  return f'{pick(rng, VERBS)}_{plural(pick(rng, THINGS))}'


def camel(name: str) -> str:
  head, *rest = name.split('_')
  return head + ''.join(w.capitalize() for w in rest)


def pascal(name: str) -> str:
  return ''.join(w.capitalize() for w in name.split('_'))


# ---------------------------------------------------------------------------
# Prose: expository and narrative paragraphs from sentence templates.

PROSE_SENTENCES = (
    'In {year}, {name} {action} the {adj} {noun} near {city} and kept notes on {subject}.',
    'The {noun} was built of {material} in {year} and has been {action} {n} times since.',
    'Most visitors to {city} never notice the {noun}, although it is older than the cathedral.',
    'According to the records, {n} people worked at the {noun} during the winter of {year}.',
    'What makes the {noun} {adj} is not its size but the way it was used.',
    '{name} argued that {subject} could only be understood by watching them for a full year.',
    'By {month}, the {noun} had {n} new shelves, a {material} floor and a small reading room.',
    'Nobody expected the survey of {subject} to take {n} years, yet it did.',
    'The {adj} {noun} on the east side of {city} is now a place where children learn about {subject}.',
    'Each {weekday}, {name} walked from the {noun} to the {noun2} and counted the boats.',
    'It is easy to forget how much effort went into the {noun}; {n} tonnes of {material} were carried by hand.',
    'Later studies {action} the same data and reached a more cautious conclusion.',
    'The question of {subject} returned in {year}, when a {weather} spring flooded the lower fields.',
    'Some historians describe the {noun} as {adj}; others call it merely practical.',
    'The {noun2} closed in {year}, and its collection of notes on {subject} moved to {city}.',
    'In a letter dated {month} {day}, {name} wrote that the {noun} was finally finished.',
    'Measurements taken every {n} days showed a slow but steady change in {subject}.',
    'The method was simple: observe, write it down, and compare it with the year before.',
    'On {weather} days the {noun} is almost empty, which suits the few people who study {subject}.',
    'A {adj} plaque by the door lists the names of the {n} families who paid for the {noun}.',
    'Whether the {noun} will survive another century depends on how {city} chooses to care for it.',
    'The first report ran to {n} pages and included {n2} hand-drawn maps.',
    'Critics pointed out that the sample was small, since only {n} sites had been {action}.',
    'Still, the work on {subject} changed how the town thought about its {noun}.',
)
PROSE_TITLES = ('Notes on the {Noun} of {city}', 'A Short History of {subject_t}',
                'The {Adj} {Noun}', 'Field Report: {subject_t} near {city}', 'Why the {Noun} Matters')


def _prose_slots(rng: random.Random) -> dict[str, object]:
  noun, noun2 = rng.sample(NOUNS, 2)
  subject = pick(rng, SUBJECTS)
  return dict(year=rng.randrange(1650, 2025), name=person(rng), action=pick(rng, ACTIONS),
              adj=pick(rng, ADJECTIVES), noun=noun, noun2=noun2, city=pick(rng, CITIES), subject=subject,
              material=pick(rng, MATERIALS), n=rng.randrange(2, 400), n2=rng.randrange(2, 60),
              month=pick(rng, MONTHS), weekday=pick(rng, WEEKDAYS), weather=pick(rng, WEATHER),
              day=rng.randrange(1, 29), Noun=noun.capitalize(), Adj=pick(rng, ADJECTIVES).capitalize(),
              subject_t=subject.title())


def prose(rng: random.Random) -> Iterator[str]:
  slots = _prose_slots(rng)
  yield pick(rng, PROSE_TITLES).format(**slots)
  while True:
    sentences = []
    for template in rng.sample(PROSE_SENTENCES, rng.randrange(2, 7)):  # no sentence twice in a paragraph
      if rng.random() < 0.3:  # a new year, number or person now and then; the place stays
        slots.update(year=rng.randrange(1650, 2025), n=rng.randrange(2, 400), name=person(rng))
      s = template.format(**slots)
      sentences.append(s[0].upper() + s[1:])
    yield ' '.join(sentences)


# ---------------------------------------------------------------------------
# Source code: small functions rendered in several languages.

PYTHON = {
    'sum_if': '''
        def $f($things, threshold=$t):
            """Sum the $things above threshold."""
            total = 0
            for x in $things:
                if x > threshold:
                    total += x
            return total''',
    'argmax': '''
        def $f($things):
            best, best_i = None, -1
            for i, x in enumerate($things):
                if best is None or x > best:
                    best, best_i = x, i
            return best_i''',
    'gcd': '''
        def $f(a, b):
            while b:
                a, b = b, a % b
            return abs(a)''',
    'clamp': '''
        def $f(value, lo=-$t, hi=$t):
            return max(lo, min(hi, value))''',
    'poly': '''
        COEFFS = $coeffs


        def $f(x):
            acc = 0
            for c in COEFFS:
                acc = acc * x + c
            return acc''',
    'bsearch': '''
        def $f(sorted_$things, target):
            lo, hi = 0, len(sorted_$things)
            while lo < hi:
                mid = (lo + hi) // 2
                if sorted_$things[mid] < target:
                    lo = mid + 1
                else:
                    hi = mid
            return lo''',
    'fib': '''
        def $f(n):
            a, b = 0, 1
            for _ in range(n):
                a, b = b, a + b
            return a


        print([$f(i) for i in range($t)])''',
}


def _py(rng: random.Random, kind: str, f: str, thing: str) -> str:
  if kind == 'record':
    fields = rng.sample(('name', 'size', 'price', 'count', 'label', 'weight', 'owner', 'rank'), 3)
    cls = pascal(thing)
    body = '\n'.join(f'        self.{x} = {x}' for x in fields)
    shown = ', '.join(f'{x}={{self.{x}!r}}' for x in fields)
    return (f'class {cls}:\n    def __init__(self, {", ".join(fields)}):\n{body}\n\n'
            f'    def __repr__(self):\n        return f"{cls}({shown})"\n')
  coeffs = [rng.randrange(-9, 10) for _ in range(rng.randrange(2, 6))]
  source = textwrap.dedent(PYTHON[kind]).strip('\n')
  return string.Template(source).substitute(f=f, things=plural(thing), t=rng.randrange(5, 100),
                                            coeffs=repr(coeffs)) + '\n'


# Templates of the C-like languages: (kind, language) -> source. `$f` is the
# function, `$things` the array, `$t` a threshold; Go is written with spaces
# here and indented with tabs when rendered.
C_LIKE = {
    ('sum_if', 'c'): '''
        /* Sum of the $things above threshold. */
        long $f(const int *$things, size_t n, int threshold) {
            long total = 0;
            for (size_t i = 0; i < n; i++) {
                if ($things[i] > threshold) {
                    total += $things[i];
                }
            }
            return total;
        }''',
    ('sum_if', 'java'): '''
        /** Sum of the $things above a threshold. */
        static long $f(int[] $things, int threshold) {
            long total = 0;
            for (int i = 0; i < $things.length; i++) {
                if ($things[i] > threshold) {
                    total += $things[i];
                }
            }
            return total;
        }''',
    ('sum_if', 'javascript'): '''
        // Sum of the $things above threshold.
        function $f($things, threshold = $t) {
          let total = 0;
          for (const x of $things) {
            if (x > threshold) {
              total += x;
            }
          }
          return total;
        }''',
    ('sum_if', 'go'): '''
        // $f sums the $things above threshold.
        func $f($things []int, threshold int) int {
            total := 0
            for _, x := range $things {
                if x > threshold {
                    total += x
                }
            }
            return total
        }''',
    ('sum_if', 'rust'): '''
        /// Sum of the $things above `threshold`.
        fn $f($things: &[i64], threshold: i64) -> i64 {
            $things.iter().filter(|&&x| x > threshold).sum()
        }''',
    ('gcd', 'c'): '''
        long $f(long a, long b) {
            while (b != 0) {
                long t = a % b;
                a = b;
                b = t;
            }
            return a < 0 ? -a : a;
        }''',
    ('gcd', 'java'): '''
        static long $f(long a, long b) {
            while (b != 0) {
                long t = a % b;
                a = b;
                b = t;
            }
            return Math.abs(a);
        }''',
    ('gcd', 'javascript'): '''
        function $f(a, b) {
          while (b !== 0) {
            [a, b] = [b, a % b];
          }
          return Math.abs(a);
        }''',
    ('gcd', 'go'): '''
        func $f(a, b int) int {
            for b != 0 {
                a, b = b, a%b
            }
            if a < 0 {
                return -a
            }
            return a
        }''',
    ('gcd', 'rust'): '''
        fn $f(mut a: i64, mut b: i64) -> i64 {
            while b != 0 {
                let t = a % b;
                a = b;
                b = t;
            }
            a.abs()
        }''',
    ('clamp', 'c'): '''
        static inline int $f(int v) {
            if (v < -$t) return -$t;
            if (v > $t) return $t;
            return v;
        }''',
    ('clamp', 'java'): '''
        static int $f(int v) {
            return Math.max(-$t, Math.min($t, v));
        }''',
    ('clamp', 'javascript'): '''
        const $f = (v, lo = -$t, hi = $t) => Math.max(lo, Math.min(hi, v));''',
    ('clamp', 'go'): '''
        func $f(v int) int {
            if v < -$t {
                return -$t
            }
            if v > $t {
                return $t
            }
            return v
        }''',
    ('clamp', 'rust'): '''
        fn $f(v: i64) -> i64 {
            v.clamp(-$t, $t)
        }''',
    ('bsearch', 'c'): '''
        size_t $f(const int *a, size_t n, int key) {
            size_t lo = 0, hi = n;
            while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;
                if (a[mid] < key) lo = mid + 1; else hi = mid;
            }
            return lo;
        }''',
    ('bsearch', 'java'): '''
        static int $f(int[] a, int key) {
            int lo = 0, hi = a.length;
            while (lo < hi) {
                int mid = (lo + hi) >>> 1;
                if (a[mid] < key) lo = mid + 1; else hi = mid;
            }
            return lo;
        }''',
    ('bsearch', 'javascript'): '''
        function $f(a, key) {
          let lo = 0, hi = a.length;
          while (lo < hi) {
            const mid = (lo + hi) >> 1;
            if (a[mid] < key) lo = mid + 1; else hi = mid;
          }
          return lo;
        }''',
    ('bsearch', 'go'): '''
        func $f(a []int, key int) int {
            lo, hi := 0, len(a)
            for lo < hi {
                mid := (lo + hi) / 2
                if a[mid] < key {
                    lo = mid + 1
                } else {
                    hi = mid
                }
            }
            return lo
        }''',
    ('bsearch', 'rust'): '''
        fn $f(a: &[i64], key: i64) -> usize {
            let (mut lo, mut hi) = (0, a.len());
            while lo < hi {
                let mid = (lo + hi) / 2;
                if a[mid] < key { lo = mid + 1; } else { hi = mid; }
            }
            lo
        }''',
}
# Kinds without a C-like template of their own borrow one of the same shape.
C_LIKE_KIND = {'argmax': 'sum_if', 'poly': 'sum_if', 'fib': 'gcd'}


def _c_like(rng: random.Random, lang: str, kind: str, f: str, thing: str) -> str:
  """C, Java, JavaScript, Go and Rust: the same small functions in each spelling."""
  name = f if lang in ('c', 'rust') else camel(f)
  if kind == 'record':
    cls = pascal(thing)
    fields = rng.sample(('id', 'count', 'size', 'rank', 'year', 'total'), 3)
    if lang == 'c':
      return 'typedef struct {\n' + ''.join(f'    int {x};\n' for x in fields) + f'}} {cls};\n'
    if lang == 'rust':
      return ('#[derive(Debug, Clone, PartialEq)]\npub struct ' + cls + ' {\n'
              + ''.join(f'    pub {x}: i64,\n' for x in fields) + '}\n')
    if lang == 'go':
      return f'type {cls} struct {{\n' + ''.join(f'\t{x.capitalize()} int\n' for x in fields) + '}\n'
    if lang == 'java':
      return f'record {cls}(' + ', '.join(f'int {x}' for x in fields) + ') {}\n'
    return (f'class {cls} {{\n  constructor(' + ', '.join(fields) + ') {\n'
            + ''.join(f'    this.{x} = {x};\n' for x in fields) + '  }\n}\n')
  source = textwrap.dedent(C_LIKE[(C_LIKE_KIND.get(kind, kind), lang)]).strip('\n')
  source = string.Template(source).substitute(f=name, things=plural(thing), t=rng.randrange(1, 100))
  if lang == 'go':
    source = re.sub(r'^( {4})+', lambda m: '\t' * (len(m.group()) // 4), source, flags=re.M)
  return source + '\n'


CODE_KINDS = ('sum_if', 'argmax', 'gcd', 'clamp', 'poly', 'record', 'bsearch', 'fib')
CODE_HEADERS = {
    'python': lambda rng: f'"""Helpers for {pick(rng, THINGS)} processing."""\n\nimport math\nimport sys\n',
    'c': lambda rng: f'#include <stdio.h>\n#include <stdlib.h>\n\n/* {pick(rng, THINGS)}.c */\n',
    'java': lambda rng: (f'package org.example.{pick(rng, THINGS)};\n\nimport java.util.*;\n\n'
                         f'public final class {pascal(pick(rng, THINGS))}Utils {{'),
    'javascript': lambda rng: f"'use strict';\n// {pick(rng, THINGS)}-utils.js\n",
    'go': lambda rng: f'package {pick(rng, THINGS)}\n\nimport (\n\t"fmt"\n\t"sort"\n)\n',
    'rust': lambda rng: f'//! Utilities for {pick(rng, THINGS)} handling.\nuse std::collections::HashMap;\n',
}


def _sql(rng: random.Random, thing: str) -> str:
  table = plural(thing)
  cols = rng.sample(('name', 'city', 'price', 'quantity', 'created_at', 'status', 'score', 'weight'), 3)
  kind = rng.randrange(4)
  if kind == 0:
    defs = ',\n'.join(f'  {c} {"TEXT" if c in ("name", "city", "status") else "NUMERIC"}' for c in cols)
    return f'CREATE TABLE {table} (\n  id INTEGER PRIMARY KEY,\n{defs}\n);\n'
  if kind == 1:
    rows = ',\n'.join(f"  ({i}, '{pick(rng, FIRST_NAMES)}', {rng.randrange(1, 999)})"
                      for i in range(1, rng.randrange(3, 9)))
    return f'INSERT INTO {table} (id, name, {cols[0]}) VALUES\n{rows};\n'
  if kind == 2:
    return (f'SELECT {cols[0]}, COUNT(*) AS n, AVG({cols[1]}) AS mean_{cols[1]}\nFROM {table}\n'
            f'WHERE {cols[2]} > {rng.randrange(100)}\nGROUP BY {cols[0]}\nHAVING COUNT(*) >= {rng.randrange(2, 9)}\n'
            f'ORDER BY n DESC\nLIMIT {rng.randrange(5, 50)};\n')
  other = plural(pick(rng, THINGS))
  return (f'SELECT a.id, a.{cols[0]}, b.{cols[1]}\nFROM {table} AS a\nJOIN {other} AS b ON b.{thing}_id = a.id\n'
          f"WHERE b.{cols[2]} IS NOT NULL AND a.{cols[0]} <> ''\nORDER BY a.id;\n")


def _bash(rng: random.Random) -> str:
  var, d = pick(rng, THINGS).upper(), pick(rng, THINGS)
  kind = rng.randrange(3)
  if kind == 0:
    return (f'for f in "${{{var}_DIR:-./{plural(d)}}}"/*.log; do\n  [ -e "$f" ] || continue\n'
            f'  lines=$(wc -l < "$f")\n  echo "$f: $lines lines"\ndone\n')
  if kind == 1:
    return (f'case "$1" in\n  start) echo "starting {d}" ;;\n  stop) echo "stopping {d}" ;;\n'
            f'  *) echo "usage: $0 start|stop" >&2; exit {rng.randrange(1, 4)} ;;\nesac\n')
  return (f'{var}_COUNT=0\nwhile read -r line; do\n  {var}_COUNT=$(( {var}_COUNT + 1 ))\n'
          f'done < "{plural(d)}.txt"\nprintf "%d {plural(d)}\\n" "${var}_COUNT"\n')


def code(rng: random.Random) -> Iterator[str]:
  lang = pick(rng, ('python', 'python', 'c', 'java', 'javascript', 'go', 'rust', 'sql', 'bash'))
  if lang == 'sql':
    thing = pick(rng, THINGS)
    yield f'-- schema and queries for {plural(thing)}'
    while True:
      yield _sql(rng, thing)
  if lang == 'bash':
    yield '#!/usr/bin/env bash\nset -euo pipefail'
    while True:
      yield _bash(rng)
  yield CODE_HEADERS[lang](rng)
  while True:
    kind, f, thing = pick(rng, CODE_KINDS), snake(rng), pick(rng, THINGS)
    unit = _py(rng, kind, f, thing) if lang == 'python' else _c_like(rng, lang, kind, f, thing)
    if lang == 'java':  # members of the class the header opens
      unit = '\n'.join('    ' + line if line else line for line in unit.splitlines())
    yield unit


# ---------------------------------------------------------------------------
# Mathematics: problems with worked solutions (answers computed, never guessed).

def _frac(x: fractions.Fraction) -> str:
  return str(x.numerator) if x.denominator == 1 else f'{x.numerator}/{x.denominator}'


def _poly_str(cs: list[int], var: str = 'x') -> str:
  """cs[k] is the coefficient of var**k; highest power first."""
  terms = []
  for k in range(len(cs) - 1, -1, -1):
    c = cs[k]
    if c == 0:
      continue
    mag = abs(c)
    body = (str(mag) if k == 0 or mag != 1 else '') + (var if k >= 1 else '') + (f'^{k}' if k > 1 else '')
    terms.append(('-' if c < 0 else '+', body))
  if not terms:
    return '0'
  s = ('-' if terms[0][0] == '-' else '') + terms[0][1]
  return s + ''.join(f' {sign} {body}' for sign, body in terms[1:])


def _tex_poly(cs: list[fractions.Fraction]) -> str:
  """LaTeX of sum cs[k] x^k, highest power first, fractions as \\frac."""
  terms = []
  for k in range(len(cs) - 1, -1, -1):
    c = cs[k]
    if c == 0:
      continue
    mag = abs(c)
    if mag.denominator != 1:
      coef = f'\\frac{{{mag.numerator}}}{{{mag.denominator}}}'
    else:
      coef = '' if mag == 1 and k else str(mag.numerator)
    terms.append(('-' if c < 0 else '+', coef + ('x' if k else '') + (f'^{{{k}}}' if k > 1 else '')))
  if not terms:
    return '0'
  return ('-' if terms[0][0] == '-' else '') + terms[0][1] + ''.join(f' {g} {b}' for g, b in terms[1:])


def _linear(rng: random.Random) -> str:
  a = rng.choice([i for i in range(-12, 13) if i not in (0, 1)])
  b, c = rng.randrange(-50, 51), rng.randrange(-50, 51)
  x = fractions.Fraction(c - b, a)
  move = f'Subtract {b} from both sides' if b >= 0 else f'Add {-b} to both sides'
  return (f'Problem: Solve {_linear_form(a, 0)}{f" + {b}" if b >= 0 else f" - {-b}"} = {c} for x.\n'
          f'Solution: {move}: {a}x = {c - b}. Divide by {a}: x = {_frac(x)}.\nAnswer: x = {_frac(x)}')


def _linear_form(a: int, b: int) -> str:
  """'ax + by' written the way people write it: '3x - y', '-2x + 5y', 'y'."""
  terms = [(c, v) for c, v in ((a, 'x'), (b, 'y')) if c]
  out = ''
  for i, (c, v) in enumerate(terms):
    mag = '' if abs(c) == 1 else str(abs(c))
    sign = ('-' if c < 0 else '') if i == 0 else (' - ' if c < 0 else ' + ')
    out += f'{sign}{mag}{v}'
  return out or '0'


def _quadratic(rng: random.Random) -> str:
  r1, r2 = rng.randrange(-9, 10), rng.randrange(-9, 10)
  b, c = -(r1 + r2), r1 * r2
  disc = b * b - 4 * c
  roots = sorted({r1, r2})
  return (f'Problem: Find the roots of {_poly_str([c, b, 1])} = 0.\n'
          f'Solution: The discriminant is b^2 - 4ac = ({b})^2 - 4*({c}) = {disc}, '
          f'so sqrt({disc}) = {math.isqrt(disc)}. The roots are x = ({-b} ± {math.isqrt(disc)})/2.\n'
          f'Answer: x = {", ".join(map(str, roots))}')


def _system(rng: random.Random) -> str:
  while True:
    a, b, c, d = (rng.randrange(-9, 10) for _ in range(4))
    det = a * d - b * c
    if det:
      break
  x, y = rng.randrange(-20, 21), rng.randrange(-20, 21)
  e, f = a * x + b * y, c * x + d * y
  return (f'Problem: Solve the system {_linear_form(a, b)} = {e} and '
          f'{_linear_form(c, d)} = {f}.\n'
          f'Solution: By Cramer\'s rule, D = ({a})({d}) - ({b})({c}) = {det}. '
          f'D_x = ({e})({d}) - ({b})({f}) = {e * d - b * f}, D_y = ({a})({f}) - ({e})({c}) = {a * f - e * c}. '
          f'So x = {e * d - b * f}/{det} = {x} and y = {a * f - e * c}/{det} = {y}.\nAnswer: (x, y) = ({x}, {y})')


def _derivative(rng: random.Random) -> str:
  cs = [rng.randrange(-9, 10) for _ in range(rng.randrange(3, 7))]
  cs[-1] = cs[-1] or 1
  d = [k * cs[k] for k in range(1, len(cs))]
  integral = _tex_poly([fractions.Fraction(0)] + [fractions.Fraction(c, k + 1) for k, c in enumerate(cs)])
  return (f'Let $f(x) = {_poly_str(cs)}$. Differentiating term by term with $\\frac{{d}}{{dx}} x^n = n x^{{n-1}}$ '
          f'gives $f\'(x) = {_poly_str(d)}$, and an antiderivative is $F(x) = {integral} + C$.')


def _euclid(rng: random.Random) -> str:
  g = rng.randrange(2, 40)
  a, b = g * rng.randrange(2, 60), g * rng.randrange(2, 60)
  steps, x, y = [], max(a, b), min(a, b)
  while y:
    steps.append(f'{x} = {x // y} * {y} + {x % y}')
    x, y = y, x % y
  return f'Compute gcd({a}, {b}) with the Euclidean algorithm:\n' + '\n'.join(steps) + f'\nSo gcd({a}, {b}) = {x}.'


def _factor(rng: random.Random) -> str:
  n = rng.randrange(12, 20000)
  m, ps, p = n, [], 2
  while p * p <= m:
    while m % p == 0:
      ps.append(p)
      m //= p
    p += 1
  if m > 1:
    ps.append(m)
  powers = ' * '.join(f'{q}^{ps.count(q)}' if ps.count(q) > 1 else str(q) for q in sorted(dict.fromkeys(ps)))
  return f'The prime factorization of {n} is {powers}' + (' (it is prime).' if len(ps) == 1 else '.')


def _word_problem(rng: random.Random) -> str:
  name, item = pick(rng, FIRST_NAMES), pick(rng, PRODUCTS)
  k, price, paid = rng.randrange(2, 12), rng.randrange(150, 4000), 0
  total = k * price
  paid = (total // 1000 + 1) * 1000
  return (f'Problem: {name} buys {k} items of type "{item}" at {price / 100:.2f} euros each and pays with '
          f'{paid / 100:.2f} euros. How much change does {name} get?\n'
          f'Solution: The total is {k} * {price / 100:.2f} = {total / 100:.2f} euros. '
          f'The change is {paid / 100:.2f} - {total / 100:.2f} = {(paid - total) / 100:.2f} euros.\n'
          f'Answer: {(paid - total) / 100:.2f} euros')


def _series(rng: random.Random) -> str:
  a, d, n = rng.randrange(-20, 30), rng.randrange(1, 12), rng.randrange(5, 60)
  last = a + (n - 1) * d
  s = n * (a + last) // 2
  r = rng.randrange(2, 5)
  m = rng.randrange(3, 10)
  g = (r ** m - 1) // (r - 1)
  return (f'The arithmetic series {a} + {a + d} + {a + 2 * d} + ... has {n} terms and last term {last}, '
          f'so its sum is n(a_1 + a_n)/2 = {n}*({a} + {last})/2 = {s}. '
          f'For the geometric series 1 + {r} + {r}^2 + ... + {r}^{m - 1}, the sum is ({r}^{m} - 1)/({r} - 1) = {g}.')


def _matrix(rng: random.Random) -> str:
  n = rng.randrange(2, 4)
  a = [[rng.randrange(-5, 6) for _ in range(n)] for _ in range(n)]
  b = [[rng.randrange(-5, 6) for _ in range(n)] for _ in range(n)]
  c = [[sum(a[i][k] * b[k][j] for k in range(n)) for j in range(n)] for i in range(n)]
  tex = lambda m: '\\begin{pmatrix} ' + ' \\\\ '.join(' & '.join(map(str, row)) for row in m) + ' \\end{pmatrix}'
  return f'$$ {tex(a)} {tex(b)} = {tex(c)} $$'


def _probability(rng: random.Random) -> str:
  dice, target = rng.randrange(2, 4), 0
  counts: dict[int, int] = {}
  for roll in range(6 ** dice):
    s, r = 0, roll
    for _ in range(dice):
      s, r = s + r % 6 + 1, r // 6
    counts[s] = counts.get(s, 0) + 1
  target = rng.randrange(dice, 6 * dice + 1)
  p = fractions.Fraction(counts[target], 6 ** dice)
  return (f'Problem: {dice} fair dice are rolled. What is the probability that the sum is {target}?\n'
          f'Solution: There are 6^{dice} = {6 ** dice} equally likely outcomes, of which {counts[target]} '
          f'sum to {target}.\nAnswer: {counts[target]}/{6 ** dice} = {_frac(p)} ≈ {float(p):.4f}')


def _interest(rng: random.Random) -> str:
  p, rate, years = rng.randrange(500, 20000), rng.randrange(1, 9), rng.randrange(3, 12)
  rows = [f'| {y} | {p * (1 + rate / 100) ** y:,.2f} |' for y in range(years + 1)]
  return (f'A deposit of {p} at {rate}% interest compounded yearly grows as $P(1+r)^t$:\n\n'
          '| year | balance |\n|---:|---:|\n' + '\n'.join(rows))


MATH_KINDS = (_linear, _quadratic, _system, _derivative, _euclid, _factor, _word_problem, _series, _matrix,
              _probability, _interest)


def mathematics(rng: random.Random) -> Iterator[str]:
  kinds = rng.sample(MATH_KINDS, 3)  # a worksheet of a few kinds of problem
  yield f'Exercise set {rng.randrange(1, 40)}.{rng.randrange(1, 10)}'
  while True:
    yield pick(rng, kinds)(rng)


# ---------------------------------------------------------------------------
# Structured data: JSON, CSV, markdown tables, YAML, XML, INI, logs, Unicode tables.

def _record(rng: random.Random) -> dict[str, object]:
  kind = rng.randrange(3)
  if kind == 0:
    return {'id': rng.randrange(10 ** 6), 'name': person(rng), 'city': pick(rng, CITIES),
            'born': date(rng, 1940, 2010).isoformat(), 'active': rng.random() < 0.7,
            'tags': rng.sample(THINGS, rng.randrange(0, 4))}
  if kind == 1:
    return {'sku': f'{pick(rng, THINGS)[:3].upper()}-{rng.randrange(10 ** 5):05d}', 'product': pick(rng, PRODUCTS),
            'price': round(rng.uniform(1, 500), 2), 'stock': rng.randrange(0, 1000),
            'dimensions': {'w': rng.randrange(1, 100), 'h': rng.randrange(1, 100), 'unit': 'cm'}}
  return {'sensor': f'{pick(rng, NOUNS)}-{rng.randrange(100)}', 'time': timestamp(rng).isoformat(),
          'unit': pick(rng, UNITS), 'values': [round(rng.gauss(20, 8), 3) for _ in range(rng.randrange(1, 6))],
          'ok': rng.random() < 0.9}


def _table_rows(rng: random.Random) -> tuple[list[str], list[list[str]]]:
  header = ['id', 'name', 'city', 'score', 'date']
  rows = [[str(rng.randrange(10 ** 4)), person(rng), pick(rng, CITIES), f'{rng.uniform(0, 100):.1f}',
           date(rng).isoformat()] for _ in range(rng.randrange(2, 8))]
  return header, rows


def _xml(value: object, depth: int) -> str:
  """Children of an XML element for a dict (one element per key) or a list (<item> elements)."""
  pad = '\n' + '  ' * depth
  items = value.items() if isinstance(value, dict) else (('item', v) for v in value)  # type: ignore[union-attr]
  out = []
  for k, v in items:
    if isinstance(v, (dict, list)):
      out.append(f'{pad}<{k}>{_xml(v, depth + 1)}{pad}</{k}>' if v else f'{pad}<{k}/>')
    else:
      text = str(v).lower() if isinstance(v, bool) else html.escape(str(v))
      out.append(f'{pad}<{k}>{text}</{k}>')
  return ''.join(out)


def structured(rng: random.Random) -> Iterator[str]:
  fmt = pick(rng, ('json', 'jsonl', 'csv', 'markdown', 'yaml', 'xml', 'ini', 'log', 'unicode', 'calendar', 'tsv'))
  if fmt == 'csv' or fmt == 'tsv':
    sep = ',' if fmt == 'csv' else '\t'
    header, _ = _table_rows(rng)
    yield sep.join(header)
    while True:
      yield '\n'.join(sep.join(r) for r in _table_rows(rng)[1])
  if fmt == 'calendar':
    year = rng.randrange(1900, 2100)
    month = rng.randrange(1, 13)
    while True:
      yield calendar.TextCalendar(rng.randrange(7)).formatmonth(year, month)
      month = month % 12 + 1
      year += month == 1
  if fmt == 'unicode':
    # Ranges of assigned, printable code points: Latin, Greek, Cyrillic, arrows, math, CJK, kana.
    start = pick(rng, (0x00C0, 0x0391, 0x0410, 0x2190, 0x2200, 0x4E00, 0x3041, 0x0905, 0x0621, 0x20A0))
    cp = start + rng.randrange(0, 40)
    yield 'code point | char | name | category'
    while True:
      lines = []
      for _ in range(rng.randrange(3, 8)):
        ch = chr(cp)
        name = unicodedata.name(ch, '')
        if name:
          lines.append(f'U+{cp:04X} | {ch} | {name} | {unicodedata.category(ch)}')
        cp += 1
      yield '\n'.join(lines) or f'U+{cp:04X} | (unassigned)'
  while True:
    if fmt == 'json':
      yield json.dumps([_record(rng) for _ in range(rng.randrange(1, 4))], indent=pick(rng, (2, 4)),
                       ensure_ascii=False)
    elif fmt == 'jsonl':
      yield json.dumps(_record(rng), ensure_ascii=False)
    elif fmt == 'markdown':
      header, rows = _table_rows(rng)
      yield '\n'.join(['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
                      + ['| ' + ' | '.join(r) + ' |' for r in rows])
    elif fmt == 'yaml':
      r = _record(rng)
      yield '\n'.join(f'{"- " if i == 0 else "  "}{k}: {json.dumps(v)}' for i, (k, v) in enumerate(r.items()))
    elif fmt == 'xml':
      yield f'<record id="{rng.randrange(10 ** 5)}">{_xml(_record(rng), 1)}\n</record>'
    elif fmt == 'ini':
      svc = pick(rng, SERVICES)
      yield (f'[{svc}]\nhost = {svc}.internal\nport = {rng.randrange(1024, 65535)}\n'
             f'timeout_s = {rng.randrange(1, 120)}\nretries = {rng.randrange(0, 6)}\n'
             f'enabled = {pick(rng, ("true", "false"))}')
    else:  # log
      t = timestamp(rng)
      lines = []
      for _ in range(rng.randrange(2, 7)):
        t += datetime.timedelta(milliseconds=rng.randrange(1, 90000))
        lvl, svc = pick(rng, LOG_LEVELS), pick(rng, SERVICES)
        msg = pick(rng, (f'request {rng.randrange(16 ** 8):08x} finished in {rng.randrange(1, 3000)} ms',
                         f'retrying {pick(rng, THINGS)} upload (attempt {rng.randrange(1, 5)})',
                         f'cache hit ratio {rng.random():.3f}', f'user {rng.randrange(10 ** 5)} signed in',
                         f'queue depth {rng.randrange(0, 500)} exceeds soft limit'))
        lines.append(f'{t.isoformat(sep=" ", timespec="milliseconds")} {lvl:<7} [{svc}] {msg}')
      yield '\n'.join(lines)


# ---------------------------------------------------------------------------
# Dialogue: chat transcripts in role-tagged templates.

CHAT_TEMPLATES = {
    'tags': lambda role, text: f'<|{role}|>\n{text}',
    'im': lambda role, text: f'<|im_start|>{role}\n{text}<|im_end|>',
    'plain': lambda role, text: f'{role.capitalize()}: {text}',
}


def _exchange(rng: random.Random) -> tuple[str, str]:
  kind = rng.randrange(7)
  if kind == 0:
    food = pick(rng, FOODS)
    ing = rng.sample(INGREDIENTS, rng.randrange(3, 7))
    steps = [f'{i + 1}. {s}' for i, s in enumerate(
        [f'Prepare the {x}.' for x in ing[:2]] + [f'Cook for {rng.randrange(5, 60)} minutes.', 'Season and serve.'])]
    return (f'How do I make {food} for {rng.randrange(2, 9)} people?',
            f'You will need {", ".join(ing)}.\n' + '\n'.join(steps))
  if kind == 1:
    km = rng.randrange(1, 500)
    return (f'How many miles is {km} km?', f'{km} km is about {km / 1.609344:.2f} miles (1 mile = 1.609344 km).')
  if kind == 2:
    city, days = pick(rng, CITIES), rng.randrange(2, 6)
    plan = '\n'.join(f'- Day {d + 1}: visit the {pick(rng, ADJECTIVES)} {pick(rng, NOUNS)}' for d in range(days))
    return (f'I have {days} days in {city}. What should I see?', f'Here is a simple plan:\n{plan}')
  if kind == 3:
    a, b = rng.randrange(2, 300), rng.randrange(2, 300)
    return (f'What is {a} times {b}?', f'{a} × {b} = {a * b}.')
  if kind == 4:
    f = snake(rng)
    return (f'Can you write a Python function called {f} that returns the largest value in a list?',
            f'Sure:\n\n```python\ndef {f}(values):\n    return max(values) if values else None\n```\n'
            'It returns None for an empty list instead of raising.')
  if kind == 5:
    d = date(rng, 2000, 2030)
    return (f'What day of the week was {d.isoformat()}?', f'{d.isoformat()} was a {WEEKDAYS[d.weekday()]}.')
  s = _prose_slots(rng)
  return (f'Tell me something about the {s["noun"]} in {s["city"]}.',
          ' '.join(t.format(**s) for t in rng.sample(PROSE_SENTENCES, 2)))


def dialogue(rng: random.Random) -> Iterator[str]:
  style = pick(rng, tuple(CHAT_TEMPLATES))
  turn = CHAT_TEMPLATES[style]
  if rng.random() < 0.5:
    yield turn('system', pick(rng, ('You are a helpful assistant.', 'You are a concise assistant. Answer briefly.',
                                    f'You are an assistant for travellers in {pick(rng, CITIES)}.')))
  while True:
    q, a = _exchange(rng)
    if rng.random() < 0.3 and not q.startswith('I '):
      q = pick(rng, ('Thanks! Next question: ', 'Also, ', 'One more thing: ')) + q[0].lower() + q[1:]
    yield turn('user', q) + '\n' + turn('assistant', a)


# ---------------------------------------------------------------------------
# Markup: HTML pages, Markdown documents, e-mail messages.

def markup(rng: random.Random) -> Iterator[str]:
  fmt = pick(rng, ('html', 'markdown', 'email', 'rst'))
  slots = _prose_slots(rng)
  title = pick(rng, PROSE_TITLES).format(**slots)
  para = lambda: ' '.join(t.format(**slots) for t in rng.sample(PROSE_SENTENCES, rng.randrange(1, 4)))
  if fmt == 'email':
    msg = email.message.EmailMessage(policy=email.policy.SMTP)
    sender, to = person(rng), person(rng)
    msg['From'] = f'{sender} <{sender.split()[0].lower()}@example.org>'
    msg['To'] = f'{to} <{to.split()[0].lower()}@example.net>'
    msg['Subject'] = title
    msg['Date'] = timestamp(rng).strftime('%a, %d %b %Y %H:%M:%S +0000')
    msg['Message-ID'] = f'<{rng.randrange(16 ** 12):012x}@example.org>'
    msg.set_content(f'Dear {to.split()[0]},\n\n{para()}\n\nBest regards,\n{sender}\n')
    yield msg.as_string().replace('\r\n', '\n')
    while True:
      yield f'> {para()}'
  if fmt == 'html':
    yield (f'<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8"><title>{html.escape(title)}</title>'
           f'</head>\n<body>\n<h1>{html.escape(title)}</h1>')
    while True:
      k = rng.randrange(4)
      if k == 0:
        yield f'<p>{html.escape(para())}</p>'
      elif k == 1:
        items = ''.join(f'\n  <li><a href="/{pick(rng, NOUNS)}/{rng.randrange(999)}">'
                        f'{pick(rng, ADJECTIVES)} {pick(rng, NOUNS)}</a></li>' for _ in range(rng.randrange(2, 6)))
        yield f'<ul>{items}\n</ul>'
      elif k == 2:
        header, rows = _table_rows(rng)
        yield ('<table>\n  <tr>' + ''.join(f'<th>{h}</th>' for h in header) + '</tr>\n'
               + ''.join('  <tr>' + ''.join(f'<td>{html.escape(c)}</td>' for c in r) + '</tr>\n' for r in rows)
               + '</table>')
      else:
        yield f'<h2>{html.escape(pick(rng, PROSE_TITLES).format(**_prose_slots(rng)))}</h2>'
  if fmt == 'rst':
    yield f'{title}\n{"=" * len(title)}'
    while True:
      if rng.random() < 0.25:
        sub = pick(rng, PROSE_TITLES).format(**_prose_slots(rng))
        yield f'{sub}\n{"-" * len(sub)}'
      else:
        yield para() if rng.random() < 0.7 else '.. note::\n\n   ' + para()
  yield f'# {title}'
  while True:
    k = rng.randrange(4)
    if k == 0:
      yield para()
    elif k == 1:
      yield '\n'.join(f'- **{pick(rng, THINGS)}**: {pick(rng, ADJECTIVES)} {pick(rng, NOUNS)}'
                      for _ in range(rng.randrange(2, 6)))
    elif k == 2:
      command = pick(rng, ('pip install', 'make', 'cargo run --bin'))
      yield f'```bash\n{command} {pick(rng, THINGS)}-{pick(rng, VERBS)}\n```'
    else:
      yield f'## {pick(rng, PROSE_TITLES).format(**_prose_slots(rng))}'
