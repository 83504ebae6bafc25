"""The examples in examples/ run, with tiny sizes, and reach what they claim."""
import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deq_mlp_learns_the_spirals_through_the_implicit_gradient():
    deq = load("deq_mlp")
    tiny = dict(steps=120, num_points=256, quiet=True)
    result = deq.main(**tiny)
    assert result["grad"] == "implicit"
    assert result["test_accuracy"] > 0.85, result
    assert result["mean_residual"] < 1e-3, result  # the forward solve converges (tol 1e-4)
    assert 1 <= result["mean_steps"] <= 40, result
    # The probe: the adjoint solve's residual (adjoint_tol 1e-5 per example) and no failures.
    assert result["mean_adjoint_residual"] < 1e-3 and result["failed_adjoint_solves"] == 0, result
    # The threshold is meaningful: with no gradient reaching the fixed point (only the readout
    # trains) the same budget stays far below it (about 0.6 on this seed).
    baseline = deq.main(freeze_cell=True, **tiny)
    assert baseline["test_accuracy"] < 0.75, baseline


def test_deq_mlp_parses_argv():
    deq = load("deq_mlp")
    result = deq.main(["--steps", "2", "--grad", "IN", "--num_points", "64"], quiet=True)
    assert result["grad"] == "IN" and 0.0 <= result["test_accuracy"] <= 1.0


def test_flax_usage_gradients_agree_with_unroll_in_both_apis():
    result = load("flax_usage").main(quiet=True)
    for key in ("nnx_implicit_vs_unroll", "nnx_series30_vs_unroll", "linen_implicit_vs_unroll",
                "linen_series30_vs_unroll"):
        assert result[key] < 1e-4, (key, result)
    assert result["nnx_vs_linen_implicit"] < 1e-6, result
    # The 1-step estimator is an approximation, not the exact gradient.
    assert result["nnx_neumann1_vs_unroll"] > 1e-3, result


def test_pytree_state_example():
    result = load("pytree_state").main(quiet=True)
    assert result["state_shapes"] == {"h": (8,), "m": (2, 3)}
    assert result["final_residual"] < 1e-6 and result["steps"] < 30
    assert result["spectral_norm"] == pytest.approx(result["spectral_norm_dense"], rel=1e-3)
    assert result["grad_rel_error_vs_dense_ift"] < 1e-4
    assert result["aux_h_norm"] > 0
