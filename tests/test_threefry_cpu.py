"""The CPU lowering of threefry2x32 that fixed_slots installs draws JAX's own bits."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

import fixed_slots.modules  # noqa: F401  (installs the lowering)
from fixed_slots.modules import threefry_cpu
from helpers import ROOT

# Random123's known-answer vectors for Threefry-2x32, 20 rounds: (key, counter) -> output.
KAT = [((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6b200159, 0x99ba4efe)),
       ((0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff), (0x1cb996fc, 0xbb002be7)),
       ((0x13198a2e, 0x03707344), (0x243f6a88, 0x85a308d3), (0xc4923a9c, 0x483df7a0))]

# Draws through every path a model uses: split, fold_in, bits of several widths, bernoulli,
# exponential, normal; printed as JSON so that a fresh interpreter can compute them too.
DRAWS = """
import json, jax, jax.numpy as jnp, numpy as np
def draws():
    ks = jax.random.split(jax.random.fold_in(jax.random.key(7), 3), 6)
    return [jax.random.bits(ks[0], (1001,)), jax.random.bits(ks[1], (4, 6, 8), jnp.uint16),
            jax.random.bits(ks[2], (3, 5), jnp.uint8), jax.random.bernoulli(ks[3], 0.9, (257,)),
            jax.random.exponential(ks[4], (2, 9)), jax.random.normal(ks[5], (3, 5)),
            jax.random.key_data(jax.random.split(ks[0], 7))]
print(json.dumps([np.asarray(x).astype(np.float64).ravel().tolist() for x in jax.jit(draws)()]))
"""


def test_known_answer_vectors_through_the_installed_lowering():
    assert jax.default_backend() == "cpu"
    u32 = lambda *v: jnp.asarray(np.array(v, np.uint32))
    keys, counters, expected = zip(*KAT)
    out = jax.jit(lambda *a: threefry2x32_p.bind(*a))(
        u32(*[k[0] for k in keys]), u32(*[k[1] for k in keys]),
        u32(*[c[0] for c in counters]), u32(*[c[1] for c in counters]))
    np.testing.assert_array_equal(np.stack([np.asarray(o) for o in out], 1), np.array(expected))
    # The function itself, outside any lowering.
    np.testing.assert_array_equal(
        np.stack(threefry_cpu.threefry2x32(*(np.array(x, np.uint32) for x in zip(*keys)),
                                           *(np.array(x, np.uint32) for x in zip(*counters))), 1),
        np.array(expected))


def test_same_bits_as_jax_rolled_lowering_and_no_loop_left():
    namespace = {}
    exec(DRAWS.replace("print(", "result = ("), namespace)  # here: the installed lowering
    ours = namespace["result"]
    # A fresh interpreter that never imports fixed_slots: JAX's own (rolled) CPU lowering,
    # under the same XLA settings (the float transforms of the bits compile alike).
    proc = subprocess.run([sys.executable, "-c", DRAWS], cwd=ROOT, capture_output=True,
                          text=True, check=True, env=dict(os.environ))
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == json.loads(ours)
    hlo = jax.jit(lambda k: jax.random.bits(k, (64,))).lower(jax.random.key(0)).compile()
    assert "while" not in hlo.as_text()
