"""The paper's section-7 settings as presets (capsspec.training.presets), their crops, and none_of_the_above.

The data sets themselves cannot be downloaded here: each preset runs on generated images of its
shape (tests/shapes.py), with tiny model overrides so that a step or two stays fast. Checked: what
each preset sets and that named flags win; train, eval and predict through the command line; the
random crop's seeded draw is reproducible and a resumed run is bit-exact; eval and predict see the
centre crop; one-line errors; the routing flag on the torch backend against the reference; old
checkpoints (without the new fields) still load.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from capsspec import ops
from capsspec.config import CapsNetConfig
from capsspec.tools.cli import main
from capsspec.training.augmentation import centre_offset, crop_images
from capsspec.training.checkpoint import load_checkpoint
from capsspec.training.settings import TrainSettings
from capsspec.training.splits import epoch_crops

sys.path.insert(0, str(Path(__file__).parent))
from shapes import shapes_folder  # noqa: E402

# Small everything: the presets' own sizes would cost minutes per step on a CPU.
TINY = ["--backend", "numpy", "--conv1-channels", "4", "--primary-dim", "2", "--conv1-kernel", "5",
        "--primary-kernel", "5", "--batch-size", "16", "--quiet", "--no-decoder"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSSPEC_IMAGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def colour32(tmp_path_factory):
    """CIFAR10's and SVHN's shape: 32x32 RGB files, three classes."""
    return shapes_folder(tmp_path_factory.mktemp("c32") / "shapes", per_class=12, size=32)


@pytest.fixture(scope="module")
def stereo_npz(tmp_path_factory):
    """smallNORB's shape: 2-channel (a stereo pair) 96x96 uint8 arrays in an .npz, five classes (a bar's row)."""
    rng = np.random.default_rng(5)

    def part(n):
        y = rng.integers(0, 5, n)
        x = rng.integers(0, 60, size=(n, 2, 96, 96), dtype=np.uint8)
        for i, j in enumerate(y):
            x[i, 0, 16 + 14 * j:26 + 14 * j, 20:76] = 220
            x[i, 1, 16 + 14 * j:26 + 14 * j, 24:80] = 220  # the other eye: the same bar, moved
        return x, y

    path = tmp_path_factory.mktemp("norb") / "norb.npz"
    (xt, yt), (xs, ys) = part(30), part(10)
    np.savez(path, x_train=xt, y_train=yt, x_test=xs, y_test=ys)
    return path


def _error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def _train(data, out, *extra):
    assert main(["train", "--data", str(data), *TINY, "--epochs", "1", "--out", str(out), *extra]) == 0
    return load_checkpoint(out / "final.safetensors")


# ===================================================================================== the presets end to end
def test_cifar10_preset_trains_evaluates_and_predicts_on_24x24_crops(colour32, tmp_path, capsys):
    ck = _train(colour32, tmp_path / "run", "--preset", "cifar10")
    c = ck.config
    assert c.input_shape == (3, 24, 24) and c.primary_types == 64 and c.none_of_the_above
    assert c.conv1_channels == 4 and c.primary_dim == 2  # named flags win over the preset
    assert (ck.training["crop_height"], ck.training["image_height"], ck.training["preset"]) == (24, 32, "cifar10")
    assert ck.training["max_shift"] == 0  # the crop replaces the shifts
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run" / "final.safetensors"), "--backend", "numpy"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    image = next((colour32 / "circle").iterdir())
    assert main(["predict", str(tmp_path / "run" / "final.safetensors"), str(image), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)["predictions"][0]["scores"]
    assert set(scores) == {"circle", "square", "triangle"}


def test_smallnorb_preset_takes_two_channel_arrays_resized_and_cropped(stereo_npz, tmp_path, capsys):
    ck = _train(stereo_npz, tmp_path / "run", "--preset", "smallnorb", "--primary-types", "2")
    assert ck.config.input_shape == (2, 32, 32) and ck.config.num_classes == 5
    assert (ck.training["image_height"], ck.training["crop_height"], ck.training["channels"]) == (48, 32, 2)
    assert main(["eval", str(tmp_path / "run" / "final.safetensors"), "--backend", "numpy"]) == 0
    assert "10 test images" in capsys.readouterr().out


def test_svhn_preset_sets_the_capsule_sizes_and_keeps_the_shifts(colour32, tmp_path):
    ck = _train(colour32, tmp_path / "run", "--preset", "svhn", "--conv1-channels", "6", "--primary-types", "2")
    c = ck.config
    assert (c.conv1_channels, c.primary_types, c.primary_dim, c.class_dim) == (6, 2, 2, 8)  # flags over the preset
    assert c.input_shape == (3, 32, 32) and not c.none_of_the_above and ck.training["crop_height"] is None
    assert ck.training["max_shift"] == 2


# ===================================================================================== crops
def test_crop_images_takes_the_window_at_each_offset():
    images = np.arange(2 * 3 * 6 * 5, dtype=np.float32).reshape(2, 3, 6, 5)
    out = crop_images(images, np.array([0, 2]), np.array([1, 0]), 4, 3)
    np.testing.assert_array_equal(out[0], images[0, :, 0:4, 1:4])
    np.testing.assert_array_equal(out[1], images[1, :, 2:6, 0:3])
    assert (centre_offset(32, 24), centre_offset(48, 32), centre_offset(7, 4)) == (4, 8, 1)
    with pytest.raises(ValueError, match="crop"):
        crop_images(images, np.array([3, 0]), np.array([0, 0]), 4, 3)


def test_the_crops_draw_is_a_function_of_seed_and_epoch():
    a, b = epoch_crops(3, 1, 500, (8, 16)), epoch_crops(3, 1, 500, (8, 16))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert a[0].min() == 0 and a[0].max() == 8 and a[1].max() == 16  # every offset of the room is drawn
    other_epoch, other_seed = epoch_crops(3, 2, 500, (8, 16)), epoch_crops(4, 1, 500, (8, 16))
    assert not np.array_equal(a[0], other_epoch[0]) and not np.array_equal(a[0], other_seed[0])


def test_training_batches_are_random_crops_and_the_other_splits_centre_crops(colour32):
    from capsspec.training.image_data import image_splits, open_images

    data = open_images(colour32, progress=None)
    settings = TrainSettings(dataset="images", data=str(colour32), val_size=3, max_shift=0, crop_height=24,
                             crop_width=24, seed=7)
    splits = image_splits(data, settings)
    assert splits.train_x.shape[1:] == splits.test_x.shape[1:] == (3, 24, 24)
    whole_test = data.pool[splits.test_x.index].astype(np.float32) / 255
    np.testing.assert_array_equal(splits.test_x[:], whole_test[:, :, 4:28, 4:28])
    idx = np.arange(len(splits.train_y))[::-1]
    x1, y1, targets = splits.training_batch(1, idx, "float32")
    assert targets is None and np.array_equal(y1, splits.train_y[idx])
    top, left = epoch_crops(7, 1, len(splits.train_y), (8, 8))
    whole = data.pool[splits.train_x.index].astype(np.float32) / 255
    for k, n in enumerate(idx[:6]):
        np.testing.assert_array_equal(x1[k], whole[n, :, top[n]:top[n] + 24, left[n]:left[n] + 24])
    assert not np.array_equal(x1, splits.training_batch(2, idx, "float32")[0])  # new crops each epoch


def test_a_cropped_run_resumes_bit_for_bit(colour32, tmp_path):
    flags = [*TINY, "--primary-types", "2", "--crop", "24", "24"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["train", "--data", str(colour32), *flags, "--epochs", "2", "--out", str(whole)]) == 0
    assert main(["train", "--data", str(colour32), *flags, "--epochs", "1", "--out", str(split)]) == 0
    assert main(["train", "--resume", "--epochs", "2", "--out", str(split), "--quiet"]) == 0
    a, b = (load_checkpoint(d / "final.safetensors").params for d in (whole, split))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_eval_and_predict_see_the_centre_crop(colour32, tmp_path, capsys):
    """predict's scores of a file are the forward pass of that file's centre 24x24, cut here by hand."""
    from PIL import Image

    from capsspec.model import forward

    ck = _train(colour32, tmp_path / "run", "--primary-types", "2", "--crop", "24", "24")
    image = next((colour32 / "square").iterdir())
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "run" / "final.safetensors"), str(image), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)["predictions"][0]["scores"]
    pixels = np.asarray(Image.open(image).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255
    x = np.ascontiguousarray(pixels[None, :, 4:28, 4:28])
    lengths = forward({k: v for k, v in ck.params.items()}, x, ck.config).lengths[0]
    np.testing.assert_allclose([scores[n] for n in ("circle", "square", "triangle")], lengths, atol=1e-6)


# ===================================================================================== errors
def test_preset_errors_are_one_line(colour32, tmp_path, capsys):
    out = str(tmp_path / "err")
    assert "--data PATH" in _error_line(capsys, ["train", "--preset", "cifar10", "--out", out])
    assert ".npz" in _error_line(capsys, ["train", "--data", str(colour32), "--preset", "smallnorb", "--out", out])
    assert "--crop" in _error_line(capsys, ["train", "--data", str(colour32), "--crop", "40", "40", "--out", out])
    assert "--max-shift" in _error_line(capsys, ["train", "--data", str(colour32), "--crop", "20", "20",
                                                 "--max-shift", "2", "--out", out])
    assert "--image-size" in _error_line(capsys, ["train", "--data", str(colour32), "--image-size", "20", "20",
                                                  "--crop", "24", "24", "--out", out])


def test_predict_refuses_image_files_for_a_two_channel_model(stereo_npz, colour32, tmp_path, capsys):
    _train(stereo_npz, tmp_path / "run", "--preset", "smallnorb", "--primary-types", "2")
    image = next((colour32 / "circle").iterdir())
    capsys.readouterr()
    assert "2-channel" in _error_line(capsys, ["predict", str(tmp_path / "run" / "final.safetensors"), str(image)])


# ===================================================================================== none_of_the_above
def test_none_of_the_above_on_torch_matches_the_reference():
    from capsspec.registry import get_backend

    torch_backend = get_backend("torch")
    rng = np.random.default_rng(11)
    u_hat = rng.normal(size=(3, 7, 4, 5))
    g_v, g_c = rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 7, 4))
    for flag in (False, True):
        v, c = ops.routing(u_hat, 3, flag)
        tv, tc = torch_backend.routing(torch_backend.asarray(u_hat), 3, flag)
        np.testing.assert_allclose(torch_backend.to_numpy(tv), v, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(torch_backend.to_numpy(tc), c, rtol=1e-12, atol=1e-14)
        (g,) = ops.routing_vjp((g_v, g_c), u_hat, 3, flag)
        (tg,) = torch_backend.routing_vjp((torch_backend.asarray(g_v), torch_backend.asarray(g_c)),
                                          torch_backend.asarray(u_hat), 3, flag)
        np.testing.assert_allclose(torch_backend.to_numpy(tg), g, rtol=1e-10, atol=1e-13)
    assert np.all(c.sum(axis=2) < 1)  # the flag sends part of each child nowhere


def test_the_flag_changes_the_model_and_old_configs_and_settings_still_load():
    old = CapsNetConfig().to_dict()
    del old["none_of_the_above"]
    assert CapsNetConfig.from_dict(old).none_of_the_above is False
    settings = TrainSettings().to_dict()
    for name in ("crop_height", "crop_width", "preset"):
        del settings[name]
    assert TrainSettings.from_dict(settings).crop is None
    with pytest.raises(ValueError, match="none_of_the_above must be a bool"):
        CapsNetConfig(none_of_the_above=1)
    with pytest.raises(ValueError, match="none_of_the_above"):
        ops.routing(np.ones((1, 2, 3, 2)), 2, "yes")
