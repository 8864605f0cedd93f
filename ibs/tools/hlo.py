"""Collectives read off a compiled executable's HLO text: how many, how large, where;
and the program's size (`instruction_count`).

How much a step sends between devices is a property of its compiled program, so
tests/test_multidevice.py and experiments/bench_collectives.py count it there rather than
trusting the Python that produced it: every all-reduce, its payload in bytes, whether it
sits inside a while loop, and how many times it runs per call of the program. That count
is the product of the trip counts of the loops around it, as XLA records them on each
`while` (`known_trip_count`): the step's micro-batch loop runs A − 1 times, not A (the
first micro-batch starts the sums before it), and a loop XLA removed is no loop.
"""

from __future__ import annotations

import dataclasses
import math
import re

_BYTES = {
  'pred': 1,
  's8': 1,
  'u8': 1,
  's16': 2,
  'u16': 2,
  'f16': 2,
  'bf16': 2,
  's32': 4,
  'u32': 4,
  'f32': 4,
  's64': 8,
  'u64': 8,
  'f64': 8,
}
_SHAPE = re.compile(r'\b(' + '|'.join(_BYTES) + r')\[([\d,]*)\]')
_HEADER = re.compile(r'^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*(.*?)\s+([\w\-]+)\(')
_CALLED = re.compile(
  r'(to_apply|calls|body|condition|branch_computations)=\{?([^,}]+(?:,\s*%[\w.\-]+)*)\}?'
)
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction: its opcode, payload bytes, whether it is in a loop,
  and how many times it runs per call of the program (None: a loop around it has no
  trip count known at compile time, such as K updates per dispatch)."""

  opcode: str
  bytes: int
  in_loop: bool
  computation: str
  runs: int | None = 1


def payload_bytes(result_type: str) -> int:
  """Bytes of an HLO result type, a shape like `f32[8,10]{1,0}` or a tuple of them."""
  total = 0
  for dtype, dims in _SHAPE.findall(result_type):
    total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
  return total


def _calls(line: str) -> list[tuple[str, int | None, bool]]:
  """(computation, times per execution of `line`, inside a loop) for what `line` calls:
  a while's body runs its known trip count n, its condition n + 1."""
  trips = _TRIPS.search(line)
  n = int(trips.group(1)) if trips else None
  looping = ' while(' in line
  found = []
  for match in _CALLED.finditer(line):
    key = match.group(1)
    times = 1
    if looping and key in ('body', 'condition'):
      times = None if n is None else n + (key == 'condition')
    for name in match.group(2).split(','):
      found.append((name.strip().lstrip('%'), times, looping))
  return found


def collectives(hlo_text: str, opcodes=('all-reduce', 'all-reduce-start')) -> list:
  """Every instruction with one of `opcodes`: its bytes, whether a while loop runs it,
  and how many times it runs per call of the program."""
  computations: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
    elif current is not None:
      computations[current].append(line)
  edges = {
    name: [call for line in lines for call in _calls(line) if call[0] in computations]
    for name, lines in computations.items()
  }

  # Callers before callees (HLO's call graph has no cycles), then runs summed over the
  # call sites: runs(callee) = Σ runs(caller) × times.
  order, seen = [], set()

  def visit(name):
    seen.add(name)
    for callee, _, _ in edges[name]:
      if callee not in seen:
        visit(callee)
    order.append(name)

  for name in [entry] if entry else list(computations):
    if name not in seen:
      visit(name)
  runs: dict[str, int | None] = dict.fromkeys(computations, 0)
  in_loop = set()
  for name in [entry] if entry else []:
    runs[name] = 1
  for name in reversed(order):
    for callee, times, looping in edges[name]:
      if runs[name] is None or times is None or runs[callee] is None:
        runs[callee] = None
      else:
        runs[callee] += runs[name] * times
      if looping or name in in_loop:
        in_loop.add(callee)

  found = []
  for name, lines in computations.items():
    for line in lines:
      instruction = _INSTRUCTION.match(line)
      if instruction and instruction.group(2) in opcodes:
        found.append(
          Collective(
            instruction.group(2),
            payload_bytes(instruction.group(1)),
            name in in_loop,
            name,
            runs[name],
          )
        )
  return found


def bytes_per_call(
  hlo_text: str,
  opcodes=('all-reduce', 'all-reduce-start'),
  unknown_trips: int | None = None,
) -> int:
  """Bytes the collectives `opcodes` send per call of the program, each counted as
  many times as it runs; `unknown_trips` stands for a loop's trip count that XLA does
  not know (None: such a loop raises ValueError)."""
  total = 0
  for c in collectives(hlo_text, opcodes):
    runs = c.runs
    if runs is None:
      if unknown_trips is None:
        raise ValueError(
          f'A {c.opcode} in {c.computation} runs in a loop whose trip count XLA does '
          'not know; pass unknown_trips.'
        )
      runs = unknown_trips
    total += c.bytes * runs
  return total


def all_reduce_bytes_per_update(hlo_text: str) -> int:
  """Bytes all-reduced per call of a program that runs one update (K = 1)."""
  return bytes_per_call(hlo_text)


def instruction_count(hlo_text: str) -> int:
  """Instructions of an HLO module's text, over all its computations (fused ones too):
  the size experiments/bench_compile.py compares, which tracks compile time."""
  return sum(1 for line in hlo_text.splitlines() if _INSTRUCTION.match(line))
