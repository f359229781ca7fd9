"""A whole CapsNet written outside capsspec, held to the reference (check_model), and its weights imported.

The models are in tests/user_models.py (PyTorch) and tests/user_models_jax.py (JAX), each in a
layout of its own: the correct ones pass; each deviating one makes one known mistake by
construction, and the check must catch it and name that mistake (or, for a mistake the check does
not know, catch it without naming one). `capsspec import` turns the PyTorch model's state_dict
into a checkpoint whose predictions are the user's model's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import user_models as uc  # noqa: E402
from capsspec import model as ref_model  # noqa: E402
from capsspec.conformance.param_mapping import load_mapping, parse_mapping  # noqa: E402
from capsspec.conformance.user_model import check_model  # noqa: E402
from capsspec.tools.cli import main  # noqa: E402
from capsspec.training.checkpoint import load_checkpoint  # noqa: E402


def _check(model_cls=uc.UserCapsNet, criterion=None, **kw):
    torch.manual_seed(0)
    kw = {"config": uc.SMALL, "outputs": uc.OUTPUTS, "output_layouts": uc.OUTPUT_LAYOUTS,
          "loss": uc.make_loss(criterion or uc.CapsuleLoss()), **kw}
    return check_model(model_cls(), uc.MAPPING, **kw)


def test_a_correct_pytorch_model_in_its_own_layout_passes():
    report = _check()
    assert report.passed, str(report)
    assert report.checked == ["v", "reconstruction", "loss", "gradients (11 parameters)"]
    assert "passed" in str(report)


def _loss(**attrs):
    return type("Loss", (uc.CapsuleLoss,), attrs)()


# Each model makes the one mistake its name says (tests/user_models.py); the name is what the check must say.
DEVIATING = [
    (uc.NoChannelsLast, None, "primary-no-channels-last-dim-major", "v"),
    (uc.ReluOnPrimary, None, "primary-relu", "v"),
    (uc.SoftmaxOverChildren, None, "routing-softmax-over-children", "v"),
    (uc.OneIteration, None, "routing-iterations-ignored", "v"),
    (uc.SharedLogits, None, "routing-logits-shared", "v"),
    (uc.DetachedRouting, None, "routing-detached", "gradients"),
    (uc.DecoderUnmasked, None, "decoder-unmasked", "reconstruction"),
    (uc.MaskByPrediction, None, "mask-by-prediction", "reconstruction"),
    (uc.UserCapsNet, {"softmax_lengths": True}, "margin-on-softmax", "loss"),
    (uc.UserCapsNet, {"recon_mean": True}, "reconstruction-mean-over-pixels", "loss"),
    (uc.UserCapsNet, {"margin_mean": True}, "margin-mean-over-classes", "loss"),
]


@pytest.mark.parametrize("model_cls, loss_attrs, name, first", DEVIATING,
                         ids=[d[2] for d in DEVIATING])
def test_a_deviating_model_is_caught_and_named(model_cls, loss_attrs, name, first):
    report = _check(model_cls, _loss(**loss_attrs) if loss_attrs else None)
    assert not report.passed
    assert report.deviations == [name], str(report)
    assert report.first_difference == first
    text = str(report)
    assert f"named deviation: {name}:" in text and "docs/spec.md, section" in text
    assert "backend" in text and "reference" in text and "reproduce with: check_model(" in text


def test_exposed_intermediates_say_where_the_model_first_differs():
    def call(m, x, labels):
        return (m.primary_caps(m.conv_layer(x)), *m(x, labels))

    outputs = ("primary", "v", "reconstruction")
    assert _check(call=call, outputs=outputs).passed
    report = _check(uc.NoChannelsLast, call=call, outputs=outputs)
    assert report.first_difference == "primary" and report.deviations == ["primary-no-channels-last-dim-major"]


class _BiasedDigitCaps(uc.DigitCaps):
    """A bias added to the class capsules before the squash: a mistake the check knows no name for."""

    def __init__(self, c):
        super().__init__(c)
        self.bias = torch.nn.Parameter(0.1 * torch.ones(c.num_classes, c.class_dim, 1))

    def forward(self, u):
        u_hat = torch.matmul(self.W, u[:, :, None, :, None])
        b = torch.zeros(u_hat.shape[:3] + (1, 1), dtype=u_hat.dtype)
        for _ in range(self.routing_iterations):
            v = uc.squash((torch.softmax(b, dim=2) * u_hat).sum(dim=1, keepdim=True) + self.bias, dim=-2)
            b = b + (u_hat * v).sum(dim=-2, keepdim=True)
        return v.squeeze(1)


def test_a_mistake_without_a_name_is_caught_and_said_to_be_unnamed():
    mapping = {**uc.MAPPING, "ignore": ["digit_caps.bias"]}
    model = uc._model("BiasedCaps", digit_class=_BiasedDigitCaps)
    torch.manual_seed(0)
    report = check_model(model(), mapping, config=uc.SMALL, outputs=uc.OUTPUTS, output_layouts=uc.OUTPUT_LAYOUTS)
    assert not report.passed and report.deviations == [] and report.first_difference == "v"
    assert "no known deviation explains every failing draw" in str(report)
    assert report.checked == ["v", "reconstruction"]  # no loss given: outputs only


@pytest.mark.parametrize("change, message", [
    (lambda m: m["params"].update({"nope.weight": "conv1.weight"}), "both name conv1.weight"),
    (lambda m: m["params"].pop("digit_caps.W"), "names no user parameter for digit.weight"),
    (lambda m: m["params"].update({"digit_caps.W": "digit.weights"}), "not a canonical parameter"),
    (lambda m: m["layouts"].update({"digit": "in_caps classes out_dim in_dim"}), "name each axis, with 1"),
    (lambda m: m["layouts"].update({"conv": "kh kw in out"}), "layout 'out in kh kw' would fit"),
    (lambda m: m["layouts"].update({"dense": "out inn"}), "unknown axis 'inn'"),
])
def test_a_bad_mapping_is_one_clear_value_error(change, message):
    mapping = json.loads(json.dumps(uc.MAPPING))
    change(mapping)
    with pytest.raises(ValueError, match=message) as err:
        check_model(uc.UserCapsNet(), mapping, config=uc.SMALL, outputs=uc.OUTPUTS, output_layouts=uc.OUTPUT_LAYOUTS)
    assert "\n" not in str(err.value)


def test_a_parameter_the_mapping_does_not_name_and_a_misshapen_output_are_refused():
    mapping = {**uc.MAPPING, "params": {k: v for k, v in uc.MAPPING["params"].items() if k != "digit_caps.W"}}
    mapping["params"]["digit_caps.W"] = "digit.weight"
    model = uc._model("Extra", digit_class=_BiasedDigitCaps)()
    with pytest.raises(ValueError, match="parameter 'digit_caps.bias' that the mapping does not name"):
        check_model(model, mapping, config=uc.SMALL, outputs=uc.OUTPUTS, output_layouts=uc.OUTPUT_LAYOUTS)
    with pytest.raises(ValueError, match=r"output 'v' has shape \(2, 4, 6, 1\); its layout 'batch classes dim'"):
        check_model(uc.UserCapsNet(), uc.MAPPING, config=uc.SMALL, outputs=uc.OUTPUTS)
    with pytest.raises(ValueError, match="returned 2 values but outputs names 1"):
        check_model(uc.UserCapsNet(), uc.MAPPING, config=uc.SMALL, outputs=("v",), output_layouts=uc.OUTPUT_LAYOUTS)


def test_the_mapping_round_trips_every_layout_exactly():
    m = parse_mapping(uc.MAPPING, uc.SMALL)
    params = ref_model.init_params(uc.SMALL, 3)
    user = m.to_user(params)
    assert user["digit_caps.W"].shape == (1, *params["digit.weight"].shape)
    # dimension-major channels: the user's channel d*T + t is the canonical t*D + d
    t, d = uc.SMALL.primary_types, uc.SMALL.primary_dim
    assert np.array_equal(user["primary_caps.conv.weight"][1 * t + 2], params["primary.weight"][2 * d + 1])
    back = m.to_canonical(user)
    assert list(back) == list(params) and all(np.array_equal(back[k], params[k]) for k in params)


# ===================================================================================== JAX
def test_a_jax_model_in_channels_last_layouts_passes_and_its_softmax_mistake_is_named():
    pytest.importorskip("jax")
    import user_models_jax as uj

    kw = {"framework": "jax", "config": uc.SMALL, "input_layout": uj.INPUT_LAYOUT,
          "outputs": ("lengths", "reconstruction"), "output_layouts": uj.OUTPUT_LAYOUTS, "loss": uj.make_loss()}
    report = check_model((uj.make_apply(), uj.init()), uj.MAPPING, **kw)
    assert report.passed, str(report)
    bad = check_model((uj.make_apply(softmax_axis=1), uj.init()), uj.MAPPING, **kw)
    assert bad.deviations == ["routing-softmax-over-children"], str(bad)


# ===================================================================================== capsspec import
SMALL28 = uc.SMALL.replace(input_height=28, input_width=28, conv1_kernel=9, primary_kernel=9, num_classes=10)


def _mapping_toml(path, config=SMALL28):
    fields = {k: v for k, v in config.to_dict().items() if v != type(config)().to_dict()[k]}
    lines = ["[config]"] + [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
    lines += ["[layouts]", f"digit = {json.dumps(uc.MAPPING['layouts']['digit'])}", "[params]"]
    for user, canonical in uc.MAPPING["params"].items():
        value = (json.dumps(canonical) if isinstance(canonical, str) else
                 "{ name = %s, layout = %s }" % (json.dumps(canonical["name"]), json.dumps(canonical["layout"])))
        lines.append(f"{json.dumps(user)} = {value}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_import_then_eval_gives_the_user_models_predictions(tmp_path, capsys, mnist_dir):
    torch.manual_seed(5)
    model = uc.UserCapsNet(SMALL28)
    torch.save(model.state_dict(), tmp_path / "user.pt")
    mapping = _mapping_toml(tmp_path / "mapping.toml")
    out = tmp_path / "model.safetensors"
    assert main(["import", str(tmp_path / "user.pt"), "--mapping", str(mapping), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    ck = load_checkpoint(out)
    assert ck.config == SMALL28 and load_mapping(mapping).config == SMALL28
    x = np.random.default_rng(0).uniform(0, 1, (8, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        theirs = model(torch.from_numpy(x))[0].squeeze(-1).norm(dim=-1).argmax(dim=1).numpy()
    assert np.array_equal(ref_model.predict(ck.params, x, ck.config), theirs)
    # capsspec eval on the (stand-in) MNIST test set: its confusion matrix is the user's model's
    report = tmp_path / "eval.json"
    assert main(["eval", str(out), "--backend", "numpy", "--data-dir", str(mnist_dir), "--json", str(report)]) == 0
    from capsspec.training.mnist import load_mnist

    m = load_mnist(str(mnist_dir))
    with torch.no_grad():
        pred = model(torch.from_numpy(m.test_images))[0].squeeze(-1).norm(dim=-1).argmax(dim=1).numpy()
    assert json.loads(report.read_text())["accuracy"] == pytest.approx(np.mean(pred == m.test_labels))


def test_import_of_an_npz_in_keras_layouts(tmp_path, capsys):
    mapping = {"params": {f"w{i}": name for i, name in enumerate(uc.SMALL.param_shapes())},
               "layouts": {"conv": "kh kw in out", "dense": "in out", "digit": "classes in_caps out_dim in_dim"},
               "config": {k: v for k, v in uc.SMALL.to_dict().items() if v != type(uc.SMALL)().to_dict()[k]}}
    (tmp_path / "m.json").write_text(json.dumps(mapping))
    params = ref_model.init_params(uc.SMALL, 1, "float64")
    np.savez(tmp_path / "w.npz", **parse_mapping(mapping).to_user(params))
    assert main(["import", str(tmp_path / "w.npz"), "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0] == f"w0\tfloat64\t{(5, 5, 1, 8)}" and len(listed) == len(params)  # conv1 in "kh kw in out"
    assert main(["import", str(tmp_path / "w.npz"), "--out", str(tmp_path / "c.safetensors")]) == 2
    assert "needs --mapping (or --list" in capsys.readouterr().err
    out = tmp_path / "c.safetensors"
    assert main(["import", str(tmp_path / "w.npz"), "--mapping", str(tmp_path / "m.json"), "--out", str(out)]) == 0
    ck = load_checkpoint(out)
    assert ck.dtype == "float64" and all(np.array_equal(ck.params[k], params[k]) for k in params)


@pytest.mark.parametrize("text, message", [
    ("[params\n", "is not a valid mapping file"),
    ('[params]\n"conv_layer.conv.weight" = "conv1.weight"\n', "names no user parameter for conv1.bias"),
    ('[layouts]\nconv = "out in kh kw"\n', "a mapping file has a params table"),
    ('[params]\n"x" = { name = "conv1.weight", shape = 3 }\n', "must be a canonical name or {name, layout}"),
    ('params = 3\n', "the mapping's params must be a table, got int"),
    ('ignore = "x"\n[params]\n', "the mapping's ignore must be a list, got str"),
    ('[config]\nconv1_channels = 0\n[params]\n', "CapsNetConfig.conv1_channels must be at least 1"),
])
def test_a_bad_mapping_file_is_one_line_and_writes_nothing(tmp_path, capsys, text, message):
    torch.save(uc.UserCapsNet().state_dict(), tmp_path / "user.pt")
    (tmp_path / "bad.toml").write_text(text)
    out = tmp_path / "never.safetensors"
    rc = main(["import", str(tmp_path / "user.pt"), "--mapping", str(tmp_path / "bad.toml"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert err.startswith("capsspec import: error:") and not out.exists()


def test_weights_that_do_not_fit_the_mapping_are_one_line(tmp_path, capsys):
    mapping = _mapping_toml(tmp_path / "mapping.toml", uc.SMALL)
    torch.save(uc.UserCapsNet(SMALL28).state_dict(), tmp_path / "big.pt")  # another config's shapes
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    for weights, message in (("big.pt", "no order of its axes fits"), ("junk.pt", "torch.load(weights_only=True)"),
                             ("none.pt", "no weights file at")):
        rc = main(["import", str(tmp_path / weights), "--mapping", str(mapping), "--out", str(tmp_path / "o.st")])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o.st").exists()


# ===================================================================================== Keras
def test_a_keras_model_passes_and_its_saved_weights_import(tmp_path, capsys):
    pytest.importorskip("keras")
    import user_models_keras as uk

    model = uk.build()
    before = [w.numpy().copy() for w in model.trainable_weights]
    report = check_model(model, uk.MAPPING, framework="keras", config=uc.SMALL, input_layout=uk.INPUT_LAYOUT,
                         outputs=("lengths", "reconstruction"), output_layouts=uk.OUTPUT_LAYOUTS, loss=uk.make_loss())
    assert report.passed, str(report)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, model.trainable_weights))  # put back
    # model.save_weights names its arrays by HDF5 path: a mapping of those names imports the file.
    model.save_weights(tmp_path / "k.weights.h5")
    by_path = {"conv1/vars/0": "conv1.weight", "conv1/vars/1": "conv1.bias",
               "layers/conv2d_1/vars/0": "primary.weight", "layers/conv2d_1/vars/1": "primary.bias",
               "digitcaps/vars/0": uk.MAPPING["params"]["digitcaps/W"],
               **{f"dec/dense{'' if k == 0 else f'_{k}'}/vars/{i}": f"decoder.{k}.{'weight' if i == 0 else 'bias'}"
                  for k in range(3) for i in range(2)}}
    from capsspec.tools.import_weights import read_weights

    names = set(read_weights(tmp_path / "k.weights.h5"))
    if not set(by_path) <= names:
        pytest.skip(f"this Keras version names its HDF5 arrays otherwise: {sorted(names)}")
    mapping = {"params": by_path, "layouts": uk.MAPPING["layouts"],
               "config": {k: v for k, v in uc.SMALL.to_dict().items() if v != type(uc.SMALL)().to_dict()[k]}}
    (tmp_path / "k.json").write_text(json.dumps(mapping))
    out = tmp_path / "k.safetensors"
    assert main(["import", str(tmp_path / "k.weights.h5"), "--mapping", str(tmp_path / "k.json"), "--out", str(out)]) == 0
    ck = load_checkpoint(out)
    x = np.random.default_rng(1).uniform(0, 1, (6, 1, 16, 16)).astype(np.float32)
    lengths, _ = model([x.transpose(0, 2, 3, 1), np.zeros(6, np.int32)])
    np.testing.assert_allclose(ref_model.forward(ck.params, x, ck.config).lengths, np.asarray(lengths), rtol=1e-4,
                               atol=1e-6)


# ===================================================================================== where users are
_USER_MODULE = '''
import user_models as uc


def build():
    return uc.UserCapsNet(uc.SMALL)


def build_unmasked():
    return uc.DecoderUnmasked(uc.SMALL)


loss = uc.make_loss(uc.CapsuleLoss())
'''


@pytest.mark.parametrize("factory, status, expected", [("build", 0, "passed"),
                                                       ("build_unmasked", 1, "named deviation: decoder-unmasked")])
def test_the_command_line_checks_a_model_named_by_module_and_attribute(tmp_path, monkeypatch, capsys, factory,
                                                                        status, expected):
    from capsspec.conformance.cli import main as conformance_main

    (tmp_path / "mycaps.py").write_text(_USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    mapping = _mapping_toml(tmp_path / "mapping.toml", uc.SMALL)
    argv = ["--model", f"mycaps:{factory}", "--mapping", str(mapping), "--framework", "torch", "--loss", "mycaps:loss",
            *(f"--output-layout={k}={v}" for k, v in uc.OUTPUT_LAYOUTS.items())]
    assert conformance_main(argv) == status
    assert expected in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "mycaps:build"], "--model needs --mapping"),
    (["--model", "nosuchmodule:build", "--mapping", "m.toml"], "cannot import module 'nosuchmodule'"),
    (["--model", "mycaps", "--mapping", "m.toml"], "expected module:attr"),
    (["--model", "mycaps:build", "--backend", "numpy"], "exclusive"),
])
def test_a_bad_model_command_line_is_one_line(tmp_path, monkeypatch, capsys, argv, message):
    from capsspec.conformance.cli import main as conformance_main

    (tmp_path / "mycaps.py").write_text(_USER_MODULE)
    monkeypatch.chdir(tmp_path)
    assert conformance_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_the_pytest_fixture_passes_a_correct_model_and_fails_a_deviating_one(tmp_path):
    pytester_src = '''
import pytest
import user_models as uc


def _kw():
    return dict(config=uc.SMALL, outputs=uc.OUTPUTS, output_layouts=uc.OUTPUT_LAYOUTS,
                loss=uc.make_loss(uc.CapsuleLoss()))


def test_good(capsspec_check_model):
    capsspec_check_model(uc.UserCapsNet(uc.SMALL), uc.MAPPING, **_kw())


def test_bad(capsspec_check_model):
    capsspec_check_model(uc.ReluOnPrimary(uc.SMALL), uc.MAPPING, **_kw())
'''
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "test_user.py").write_text(pytester_src)
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "capsspec.conformance.plugin", "-p",
                           "no:cacheprovider", str(tmp_path / "test_user.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert "1 failed, 1 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    assert "primary-relu" in done.stdout
