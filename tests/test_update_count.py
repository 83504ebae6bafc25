"""The number of slot updates the real slot-attention layer runs, for every grad mode.

Counted at run time inside `SlotAttention.__call__`: `SlotAttentionStep.__call__` is wrapped so
that every evaluation of the step fires a `jax.debug.callback`, and the count is read after the
forward pass (a plain call, and the forward half of `jax.vjp`, which is what training runs;
the backward pass's own evaluations, e.g. an adjoint solve, are not counted).
The paper's convention (fixed_slots.fixed_point.modes): T = num_iterations; unroll T updates,
neumannK T + K, every other mode T + 1.
"""
import jax
import numpy as np
import pytest
from flax import nnx

from fixed_slots.modules.slot_attention import SlotAttention, SlotAttentionStep

T = 3
EXPECTED = {"unroll": T, "neumann1": T + 1, "neumann2": T + 2, "series2": T + 1,
            "implicit": T + 1, "IN": T + 1, "IB": T + 1, "BN": T + 1, "BB": T + 1}


@pytest.fixture
def step_calls(monkeypatch):
    """A list that gets one entry per run-time evaluation of the slot-attention step."""
    calls = []
    original = SlotAttentionStep.__call__

    def counted(self, slots, k, v):
        # One callback per evaluation of the step on the whole batch (an unbatched operand, so
        # a vmapped solve could not multiply it per example unnoticed: the shape is recorded).
        jax.debug.callback(lambda s: calls.append(np.shape(s)), slots)
        return original(self, slots, k, v)

    monkeypatch.setattr(SlotAttentionStep, "__call__", counted)
    return calls


@pytest.mark.parametrize("grad", list(EXPECTED))
def test_forward_runs_the_papers_number_of_slot_updates(grad, step_calls):
    layer = SlotAttention(8, 8, 16, num_slots=3, num_iterations=T, grad=grad,
                          rngs=nnx.Rngs(0))
    inputs = jax.random.normal(jax.random.key(1), (2, 5, 8))
    key = jax.random.key(2)

    graphdef, params = nnx.split(layer, nnx.Param)

    def slots(params, inputs):
        return nnx.merge(graphdef, params)(inputs, key)[0]

    # jitted (one compilation): the callbacks fire once per step evaluation at run time
    for name, fn in (("call", slots),
                     # the forward half of the differentiated call, what a train step runs
                     ("vjp forward", lambda p, x: jax.vjp(slots, p, x)[0])):
        step_calls.clear()
        jax.block_until_ready(jax.jit(fn)(params, inputs))
        jax.effects_barrier()
        assert {s[0] for s in step_calls} == {2}, step_calls  # whole-batch evaluations
        assert len(step_calls) == EXPECTED[grad], (
            f"{grad}, {name}: {len(step_calls)} step evaluations, expected {EXPECTED[grad]}")
