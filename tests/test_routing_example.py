"""Routing by agreement on a case small enough to compute by hand.

Two children, two parents, 1-D capsules, one example:
    u_hat[child 0] = (1, 0),  u_hat[child 1] = (1, 2)   (prediction for parent 0, parent 1)
Iteration 1: b = 0, so c = 1/2 everywhere; s = (1, 1); squash of a 1-D s is s|s|/(1+s^2),
so v = (1/2, 1/2).
Iteration 2: b[i, j] = u_hat[i, j] * v[j] = [[1/2, 0], [1/2, 1]];
c[0] = softmax(1/2, 0) = (sig, 1 - sig) and c[1] = softmax(1/2, 1) = (1 - sig, sig) with
sig = 1 / (1 + e^(-1/2)); s0 = sig + (1 - sig) = 1, so v0 = 1/2 again; s1 = 2 sig and
v1 = s1^2 / (1 + s1^2).
"""

import math

import numpy as np
import pytest

from capsspec import ops

U_HAT = np.array([[[[1.0], [0.0]], [[1.0], [2.0]]]])  # (B=1, N=2, J=2, E=1)
SIG = 1 / (1 + math.exp(-0.5))


def test_one_iteration():
    v, c = ops.routing(U_HAT, 1)
    np.testing.assert_allclose(v[0, :, 0], [0.5, 0.5], rtol=1e-15)
    np.testing.assert_allclose(c[0], [[0.5, 0.5], [0.5, 0.5]], rtol=1e-15)


def test_two_iterations():
    v, c = ops.routing(U_HAT, 2)
    s1 = 2 * SIG
    np.testing.assert_allclose(v[0, :, 0], [0.5, s1 * s1 / (1 + s1 * s1)], rtol=1e-14)
    np.testing.assert_allclose(c[0], [[SIG, 1 - SIG], [1 - SIG, SIG]], rtol=1e-14)


def test_coupling_sums_to_one_over_parents_not_children():
    rng = np.random.default_rng(0)
    u_hat = rng.normal(size=(3, 7, 4, 5))
    _, c = ops.routing(u_hat, 3)
    np.testing.assert_allclose(c.sum(axis=2), 1.0, rtol=1e-13)
    assert not np.allclose(c.sum(axis=1), 1.0)  # a softmax over children would make these 1


def test_logits_are_per_example():
    # Routing of one example must not depend on the others in the batch (docs/spec.md, mistake 7).
    rng = np.random.default_rng(1)
    u_hat = rng.normal(size=(4, 6, 3, 2))
    v_all, c_all = ops.routing(u_hat, 3)
    for n in range(4):
        v_one, c_one = ops.routing(u_hat[n:n + 1], 3)
        np.testing.assert_allclose(v_all[n:n + 1], v_one, rtol=1e-13)
        np.testing.assert_allclose(c_all[n:n + 1], c_one, rtol=1e-13)


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
def test_iterations_change_the_result(iterations):
    # Each extra iteration moves v on this input (docs/spec.md, mistake 8: an ignored setting).
    v_prev, _ = ops.routing(U_HAT, iterations)
    v_next, _ = ops.routing(U_HAT, iterations + 1)
    assert not np.allclose(v_prev, v_next)
