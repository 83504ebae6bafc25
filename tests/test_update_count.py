"""The number of slot updates the real slot-attention layer runs, for every grad mode.

Counted at run time inside `SlotAttention.__call__`: `SlotAttentionStep.__call__` is wrapped so
that every evaluation of the step fires a `jax.debug.callback`, and the count is read after the
forward pass (a plain call, and the forward half of `jax.vjp`, which is what training runs;
the backward pass's own evaluations, e.g. an adjoint solve, are not counted).
The paper's convention (fixed_slots.fixed_point.modes): T = num_iterations; unroll T updates,
neumannK T + K, every other mode T + 1. The train step hands the adjoint modes a probe (the
custom_vjp path, `models.common.reports_adjoint`): exactly that count. Without a probe the
layer's forward-mode-capable path also linearises the step at the solution in the forward half
(one evaluation for the parameters' tangent, one for J; Series(1) only the first): counted
separately, so that the updates themselves stay the paper's.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fixed_slots.modules.slot_attention import SlotAttention, SlotAttentionStep

T = 3
EXPECTED = {"unroll": T, "neumann1": T + 1, "neumann2": T + 2, "series2": T + 1,
            "implicit": T + 1, "IN": T + 1, "IB": T + 1, "BN": T + 1, "BB": T + 1}
# Modes whose backward pass solves or sums an adjoint: the train step gives them a probe.
ADJOINT = {"series2", "implicit", "IB", "BN", "BB"}
# Without a probe: the linearisation at the solution (BN's Series(1) needs f_w only).
LINEARISATION = {"series2": 2, "implicit": 2, "IB": 2, "BN": 1, "BB": 2}


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

    probe = jnp.zeros((2, 3)) if grad in ADJOINT else None

    def slots(params, inputs, probe=probe):
        return nnx.merge(graphdef, params)(inputs, key, adjoint_probe=probe)[0]

    # jitted (one compilation): the callbacks fire once per step evaluation at run time
    cases = [("call", slots, EXPECTED[grad]),
             # the forward half of the differentiated call, what a train step runs
             ("vjp forward", lambda p, x: jax.vjp(slots, p, x)[0], EXPECTED[grad])]
    if grad in ADJOINT:
        cases.append(("vjp forward without a probe",
                      lambda p, x: jax.vjp(lambda p, x: slots(p, x, None), p, x)[0],
                      EXPECTED[grad] + LINEARISATION[grad]))
    for name, fn, expected in cases:
        step_calls.clear()
        jax.block_until_ready(jax.jit(fn)(params, inputs))
        jax.effects_barrier()
        assert {s[0] for s in step_calls} == {2}, step_calls  # whole-batch evaluations
        assert len(step_calls) == expected, (
            f"{grad}, {name}: {len(step_calls)} step evaluations, expected {expected}")
