"""The paper's other settings (its section 7) as presets of `capsspec train --data PATH --preset NAME`.

A preset is data, not code: the model's fields, the images' channels, the size they are resized
to and the crop the model sees, each written once here and described for --help and the docs
(docs/own-images.md, "Presets"). capsspec.tools.own_images applies one as defaults under the
flags a user names: an explicit flag always wins over the preset's value.

A crop (crop_height, crop_width) means: training draws a random crop of that size from each
image, anew each epoch (capsspec.training.splits.epoch_crops); validation, test, `eval`,
`predict` and `figures` take the centre crop. The model's input is the crop. The crop replaces
the MNIST shifts (max_shift 0): a random crop already moves the image. Without a crop (svhn)
training keeps the MNIST shifts of up to 2 pixels.

The data sets themselves (CIFAR10, smallNORB, SVHN) are not shipped and cannot be downloaded by
capsspec; a preset is used on a folder or .npz of such images that the user has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["Preset", "PRESETS", "preset_help"]


@dataclass(frozen=True)
class Preset:
    """One of the paper's settings: what it sets, and what the paper reports with it."""

    name: str
    dataset: str  # the data set the paper trained on with it
    description: str  # one line, for --help
    paper_error: str  # the paper's test error with this setting (section 7)
    config: Mapping[str, Any] = field(default_factory=dict)  # CapsNetConfig fields
    channels: int | None = None  # the images' channels (2: given as they are, e.g. a stereo pair in an .npz)
    image_size: tuple[int, int] | None = None  # resize every image to (H, W) first
    crop: tuple[int, int] | None = None  # then random (training) or centre (evaluation) crops of (H, W)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("cifar10", "CIFAR10", "3 channels, 24x24 random crops of 32x32 images, 64 primary capsule types and the "
                      "none-of-the-above routing logit", "10.6% (an ensemble of 7 models)",
           config={"primary_types": 64, "none_of_the_above": True}, channels=3, image_size=(32, 32), crop=(24, 24)),
    Preset("smallnorb", "smallNORB", "2 channels (the stereo pair, from an .npz), resized to 48x48, 32x32 random crops "
                        "in training and the centre crop at test", "2.7%",
           channels=2, image_size=(48, 48), crop=(32, 32)),
    Preset("svhn", "SVHN", "3 channels of 32x32, 64 conv1 channels, 16 primary capsule types of 6 dimensions, "
                   "8-dimensional class capsules", "4.3%",
           config={"conv1_channels": 64, "primary_types": 16, "primary_dim": 6, "class_dim": 8}, channels=3,
           image_size=(32, 32)),
)}


def preset_help() -> str:
    """The presets, one clause each, for the --preset flag's help."""
    return "; ".join(f"{p.name} ({p.dataset}): {p.description}" for p in PRESETS.values())
