"""Bad input gets a ValueError that names the argument, what was expected and what came."""

import numpy as np
import pytest

from capsspec import AdamConfig, CapsNetConfig, adam_init, forward, init_params, ops, predict, train_step, value_and_grad

SMALL = CapsNetConfig(input_height=8, input_width=8, conv1_channels=2, conv1_kernel=3, primary_types=2, primary_dim=2,
                      primary_kernel=3, num_classes=3, class_dim=2, decoder_widths=(4,))


@pytest.fixture
def setup():
    params = init_params(SMALL, 0)
    x = np.zeros((2, 1, 8, 8), np.float32)
    return params, x, np.array([0, 2])


@pytest.mark.parametrize("field,value,words", [
    ("conv1_kernel", 30, ["conv1_kernel", "too small", "smallest input"]),
    ("primary_kernel", 7, ["primary_kernel", "too small", "smallest input"]),
    ("primary_types", 0, ["primary_types", "at least 1"]),
    ("num_classes", 1, ["num_classes", "at least 2"]),
    ("routing_iterations", 0, ["routing_iterations"]),
    ("routing_iterations", 2.5, ["routing_iterations", "int"]),
    ("m_plus", 1.5, ["m_plus", "unreachable"]),
    ("m_minus", 0.95, ["m_minus", "below m_plus"]),
    ("decoder_widths", (0,), ["decoder_widths"]),
    ("reconstruction_scale", float("nan"), ["reconstruction_scale", "finite"]),
])
def test_impossible_config(field, value, words):
    with pytest.raises(ValueError) as e:
        SMALL.replace(**{field: value})
    for w in words:
        assert w in str(e.value)


def test_config_round_trip_and_unknown_field():
    assert CapsNetConfig.from_dict(SMALL.to_dict()) == SMALL
    with pytest.raises(ValueError, match="unknown fields.*routing"):
        CapsNetConfig.from_dict({"routing": 3})


def test_paper_sizes():
    c = CapsNetConfig()
    assert c.primary_grid == (6, 6) and c.num_primary == 1152
    assert c.parameter_count() == 8_215_568  # docs/spec.md: conv1 20,992 + primary 5,308,672 + W 1,474,560 + decoder 1,411,344
    assert c.replace(use_decoder=False).parameter_count() == 6_804_224
    assert c.param_shapes()["digit.weight"] == (1152, 10, 16, 8)


def test_missing_extra_misshapen_params(setup):
    params, x, y = setup
    p = dict(params)
    del p["conv1.bias"]
    with pytest.raises(ValueError, match=r"missing \['conv1.bias'\]"):
        forward(p, x, SMALL)
    p = dict(params, extra=np.zeros(1, np.float32))
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        forward(p, x, SMALL)
    p = dict(params, **{"digit.weight": np.zeros((1, 3, 2, 2), np.float32)})
    with pytest.raises(ValueError, match=r"params\['digit.weight'\] must have shape \(\d+, 3, 2, 2\) to match the config, "
                                         r"got shape \(1, 3, 2, 2\)"):
        forward(p, x, SMALL)
    p = dict(params, **{"conv1.bias": params["conv1.bias"].astype(np.float64)})
    with pytest.raises(ValueError, match="mixes dtypes"):
        forward(p, x, SMALL)


def test_nan_in_params_or_input(setup):
    params, x, y = setup
    p = {k: v.copy() for k, v in params.items()}
    p["primary.weight"][0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"params\['primary.weight'\].*finite"):
        value_and_grad(p, x, y, SMALL)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="x must contain only finite values"):
        predict(params, bad, SMALL)


def test_wrong_shapes_and_dtypes(setup):
    params, x, y = setup
    with pytest.raises(ValueError, match=r"x must have shape \(\*, 1, 8, 8\), got shape \(2, 1, 9, 8\)"):
        forward(params, np.zeros((2, 1, 9, 8), np.float32), SMALL)
    with pytest.raises(ValueError, match="x has dtype float64 but params have dtype float32"):
        forward(params, x.astype(np.float64), SMALL)
    with pytest.raises(ValueError, match="dtype float32 or float64, got int64"):
        forward(params, x.astype(np.int64), SMALL)
    with pytest.raises(ValueError, match="numpy.ndarray"):
        forward(params, x.tolist(), SMALL)


def test_labels(setup):
    params, x, _ = setup
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got a label 3"):
        value_and_grad(params, x, np.array([0, 3]), SMALL)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got a label -1"):
        value_and_grad(params, x, np.array([-1, 0]), SMALL)
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        value_and_grad(params, x, np.array([0]), SMALL)
    with pytest.raises(ValueError, match="integer dtype, got float64"):
        value_and_grad(params, x, np.array([0.0, 1.0]), SMALL)


def test_two_digit_labels_and_targets(setup):
    params, x, _ = setup
    two = np.array([[0, 2], [1, 0]])
    targets = np.zeros((2, 2, 1, 8, 8), np.float32)
    value_and_grad(params, x, two, SMALL, targets)  # the good call, for contrast
    with pytest.raises(ValueError, match="labels must list distinct classes in each row.*row 1"):
        value_and_grad(params, x, np.array([[0, 2], [1, 1]]), SMALL, targets)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got a label 3"):
        value_and_grad(params, x, np.array([[0, 3], [1, 0]]), SMALL, targets)
    with pytest.raises(ValueError, match=r"labels of shape \(2, K\) must list 1 <= K <= 3"):
        forward(params, x, SMALL, np.array([[0, 1, 2, 0], [0, 1, 2, 0]]))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\) or \(2, K\)"):
        forward(params, x, SMALL, np.zeros((2, 2, 1), np.int64))
    with pytest.raises(ValueError, match="targets are required with \\(B, K\\) labels"):
        value_and_grad(params, x, two, SMALL)
    with pytest.raises(ValueError, match=r"targets must have shape \(2, 2, 1, 8, 8\), got shape \(2, 1, 8, 8\)"):
        train_step(params, adam_init(params), x, two, SMALL, targets=x)
    with pytest.raises(ValueError, match="targets has dtype float64 but x has dtype float32"):
        value_and_grad(params, x, two, SMALL, targets.astype(np.float64))
    bad = targets.copy()
    bad[1, 1, 0, 2, 2] = np.inf
    with pytest.raises(ValueError, match="targets must contain only finite values"):
        value_and_grad(params, x, two, SMALL, bad)
    # (B,) labels may name their own targets, shaped like x; without the decoder targets are not needed.
    with pytest.raises(ValueError, match=r"targets must have shape \(2, 1, 8, 8\)"):
        value_and_grad(params, x, np.array([0, 1]), SMALL, targets)
    no_decoder = SMALL.replace(use_decoder=False)
    value_and_grad(init_params(no_decoder, 0), x, two, no_decoder)


def test_two_digit_op_level_errors():
    v = np.ones((2, 3, 4))
    with pytest.raises(ValueError, match="labels must list distinct classes in each row.*row 0"):
        ops.mask(v, np.array([[1, 1], [0, 2]]))
    with pytest.raises(ValueError, match="labels must list distinct classes"):
        ops.margin_loss(np.ones((2, 3)), np.array([[0, 1], [2, 2]]))
    with pytest.raises(ValueError, match=r"g must have shape \(2, 2, 12\)"):
        ops.mask_vjp(np.ones((2, 12)), v, np.array([[1, 0], [0, 2]]))
    with pytest.raises(ValueError, match=r"g must have shape \(2, 3, 5\)"):
        ops.decoder_vjp(np.ones((2, 5)), np.ones((2, 3, 4)), [np.ones((5, 4))], [np.ones(5)])
    with pytest.raises(ValueError, match="images .* do not match reconstruction"):
        ops.reconstruction_loss(np.ones((2, 2, 4)), np.ones((2, 1, 1, 2, 2)))
    with pytest.raises(ValueError, match="reconstruction must have shape"):
        ops.reconstruction_loss(np.ones((2, 2, 2, 4)), np.ones((2, 2, 2, 1, 2, 2)))


def test_op_level_errors():
    with pytest.raises(ValueError, match=r"weight must have shape \(3, J, E, 2\)"):
        ops.predictions(np.zeros((1, 3, 2)), np.zeros((4, 2, 2, 2)))
    with pytest.raises(ValueError, match="iterations must be an int >= 1, got 0"):
        ops.routing(np.zeros((1, 2, 2, 2)), 0)
    with pytest.raises(ValueError, match="g has dtype float32 but s has dtype float64|s has dtype"):
        ops.squash_vjp(np.zeros(3, np.float32), np.zeros(3))
    with pytest.raises(ValueError, match="not a whole number of 3-D capsule types"):
        ops.primary_capsules(np.zeros((1, 1, 5, 5)), np.zeros((4, 1, 3, 3)), np.zeros(4), 3, 1)


def test_adam_config_and_state_errors(setup):
    params, x, y = setup
    with pytest.raises(ValueError, match="AdamConfig.beta1"):
        AdamConfig(beta1=1.0)
    state = adam_init(params)
    state["m"].pop("conv1.weight")
    with pytest.raises(ValueError, match=r"state\['m'\] has keys"):
        train_step(params, state, x, y, SMALL)


# ============================================================================== the door
def test_every_spec_name_has_one_check_with_the_reference_signature():
    import inspect

    from capsspec import model as ref_model, optim as ref_optim
    from capsspec.spec import SPEC_NAMES
    from capsspec.validation import CHECKS, spec_signature, unchecked

    assert set(CHECKS) == set(SPEC_NAMES)
    for name in SPEC_NAMES:
        ref = next(getattr(m, name) for m in (ops, ref_model, ref_optim) if hasattr(m, name))
        raw = inspect.signature(unchecked(ref))
        door = spec_signature(name)
        assert list(door.parameters) == list(raw.parameters), name
        assert [p.default for p in door.parameters.values()] == [p.default for p in raw.parameters.values()], name


def _cpu_backends():
    from capsspec import get_backend
    from capsspec.registry import available_backends

    return [get_backend(n) for n in ("numpy", "torch", "tensorflow") if n in available_backends()]


@pytest.fixture(scope="module", params=["numpy", "torch", "tensorflow"])
def backend(request):
    from capsspec import get_backend
    from capsspec.registry import available_backends

    if request.param not in available_backends():
        pytest.skip(f"{request.param} is not available here")
    return get_backend(request.param)


def test_every_backend_refuses_the_same_bad_inputs(backend, setup):
    params, x, y = setup
    net = backend.params_from_numpy(params, SMALL)
    a = backend.asarray
    bad = x.copy()
    bad[1, 0, 3, 3] = np.nan
    two_targets = np.zeros((2, 2, 1, 8, 8), np.float32)
    cases = [
        (lambda: backend.predict(net, a(bad), SMALL), "x must contain only finite values"),
        (lambda: backend.forward(net, a(np.full_like(x, np.inf)), SMALL), "x must contain only finite values"),
        (lambda: backend.loss(net, a(x), a(y.astype(np.float32)), SMALL), "labels must have an integer dtype"),
        (lambda: backend.value_and_grad(net, a(x), a(np.array([0, 3])), SMALL), r"labels must lie in \[0, 3\)"),
        (lambda: backend.forward(net, a(x[:0]), SMALL), "x must hold at least one example"),
        (lambda: backend.forward(net, a(x), SMALL.replace(num_classes=4)), "match the config|config does not match"),
        (lambda: backend.capsule_lengths(a(np.array(1.0))), "v must have at least 1 dimension"),
        (lambda: backend.capsule_lengths_vjp(a(np.array(1.0)), a(np.array(1.0))), "v must have at least 1"),
        (lambda: backend.squash(a(np.ones((2, 3))), 2), r"axis must be an int in \[-2, 2\)"),
        (lambda: backend.squash(a(np.ones((2, 3))), -3), "axis"),
        (lambda: backend.margin_loss(a(np.ones((0, 3))), a(np.zeros(0, np.int64))), "lengths must hold at least one"),
        (lambda: backend.mask(a(np.ones((2, 3, 4))), a(np.array([0.0, 1.0]))), "labels must have an integer dtype"),
        (lambda: backend.routing(a(np.ones((1, 2, 2, 2))), 0), "iterations must be an int >= 1, got 0"),
        (lambda: backend.loss(net, a(x), a(np.array([[1, 1], [0, 2]])), SMALL, a(two_targets)),
         "labels must list distinct classes in each row"),
        (lambda: backend.value_and_grad(net, a(x), a(np.array([[1, 0], [0, 2]])), SMALL), "targets are required"),
        (lambda: backend.train_step(net, backend.adam_init(net), a(x), a(np.array([[1, 0], [0, 2]])), SMALL,
                                    targets=a(x)), r"targets must have shape \(2, 2, 1, 8, 8\)"),
        (lambda: backend.mask(a(np.ones((2, 3, 4))), a(np.array([[2, 2], [0, 1]]))), "labels must list distinct"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_the_reference_refuses_what_the_backends_refuse():
    with pytest.raises(ValueError, match="v must have at least 1 dimension"):
        ops.capsule_lengths(np.array(1.0))
    with pytest.raises(ValueError, match="axis must be an int"):
        ops.squash(np.ones((2, 3)), axis=5)
    with pytest.raises(ValueError, match="x must hold at least one example"):
        ops.conv2d(np.ones((0, 1, 3, 3)), np.ones((2, 1, 2, 2)), np.ones(2))


def test_deferred_value_checks_are_settled_at_the_next_host_read(setup):
    # A backend whose arrays "live on a device": the door queues its value checks as flags and
    # settles them when the caller next reads through the backend, never silently drops them.
    from capsspec.backends.numpy import NumpyBackend

    class Deferring(NumpyBackend):
        def defers(self, a):
            return True

        def deferred_flags(self, a, num_classes):
            return np.array(not np.isfinite(a).all() if num_classes is None else ((a < 0) | (a >= num_classes)).any())

        def deferred_repeats(self, a):
            s = np.sort(a, axis=1)
            return np.array((s[:, 1:] == s[:, :-1]).any())

    params, x, y = setup
    b = Deferring()
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    pred = b.predict(params, bad, SMALL)  # no error yet: the check waits for a read
    with pytest.raises(ValueError, match="x passed to predict must contain only finite values"):
        b.to_numpy(pred)
    b.to_numpy(pred)  # settled: reported once
    b.loss(params, x, np.array([0, -1]), SMALL)  # (-1 indexes from the end on the host: no crash first)
    with pytest.raises(ValueError, match=r"labels passed to loss must contain labels in \[0, 3\)"):
        b.synchronize()
    b.loss(params, x, np.array([[2, 2], [0, 1]]), SMALL, np.zeros((2, 2, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="labels passed to loss must list distinct classes in each row"):
        b.synchronize()
    b.value_and_grad(params, x, y, SMALL)
    b.synchronize()  # good input leaves nothing behind
