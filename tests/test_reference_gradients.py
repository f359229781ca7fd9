"""The reference's hand-derived gradients against central finite differences in float64.

This check, not agreement between backends, is what makes the reference the truth. Each VJP
is compared through directional derivatives: for a random cotangent g and direction e,
<vjp(g), e> must equal <g, (f(x + h e) - f(x - h e)) / 2h>. Inputs are drawn by Hypothesis
(shapes and seeds) and include zero vectors, huge and tiny norms and one-example batches.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from capsspec import CapsNetConfig, forward, init_params, loss, ops, value_and_grad
from capsspec.model import decoder_layers

H = 1e-6


def directional_fd(f, args, which, direction, g, h=H):
    """<g, d/dt f(args with args[which] + t*direction)> by central differences."""
    def at(t):
        a = list(args)
        a[which] = args[which] + t * direction
        out = f(*a)
        return sum(np.vdot(gi, oi) for gi, oi in zip(g, out)) if isinstance(out, tuple) else np.vdot(g, out)
    return (at(h) - at(-h)) / (2 * h)


def assert_close_fd(analytic, numeric, scale=1.0, rtol=1e-6, atol=1e-8):
    assert np.isfinite(analytic), analytic
    assert abs(analytic - numeric) <= atol * scale + rtol * max(abs(analytic), abs(numeric)), (analytic, numeric)


seeds = st.integers(0, 2**32 - 1)


@given(seed=seeds, b=st.integers(1, 3), c=st.integers(1, 3), o=st.integers(1, 4), k=st.integers(1, 4),
       extra=st.integers(0, 4), stride=st.integers(1, 3))
def test_conv2d_vjp(seed, b, c, o, k, extra, stride):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, c, k + extra, k + extra + 1))
    w, bias = rng.normal(size=(o, c, k, k)), rng.normal(size=(o,))
    y = ops.conv2d(x, w, bias, stride)
    g = rng.normal(size=y.shape)
    grads = ops.conv2d_vjp(g, x, w, bias, stride)
    for i, a in enumerate((x, w, bias)):
        e = rng.normal(size=a.shape)
        num = directional_fd(lambda *z: ops.conv2d(*z, stride), (x, w, bias), i, e, g)
        assert_close_fd(np.vdot(grads[i], e), num)


def test_conv2d_matches_direct_sum():
    # An independent definition: the textbook cross-correlation written as explicit sums.
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(2, 3, 7, 6)), rng.normal(size=(4, 3, 3, 2)), rng.normal(size=(4,))
    y = ops.conv2d(x, w, b, 2)
    ho, wo = (7 - 3) // 2 + 1, (6 - 2) // 2 + 1
    assert y.shape == (2, 4, ho, wo)
    for n in range(2):
        for oc in range(4):
            for i in range(ho):
                for j in range(wo):
                    patch = x[n, :, 2 * i:2 * i + 3, 2 * j:2 * j + 2]
                    assert np.isclose(y[n, oc, i, j], np.sum(patch * w[oc]) + b[oc])


norm_scales = st.sampled_from([0.0, 1e-150, 1e-3, 0.5, 1.0, 3.0, 1e4, 1e100])


@given(seed=seeds, shape=st.sampled_from([(1, 1), (3, 2), (2, 5, 4), (1, 3, 8)]), scale=norm_scales)
def test_squash_vjp(seed, shape, scale):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=shape) * scale
    g = rng.normal(size=shape)
    (gs,) = ops.squash_vjp(g, s)
    assert np.all(np.isfinite(gs))
    e = rng.normal(size=shape)
    # At s = 0 the central difference of an O(|s|^2) function is O(h) itself: use a tiny step.
    h = H * max(scale, 1e-3) if scale > 0 else 1e-10
    num = directional_fd(ops.squash, (s,), 0, e, g, h=h)
    # Near the origin and far out the gradient is tiny; compare absolutely there.
    assert_close_fd(np.vdot(gs, e), num, atol=1e-7)


def test_squash_value_at_known_points():
    # |v| = n^2 / (1 + n^2), in the direction of s.
    s = np.array([[3.0, 4.0], [0.0, 0.0], [1e150, 0.0]])  # |s|^2 = 1e300, still finite
    v = ops.squash(s)
    np.testing.assert_allclose(v[0], np.array([3.0, 4.0]) / 5 * (25 / 26), rtol=1e-15)
    assert np.all(v[1] == 0)
    np.testing.assert_allclose(v[2], [1.0, 0.0], rtol=1e-15)
    (g0,) = ops.squash_vjp(np.ones_like(s), s)
    assert np.all(g0[1] == 0) and np.all(np.isfinite(g0))


@given(seed=seeds, b=st.integers(1, 3), types=st.integers(1, 3), dim=st.integers(1, 4), k=st.integers(1, 3),
       stride=st.integers(1, 2), c=st.integers(1, 3))
def test_primary_capsules_vjp(seed, b, types, dim, k, stride, c):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(b, c, k + 3, k + 2))
    w, bias = rng.normal(size=(types * dim, c, k, k)), rng.normal(size=(types * dim,))
    u = ops.primary_capsules(h, w, bias, dim, stride)
    g = rng.normal(size=u.shape)
    grads = ops.primary_capsules_vjp(g, h, w, bias, dim, stride)
    for i, a in enumerate((h, w, bias)):
        e = rng.normal(size=a.shape)
        num = directional_fd(lambda *z: ops.primary_capsules(*z, dim, stride), (h, w, bias), i, e, g)
        assert_close_fd(np.vdot(grads[i], e), num)


def test_primary_capsule_order_moves_channels_last():
    # Capsule i = (t*Gh + y)*Gw + x, dim d = conv channel t*D + d (docs/spec.md, mistake 3).
    rng = np.random.default_rng(1)
    types, dim = 3, 2
    h = rng.normal(size=(2, 2, 6, 5))
    w, b = rng.normal(size=(types * dim, 2, 2, 2)), rng.normal(size=(types * dim,))
    a = ops.conv2d(h, w, b, 1)  # (2, 6, 5, 4)
    u = ops.primary_capsules(h, w, b, dim, 1)
    gh, gw = a.shape[2:]
    for t in range(types):
        for y in range(gh):
            for x in range(gw):
                np.testing.assert_allclose(u[:, (t * gh + y) * gw + x], ops.squash(a[:, t * dim:(t + 1) * dim, y, x]))


@given(seed=seeds, b=st.integers(1, 3), n=st.integers(1, 5), j=st.integers(2, 4), e=st.integers(1, 4), d=st.integers(1, 4))
def test_predictions_vjp(seed, b, n, j, e, d):
    rng = np.random.default_rng(seed)
    u, w = rng.normal(size=(b, n, d)), rng.normal(size=(n, j, e, d))
    uh = ops.predictions(u, w)
    np.testing.assert_allclose(uh, np.einsum("ijed,bid->bije", w, u), rtol=1e-12, atol=1e-12)
    g = rng.normal(size=uh.shape)
    grads = ops.predictions_vjp(g, u, w)
    for i, a in enumerate((u, w)):
        dirn = rng.normal(size=a.shape)
        assert_close_fd(np.vdot(grads[i], dirn), directional_fd(ops.predictions, (u, w), i, dirn, g))


@given(seed=seeds, b=st.integers(1, 3), n=st.integers(1, 6), j=st.integers(2, 5), e=st.integers(1, 4),
       iterations=st.integers(1, 5), scale=st.sampled_from([0.0, 1e-3, 0.3, 1.0, 5.0]), with_gc=st.booleans(),
       nota=st.booleans())
def test_routing_vjp(seed, b, n, j, e, iterations, scale, with_gc, nota):
    rng = np.random.default_rng(seed)
    u_hat = rng.normal(size=(b, n, j, e)) * scale
    v, c = ops.routing(u_hat, iterations, nota)
    gv = rng.normal(size=v.shape)
    gc = rng.normal(size=c.shape) if with_gc else None
    (gu,) = ops.routing_vjp((gv, gc), u_hat, iterations, nota)
    assert np.all(np.isfinite(gu))
    dirn = rng.normal(size=u_hat.shape)
    h = H if scale > 0 else 1e-10  # squash is O(|s|^2) at 0, so the difference itself is O(h) there
    if with_gc:
        num = directional_fd(lambda z: ops.routing(z, iterations, nota), (u_hat,), 0, dirn, (gv, gc), h=h)
    else:
        num = directional_fd(lambda z: ops.routing(z, iterations, nota)[0], (u_hat,), 0, dirn, gv, h=h)
    assert_close_fd(np.vdot(gu, dirn), num, atol=1e-7)


def test_none_of_the_above_coupling():
    """With none_of_the_above the first iteration's c is 1/(J+1), not 1/J (the extra logit is 0 like the
    others), later ones are exp(b_ij) / (1 + sum_k exp(b_ik)) written out here by hand, and huge logits
    of either sign give finite coefficients (the shift counts the 0 logit)."""
    rng = np.random.default_rng(3)
    u_hat = rng.normal(size=(2, 5, 4, 3))
    _, c1 = ops.routing(u_hat, 1, True)
    np.testing.assert_array_equal(c1, np.full((2, 5, 4), 1 / 5))
    v1, _ = ops.routing(u_hat, 1, True)
    b = np.einsum("bije,bje->bij", u_hat, v1)  # the logits after one update, from their definition
    expected = np.exp(b) / (1 + np.exp(b).sum(axis=2, keepdims=True))
    np.testing.assert_allclose(ops.routing(u_hat, 2, True)[1], expected, rtol=1e-12)
    for big in (1e4, -1e4):
        _, c = ops.routing(np.full((1, 2, 3, 2), big), 3, True)
        assert np.all(np.isfinite(c)) and np.all(c.sum(axis=2) <= 1 + 1e-12)


@given(seed=seeds, b=st.integers(1, 4), j=st.integers(2, 6), e=st.integers(1, 5), zero_rows=st.booleans())
def test_capsule_lengths_vjp(seed, b, j, e, zero_rows):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(b, j, e))
    if zero_rows:
        v[:, 0] = 0
    g = rng.normal(size=(b, j))
    (gv,) = ops.capsule_lengths_vjp(g, v)
    if zero_rows:
        assert np.all(gv[:, 0] == 0)
        v[:, 0] = rng.normal(size=(b, e))  # away from the kink for the FD comparison below
        (gv,) = ops.capsule_lengths_vjp(g, v)
    dirn = rng.normal(size=v.shape)
    assert_close_fd(np.vdot(gv, dirn), directional_fd(ops.capsule_lengths, (v,), 0, dirn, g))


@given(seed=seeds, b=st.integers(1, 5), j=st.integers(2, 12))
def test_margin_loss_vjp(seed, b, j):
    rng = np.random.default_rng(seed)
    lengths = rng.uniform(0, 1, size=(b, j))
    labels = rng.integers(0, j, size=b)
    (gl,) = ops.margin_loss_vjp(np.float64(1.0), lengths, labels)
    dirn = rng.normal(size=lengths.shape)
    num = directional_fd(lambda z: ops.margin_loss(z, labels), (lengths,), 0, dirn, np.float64(1.0))
    assert_close_fd(np.vdot(gl, dirn), num)


def test_margin_loss_hand_values():
    # One example, 3 classes, true class 1: T max(0, .9 - L)^2 + .5 (1 - T) max(0, L - .1)^2.
    lengths = np.array([[0.5, 0.6, 0.05]])
    expected = 0.5 * 0.4**2 + 0.3**2 + 0.0
    np.testing.assert_allclose(ops.margin_loss(lengths, np.array([1])), expected, rtol=1e-14)
    # Averaged over the batch, summed over classes.
    two = np.array([[0.5, 0.6, 0.05], [0.95, 0.0, 0.0]])
    np.testing.assert_allclose(ops.margin_loss(two, np.array([1, 0])), expected / 2, rtol=1e-14)


@given(seed=seeds, b=st.integers(1, 4), j=st.integers(2, 5), e=st.integers(1, 4), by_label=st.booleans())
def test_mask_vjp(seed, b, j, e, by_label):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(b, j, e))
    labels = rng.integers(0, j, size=b) if by_label else None
    m = ops.mask(v, labels)
    keep = labels if by_label else np.argmax(np.linalg.norm(v, axis=-1), axis=1)
    for n in range(b):
        expect = np.zeros((j, e))
        expect[keep[n]] = v[n, keep[n]]
        np.testing.assert_array_equal(m[n], expect.reshape(-1))
    g = rng.normal(size=m.shape)
    (gv,) = ops.mask_vjp(g, v, labels)
    dirn = rng.normal(size=v.shape)
    assert_close_fd(np.vdot(gv, dirn), directional_fd(lambda z: ops.mask(z, labels), (v,), 0, dirn, g))


@given(seed=seeds, b=st.integers(1, 3), widths=st.lists(st.integers(1, 6), min_size=2, max_size=4))
def test_decoder_vjp(seed, b, widths):
    rng = np.random.default_rng(seed)
    ws = [rng.normal(size=(widths[k + 1], widths[k])) for k in range(len(widths) - 1)]
    bs = [rng.normal(size=(widths[k + 1],)) for k in range(len(widths) - 1)]
    x = rng.normal(size=(b, widths[0]))
    y = ops.decoder(x, ws, bs)
    assert np.all((y > 0) & (y < 1))
    g = rng.normal(size=y.shape)
    gx, gws, gbs = ops.decoder_vjp(g, x, ws, bs)
    dirn = rng.normal(size=x.shape)
    assert_close_fd(np.vdot(gx, dirn), directional_fd(lambda z: ops.decoder(z, ws, bs), (x,), 0, dirn, g))
    for k in range(len(ws)):
        for grads, arrays in ((gws, ws), (gbs, bs)):
            dirn = rng.normal(size=arrays[k].shape)

            def f(a, k=k, arrays=arrays):
                changed = list(arrays)
                changed[k] = a
                return ops.decoder(x, changed, bs) if arrays is ws else ops.decoder(x, ws, changed)
            assert_close_fd(np.vdot(grads[k], dirn), directional_fd(f, (arrays[k],), 0, dirn, g))


@given(seed=seeds, b=st.integers(1, 4))
def test_reconstruction_loss_vjp(seed, b):
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(b, 2, 3, 4))
    recon = rng.uniform(size=(b, 24))
    expected = 0.0005 * np.mean(np.sum((recon - images.reshape(b, -1)) ** 2, axis=1))
    np.testing.assert_allclose(ops.reconstruction_loss(recon, images), expected, rtol=1e-14)
    (gr,) = ops.reconstruction_loss_vjp(np.float64(1.0), recon, images)
    dirn = rng.normal(size=recon.shape)
    num = directional_fd(lambda z: ops.reconstruction_loss(z, images), (recon,), 0, dirn, np.float64(1.0))
    assert_close_fd(np.vdot(gr, dirn), num, atol=1e-10)


# ------------------------------------------------------------------------------ whole model
# Each size a drawn config may take, as an inclusive range: small enough for finite differences.
SIZE_RANGES = {
    "input_channels": (1, 2), "input_height": (7, 10), "input_width": (7, 10), "conv1_channels": (1, 4),
    "conv1_kernel": (2, 3), "primary_types": (1, 3), "primary_dim": (1, 4), "primary_kernel": (2, 3),
    "primary_stride": (1, 2), "num_classes": (2, 5), "class_dim": (1, 4), "routing_iterations": (1, 4),
}
configs = st.builds(
    CapsNetConfig,
    **{name: st.integers(lo, hi) for name, (lo, hi) in SIZE_RANGES.items()},
    use_decoder=st.booleans(), none_of_the_above=st.booleans(),
    decoder_widths=st.lists(st.integers(1, 6), min_size=0, max_size=2).map(tuple),
)


@pytest.mark.slow
@given(config=configs, seed=seeds, batch=st.integers(1, 3), digit_scale=st.sampled_from([1.0, 30.0]))
def test_model_value_and_grad(config, seed, batch, digit_scale):
    rng = np.random.default_rng(seed)
    params = init_params(config, seed % 1000, "float64")
    # Larger class-capsule weights make routing decisive, exercising its gradients fully.
    params["digit.weight"] = params["digit.weight"] * digit_scale
    x = rng.uniform(size=(batch, *config.input_shape))
    labels = rng.integers(0, config.num_classes, size=batch)
    total, grads = value_and_grad(params, x, labels, config)
    np.testing.assert_allclose(total, loss(params, x, labels, config).total, rtol=1e-14)
    assert list(grads) == list(params)
    for name in params:
        assert grads[name].shape == params[name].shape and grads[name].dtype == np.float64
        dirn = rng.normal(size=params[name].shape)

        def f(p, name=name):
            changed = dict(params)
            changed[name] = p
            return loss(changed, x, labels, config).total
        num = directional_fd(f, (params[name],), 0, dirn, np.float64(1.0))
        assert_close_fd(np.vdot(grads[name], dirn), num, rtol=1e-5, atol=1e-9), name


def test_model_value_and_grad_on_zero_images():
    # All-zero images: conv1 may produce zeros and primary capsules then sit at s = 0.
    config = CapsNetConfig(input_height=8, input_width=8, conv1_channels=3, conv1_kernel=3, primary_types=2,
                           primary_dim=3, primary_kernel=3, num_classes=3, class_dim=2, decoder_widths=(4,))
    params = init_params(config, 0, "float64")
    params["conv1.bias"][:] = -1.0  # ReLU kills everything: the primary conv sees zeros
    params["primary.bias"][:] = 0.0
    x = np.zeros((2, 1, 8, 8))
    total, grads = value_and_grad(params, x, np.array([0, 2]), config)
    assert np.isfinite(total)
    assert all(np.all(np.isfinite(g)) for g in grads.values())
    assert np.all(grads["digit.weight"] == 0)  # u = 0, so u_hat = 0 whatever the weights


def test_float32_matches_float64():
    config = CapsNetConfig(input_height=12, input_width=12, conv1_channels=8, conv1_kernel=5, primary_types=4,
                           primary_dim=4, primary_kernel=3, num_classes=4, class_dim=6, decoder_widths=(16,))
    p64 = init_params(config, 3, "float64")
    p32 = init_params(config, 3, "float32")
    x = np.random.default_rng(0).uniform(size=(3, 1, 12, 12))
    labels = np.array([0, 1, 3])
    t64, g64 = value_and_grad(p64, x, labels, config)
    t32, g32 = value_and_grad(p32, x.astype(np.float32), labels, config)
    assert t32.dtype == np.float32 and all(g.dtype == np.float32 for g in g32.values())
    np.testing.assert_allclose(t32, t64, rtol=1e-5)
    for k in g64:
        np.testing.assert_allclose(g32[k], g64[k], rtol=1e-3, atol=1e-6 * np.abs(g64[k]).max())


# ------------------------------------------------------------------------------ two digits per image (MultiMNIST)
def distinct_labels(rng, b, j, k):
    """(b, k) labels with k distinct classes of j per row."""
    return np.argsort(rng.random((b, j)), axis=1)[:, :k]


@given(seed=seeds, b=st.integers(1, 5), j=st.integers(2, 12), k=st.integers(1, 2))
def test_margin_loss_vjp_with_several_classes_per_example(seed, b, j, k):
    rng = np.random.default_rng(seed)
    lengths = rng.uniform(0, 1, size=(b, j))
    labels = distinct_labels(rng, b, j, k)
    (gl,) = ops.margin_loss_vjp(np.float64(1.0), lengths, labels)
    dirn = rng.normal(size=lengths.shape)
    num = directional_fd(lambda z: ops.margin_loss(z, labels), (lengths,), 0, dirn, np.float64(1.0))
    assert_close_fd(np.vdot(gl, dirn), num)
    if k == 1:  # a (B, 1) row is the (B,) label
        assert ops.margin_loss(lengths, labels) == ops.margin_loss(lengths, labels[:, 0])


def test_margin_loss_hand_values_with_two_classes():
    # Classes 1 and 2 present: .9 - L for both, the absent class 0 pays .5 (L - .1)^2.
    lengths = np.array([[0.5, 0.6, 0.05]])
    expected = 0.5 * 0.4**2 + 0.3**2 + 0.85**2
    np.testing.assert_allclose(ops.margin_loss(lengths, np.array([[1, 2]])), expected, rtol=1e-14)
    np.testing.assert_allclose(ops.margin_loss(lengths, np.array([[2, 1]])), expected, rtol=1e-14)  # order is free


@given(seed=seeds, b=st.integers(1, 4), j=st.integers(2, 5), e=st.integers(1, 4), k=st.integers(1, 2))
def test_mask_vjp_with_several_classes_per_example(seed, b, j, e, k):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(b, j, e))
    labels = distinct_labels(rng, b, j, k)
    m = ops.mask(v, labels)
    assert m.shape == (b, k, j * e)
    for n in range(b):
        for r in range(k):
            expect = np.zeros((j, e))
            expect[labels[n, r]] = v[n, labels[n, r]]
            np.testing.assert_array_equal(m[n, r], expect.reshape(-1))
    g = rng.normal(size=m.shape)
    (gv,) = ops.mask_vjp(g, v, labels)
    dirn = rng.normal(size=v.shape)
    assert_close_fd(np.vdot(gv, dirn), directional_fd(lambda z: ops.mask(z, labels), (v,), 0, dirn, g))


@given(seed=seeds, lead=st.sampled_from([(1, 1), (2, 2), (3, 1, 2)]), widths=st.lists(st.integers(1, 5), min_size=2,
                                                                                     max_size=3))
def test_decoder_vjp_with_leading_dims(seed, lead, widths):
    rng = np.random.default_rng(seed)
    ws = [rng.normal(size=(widths[k + 1], widths[k])) for k in range(len(widths) - 1)]
    bs = [rng.normal(size=(widths[k + 1],)) for k in range(len(widths) - 1)]
    x = rng.normal(size=(*lead, widths[0]))
    y = ops.decoder(x, ws, bs)
    # The same MLP on every row: the 2-D decoder on the rows, reshaped back.
    np.testing.assert_array_equal(y, ops.decoder(x.reshape(-1, widths[0]), ws, bs).reshape(*lead, -1))
    g = rng.normal(size=y.shape)
    gx, gws, gbs = ops.decoder_vjp(g, x, ws, bs)
    assert gx.shape == x.shape
    dirn = rng.normal(size=x.shape)
    assert_close_fd(np.vdot(gx, dirn), directional_fd(lambda z: ops.decoder(z, ws, bs), (x,), 0, dirn, g))
    for k in range(len(ws)):
        dirn = rng.normal(size=ws[k].shape)

        def f(a, k=k):
            changed = list(ws)
            changed[k] = a
            return ops.decoder(x, changed, bs)
        assert_close_fd(np.vdot(gws[k], dirn), directional_fd(f, (ws[k],), 0, dirn, g))
        dirn = rng.normal(size=bs[k].shape)

        def fb(a, k=k):
            changed = list(bs)
            changed[k] = a
            return ops.decoder(x, ws, changed)
        assert_close_fd(np.vdot(gbs[k], dirn), directional_fd(fb, (bs[k],), 0, dirn, g))


@given(seed=seeds, b=st.integers(1, 4), k=st.integers(1, 3))
def test_reconstruction_loss_vjp_with_several_digits(seed, b, k):
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(b, k, 2, 3, 4))
    recon = rng.uniform(size=(b, k, 24))
    # Each digit's squared error summed, the K digits' sums added, averaged over the batch.
    per_example = sum(np.sum((recon[:, r] - images[:, r].reshape(b, -1)) ** 2, axis=1) for r in range(k))
    np.testing.assert_allclose(ops.reconstruction_loss(recon, images), 0.0005 * np.mean(per_example), rtol=1e-14)
    (gr,) = ops.reconstruction_loss_vjp(np.float64(1.0), recon, images)
    dirn = rng.normal(size=recon.shape)
    num = directional_fd(lambda z: ops.reconstruction_loss(z, images), (recon,), 0, dirn, np.float64(1.0))
    assert_close_fd(np.vdot(gr, dirn), num, atol=1e-10)


@settings(max_examples=6)
@given(config=configs, seed=seeds, batch=st.integers(1, 3), digit_scale=st.sampled_from([1.0, 30.0]))
def test_model_value_and_grad_with_two_digits(config, seed, batch, digit_scale):
    rng = np.random.default_rng(seed)
    params = init_params(config, seed % 1000, "float64")
    params["digit.weight"] = params["digit.weight"] * digit_scale
    x = rng.uniform(size=(batch, *config.input_shape))
    labels = distinct_labels(rng, batch, config.num_classes, 2)
    targets = rng.uniform(size=(batch, 2, *config.input_shape))
    total, grads = value_and_grad(params, x, labels, config, targets)
    parts = loss(params, x, labels, config, targets)
    np.testing.assert_allclose(total, parts.total, rtol=1e-14)
    if config.use_decoder:
        # The reconstruction term is the two digits' terms, each decoded from its own class's capsule.
        out = forward(params, x, config, labels)
        assert out.reconstruction.shape == (batch, 2, int(np.prod(config.input_shape)))
        ws, bs = decoder_layers(params, config)
        each = [ops.reconstruction_loss(ops.decoder(ops.mask(out.v, labels[:, r]), ws, bs), targets[:, r],
                                        config.reconstruction_scale) for r in range(2)]
        np.testing.assert_allclose(parts.reconstruction, each[0] + each[1], rtol=1e-12)
    for name in params:
        dirn = rng.normal(size=params[name].shape)

        def f(p, name=name):
            changed = dict(params)
            changed[name] = p
            return loss(changed, x, labels, config, targets).total
        num = directional_fd(f, (params[name],), 0, dirn, np.float64(1.0))
        assert_close_fd(np.vdot(grads[name], dirn), num, rtol=1e-5, atol=1e-9), name


def test_train_step_counts_an_example_correct_only_when_both_classes_are_the_two_longest():
    from capsspec.optim import count_correct

    lengths = np.array([[0.9, 0.8, 0.1], [0.9, 0.1, 0.8], [0.5, 0.5, 0.5]])
    labels = np.array([[1, 0], [0, 1], [0, 1]])
    # Row 0: {0, 1} right in either order; row 1: class 1 is third; row 2: ties go to the lowest indices.
    assert count_correct(lengths, labels) == 2
    assert count_correct(lengths, np.array([0, 0, 0])) == 3
