"""Property-based test: random shapes, axes, scales and offsets against the
float64 reference (outputs, gradients and state), on every path.

Bounded (a few dozen examples, no deadline: eager calls and first traces
vary in time) and derandomized, so CI runs the same examples every time.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from batch_renorm import BatchRenormalization
from layer_cases import PATHS
from layer_cases import init_layer
from layer_cases import reference_for
from layer_cases import to_numpy
from layer_cases import train_call_with_grads


def assert_scaled(actual, expected, rtol, err_msg, scale=0.0):
    """Agreement to `rtol` of the largest expected magnitude (or of `scale`,
    where larger): the tolerance follows the inputs' scale, 1e-3 to 1e3."""
    actual = np.asarray(to_numpy(actual), np.float64)
    expected = np.asarray(expected, np.float64)
    assert np.all(np.isfinite(actual)), err_msg
    scale = max(scale, float(np.max(np.abs(expected), initial=0.0)))
    atol = rtol * scale + 1e-30
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol,
                               err_msg=err_msg)


@st.composite
def cases(draw):
    rank = draw(st.integers(2, 5))
    shape = draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank))
    axis = draw(st.integers(-rank, rank - 1))
    shape[axis] = draw(st.integers(1, 3))
    # The channels-last rank-4 case, where the fused kernels apply, often.
    if draw(st.booleans()):
        rank, axis = 4, -1
        shape = shape[:1] + draw(st.lists(st.integers(1, 4), min_size=3,
                                          max_size=3))
    scale = 10.0 ** draw(st.floats(-3, 3))
    # Offsets up to 100 times the spread: up to 4 of float32's 7 digits
    # lost to cancellation in a one-read variance.
    offset = scale * draw(st.floats(-100, 100))
    return dict(shape=tuple(shape), axis=axis, scale=scale, offset=offset,
                fused=draw(st.sampled_from(PATHS)),
                # Both formulations of the portable path's statistics.
                one_read=draw(st.booleans()),
                bounds=draw(st.sampled_from([(1.5, 0.5), (1.0, 0.0),
                                             (100.0, 100.0)])),
                seed=draw(st.integers(0, 2**31)))


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=30, deadline=None, derandomize=True)
@given(cases())
def test_matches_the_float64_reference(case):
    rng = np.random.default_rng(case["seed"])
    shape, axis = case["shape"], case["axis"]
    r_max, d_max = case["bounds"]
    layer = BatchRenormalization(
        axis=axis, momentum=0.7, fused=case["fused"], r_max=r_max,
        d_max=d_max, warmup_steps=0, r_max_steps=0, d_max_steps=0)
    layer._one_read = case["one_read"]
    ref = reference_for(layer, init_layer(layer, shape, rng))
    x = (case["offset"] + case["scale"] * rng.normal(size=shape))
    x = x.astype("float32")
    w = rng.normal(size=shape).astype("float32")
    for step in range(2):
        y, dx, grads = train_call_with_grads(layer, x, w)
        expected = ref.train(x, g_y=w)
        msg = f"step {step}, {case}"
        # y = x * a + b rounds |x * a| in float32 (as BatchNormalization's
        # affine form does), more than |y| where the offset is large.
        a = ref.gamma * expected["r"] / expected["stddev"]
        rounding = float(np.max(np.abs(x))) * float(np.max(np.abs(a)))
        assert_scaled(y, expected["y"], 1e-4, "y " + msg, scale=rounding)
        # dx is a difference of terms of the size of |w * a| (small where
        # they cancel, as with two values per channel).
        terms = float(np.max(np.abs(w))) * float(np.max(np.abs(a)))
        assert_scaled(dx, expected["dx"], 1e-3, "dx " + msg, scale=terms)
        assert_scaled(grads["gamma"], expected["dgamma"], 1e-3,
                      "dgamma " + msg)
        assert_scaled(grads["beta"], expected["dbeta"], 1e-5, "dbeta " + msg)
        assert_scaled(layer.moving_mean, ref.moving_mean, 1e-5, "mean " + msg)
        assert_scaled(layer.moving_stddev, ref.moving_stddev, 1e-4,
                      "stddev " + msg)
