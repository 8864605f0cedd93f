"""Collectives read off a compiled executable's HLO text: how many, how large, where.

How much a step sends between devices is a property of its compiled program, so
tests/test_multidevice.py and experiments/bench_collectives.py count it there rather than
trusting the Python that produced it: every all-reduce, its payload in bytes, and whether
it sits inside a while loop (where it runs once per iteration).
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
_HEADER = re.compile(r'^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*(.*?)\s+([\w\-]+)\(')
_CALLED = re.compile(
  r'(?:to_apply|calls|body|condition|branch_computations)=\{?([^,}]+(?:,\s*%[\w.\-]+)*)\}?'
)


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction: its opcode, payload bytes, and whether in a loop."""

  opcode: str
  bytes: int
  in_loop: bool
  computation: str


def payload_bytes(result_type: str) -> int:
  """Bytes of an HLO result type, a shape like `f32[8,10]{1,0}` or a tuple of them."""
  total = 0
  for dtype, dims in _SHAPE.findall(result_type):
    total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
  return total


def collectives(hlo_text: str, opcodes=('all-reduce', 'all-reduce-start')) -> list:
  """Every instruction with one of `opcodes`, with whether a while loop runs it."""
  computations: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(1)
      computations[current] = []
    elif current is not None:
      computations[current].append(line)

  def called(lines, keys=None):
    names = set()
    for line in lines:
      for match in _CALLED.finditer(line):
        if keys and not match.group(0).startswith(keys):
          continue
        names.update(n.strip().lstrip('%') for n in match.group(1).split(','))
    return names

  # Computations reachable from a while body or condition run inside the loop.
  in_loop = set()
  frontier = set()
  for lines in computations.values():
    frontier |= called([ln for ln in lines if ' while(' in ln], ('body', 'condition'))
  while frontier:
    name = frontier.pop()
    if name in in_loop or name not in computations:
      continue
    in_loop.add(name)
    frontier |= called(computations[name])

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
          )
        )
  return found


def all_reduce_bytes_per_update(hlo_text: str, loop_trips: int) -> int:
  """Bytes all-reduced per update, counting a collective in a loop `loop_trips` times.

  `loop_trips` is the trip count of the loop that holds them (the accumulation count A
  for a step whose micro-batch loop is the only loop).
  """
  return sum(c.bytes * (loop_trips if c.in_loop else 1) for c in collectives(hlo_text))
