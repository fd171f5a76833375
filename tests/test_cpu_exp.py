"""cpu_exp.exp, the CPU's softmax exponential in split verify attention, against float64."""

import mlx.core as mx
import numpy as np

from ddtree_mlx.models import cpu_exp

ZERO = mx.array(0.0)


def ulps(got: np.ndarray, x: np.ndarray) -> np.ndarray:
    """|got - e ** x| in float32 units in the last place of the true value."""
    want = np.exp(x.astype(np.float64))
    return np.abs(got.astype(np.float64) - want) / np.spacing(want.astype(np.float32)).astype(np.float64)


def test_within_one_ulp_of_float64_wherever_the_result_is_a_normal_float():
    x = np.linspace(-87.3, 88.0, 3_000_001, dtype=np.float32)
    err = ulps(np.array(cpu_exp.exp(mx.array(x), ZERO)), x)
    assert err.max() <= 1.0  # the stated bound: one float32 ulp of e ** x computed in float64


def test_scores_of_any_shape_less_their_row_maximum_and_the_ends_of_the_range():
    """Compiled shapeless, one kernel serves every shape (a verify's scores grow a column per token) and takes
    each row's shift; a masked score (-inf), and whatever would be subnormal, is 0."""
    rng = np.random.default_rng(0)
    for shape in [(3, 24, 6000), (3, 24, 6001), (1, 7), (2, 1, 9, 5)]:
        x = (rng.normal(size=shape) * 8).astype(np.float32)
        peak = x.max(axis=-1, keepdims=True)
        assert ulps(np.array(cpu_exp.exp(mx.array(x), mx.array(peak))), x - peak).max() <= 1.0
    ends = np.array(cpu_exp.exp(mx.array([-np.inf, -1e30, -100.0, -88.0, -87.7, 0.0], mx.float32), ZERO))
    assert ends.tolist()[:5] == [0.0] * 5 and ends[-1] == 1.0
