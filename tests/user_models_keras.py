"""A CapsNet written the way Keras code writes one (a keras.Model subclass, channels last), for the
whole-model check's tests: "batch h w channels" images, Conv2D kernels "kh kw in out", Dense kernels
"in out", capsules in (h w types) order as a channels-last reshape gives them, W stored
(classes, in_caps, out_dim, in_dim). The model is called on [images, labels].
"""

from __future__ import annotations

import keras
from keras import ops

from user_models import SMALL

MAPPING = {
    "params": {"capsnet/conv1/kernel": "conv1.weight", "capsnet/conv1/bias": "conv1.bias",
               "capsnet/primary/kernel": "primary.weight", "capsnet/primary/bias": "primary.bias",
               "digitcaps/W": {"name": "digit.weight", "layout": "classes (h w types) out_dim in_dim"},
               "capsnet/dec0/kernel": "decoder.0.weight", "capsnet/dec0/bias": "decoder.0.bias",
               "capsnet/dec1/kernel": "decoder.1.weight", "capsnet/dec1/bias": "decoder.1.bias",
               "capsnet/dec2/kernel": "decoder.2.weight", "capsnet/dec2/bias": "decoder.2.bias"},
    "layouts": {"conv": "kh kw in out", "dense": "in out"},
}
INPUT_LAYOUT = "batch h w channels"
OUTPUT_LAYOUTS = {"reconstruction": "batch h w channels"}


def squash(s, axis=-1):
    sq = ops.sum(s * s, axis=axis, keepdims=True)
    return s * ops.sqrt(sq) / (1.0 + sq)


class DigitCaps(keras.layers.Layer):
    def __init__(self, c, **kw):
        super().__init__(**kw)
        self.c = c
        gh, gw = c.primary_grid
        self.W = self.add_weight(name="W", shape=(c.num_classes, gh * gw * c.primary_types, c.class_dim,
                                                  c.primary_dim), initializer=keras.initializers.RandomNormal(0, 0.01))

    def call(self, u):
        u_hat = ops.einsum("jned,bnd->bnje", self.W, u)
        b = ops.zeros(ops.shape(u_hat)[:3])
        for it in range(self.c.routing_iterations):
            v = squash(ops.einsum("bnj,bnje->bje", ops.softmax(b, axis=2), u_hat))
            if it + 1 < self.c.routing_iterations:
                b = b + ops.einsum("bnje,bje->bnj", u_hat, v)
        return v


class KerasCapsNet(keras.Model):
    def __init__(self, c=SMALL, **kw):
        super().__init__(**kw)
        self.c = c
        self.conv1 = keras.layers.Conv2D(c.conv1_channels, c.conv1_kernel, c.conv1_stride, activation="relu", name="conv1")
        self.primary = keras.layers.Conv2D(c.primary_channels, c.primary_kernel, c.primary_stride, name="primary")
        self.digitcaps = DigitCaps(c, name="digitcaps")
        widths = [*c.decoder_widths, c.image_size]
        self.dec = [keras.layers.Dense(w, activation="sigmoid" if k == len(widths) - 1 else "relu", name=f"dec{k}")
                    for k, w in enumerate(widths)]

    def call(self, inputs):
        x, labels = inputs
        p = self.primary(self.conv1(x))
        u = squash(ops.reshape(p, (ops.shape(p)[0], -1, self.c.primary_dim)))
        v = self.digitcaps(u)
        h = ops.reshape(v * ops.one_hot(labels, self.c.num_classes)[:, :, None], (ops.shape(v)[0], -1))
        for layer in self.dec:
            h = layer(h)
        return ops.norm(v, axis=-1), ops.reshape(h, ops.shape(x))


def build(c=SMALL):
    model = KerasCapsNet(c, name="capsnet")  # named, so that its weights' paths are capsnet/...
    model([ops.zeros((1, c.input_height, c.input_width, c.input_channels)), ops.zeros((1,), dtype="int32")])
    return model


def make_loss(c=SMALL):
    def loss(model, x, labels):
        lengths, recon = model([x, labels])
        t = ops.one_hot(labels, c.num_classes)
        margin = t * ops.relu(0.9 - lengths) ** 2 + 0.5 * (1 - t) * ops.relu(lengths - 0.1) ** 2
        err = ops.sum(ops.reshape((recon - x) ** 2, (ops.shape(x)[0], -1)), axis=1)
        return ops.mean(ops.sum(margin, axis=1) + 0.0005 * err)
    return loss
