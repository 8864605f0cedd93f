"""ibs/tools/hlo.py against a hand-written HLO module whose counts are known by reading.

The compiled steps' own HLO is checked in tests/test_multidevice.py; here the parser
meets the cases a step may hold: a collective in the entry, one in a loop inside a loop
(its runs the product of the trip counts XLA records), one in a loop with no known trip
count, and a reduction computation that is called but holds no collective. The
`backend_config` of each `while` is in the form XLA:CPU prints (jax 0.10).
"""

import pytest

from ibs.tools import hlo

MODULE = """\
HloModule jit_step, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%inner_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %v = f32[4]{0} get-tuple-element(%p), index=1
  %r = (f32[4]{0}, bf16[2,3]{1,0}) all-reduce(%v, %w), replica_groups={}, to_apply=%add
  ROOT %t = (s32[], f32[4]{0}) tuple(%i, %v)
}

%inner_cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]{0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%outer_body (q: (s32[], f32[4])) -> (s32[], f32[4]) {
  %q = (s32[], f32[4]{0}) parameter(0)
  ROOT %w = (s32[], f32[4]{0}) while(%q), condition=%inner_cond, body=%inner_body, \
backend_config={"dynamic_variables":[],"known_induction_variable":{"tuple_index":"0"},\
"known_init_step":{"init":"0","step":"1"},"known_trip_count":{"n":"3"}}
}

%outer_cond (q: (s32[], f32[4])) -> pred[] {
  %q = (s32[], f32[4]{0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%dynamic_body (d: (s32[], f32[8])) -> (s32[], f32[8]) {
  %d = (s32[], f32[8]{0}) parameter(0)
  %e = f32[8]{0} get-tuple-element(%d), index=1
  %g = f32[16]{0} all-gather(%e), dimensions={0}, replica_groups={}
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %e)
}

ENTRY %main.1 (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %s = f32[10]{0} all-reduce(%a), replica_groups={}, to_apply=%add
  %loop = (s32[], f32[4]{0}) while(%init), condition=%outer_cond, body=%outer_body, \
backend_config={"dynamic_variables":[],"known_induction_variable":{"tuple_index":"0"},\
"known_init_step":{"init":"0","step":"1"},"known_trip_count":{"n":"2"}}
  %dyn = (s32[], f32[8]{0}) while(%init2), condition=%outer_cond, body=%dynamic_body
  ROOT %out = f32[4]{0} get-tuple-element(%loop), index=1
}
"""


def test_runs_are_the_product_of_the_loops_trip_counts():
  found = {(c.opcode, c.computation): c for c in hlo.collectives(MODULE)}
  assert set(found) == {('all-reduce', 'main.1'), ('all-reduce', 'inner_body')}
  entry = found['all-reduce', 'main.1']
  assert (entry.bytes, entry.in_loop, entry.runs) == (40, False, 1)
  inner = found['all-reduce', 'inner_body']  # 4 float32 + 6 bfloat16, 3 × 2 times
  assert (inner.bytes, inner.in_loop, inner.runs) == (28, True, 6)
  assert hlo.all_reduce_bytes_per_update(MODULE) == 40 + 6 * 28


def test_a_loop_without_a_known_trip_count_needs_one():
  (gather,) = hlo.collectives(MODULE, ('all-gather',))
  assert (gather.bytes, gather.in_loop, gather.runs) == (64, True, None)
  with pytest.raises(ValueError, match='unknown_trips'):
    hlo.bytes_per_call(MODULE, ('all-gather',))
  assert hlo.bytes_per_call(MODULE, ('all-gather',), unknown_trips=5) == 5 * 64


def test_instruction_count_is_every_instruction_of_every_computation():
  # By reading: add 3, inner_body 5, inner_cond 2, outer_body 2 (its `while` one
  # instruction over three lines), outer_cond 2, dynamic_body 4, the entry 5.
  assert hlo.instruction_count(MODULE) == 23
