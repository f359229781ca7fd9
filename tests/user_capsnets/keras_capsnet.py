"""TensorFlow / Keras pieces in the style of Keras CapsNets: predictions and routing on u_hat laid out
(batch, classes, in_caps, dim) with W (classes, in_caps, out_dim, in_dim), routing as a Layer,
one-hot targets, channels-last images."""

from __future__ import annotations

import tensorflow as tf

EPSILON = 1e-7  # keras.backend.epsilon()


def squash(vectors, axis=-1):
    s_squared_norm = tf.reduce_sum(tf.square(vectors), axis, keepdims=True)
    scale = s_squared_norm / (1 + s_squared_norm) / tf.sqrt(s_squared_norm + EPSILON)
    return scale * vectors


def predictions(inputs, W):
    """inputs (batch, in_caps, in_dim), W (classes, in_caps, out_dim, in_dim) -> (batch, classes, in_caps, out_dim)."""
    return tf.einsum("jned,bnd->bjne", W, inputs)


def _tf32(x):
    """x rounded to TF32 (10 mantissa bits), as a GPU's tensor cores round matmul inputs."""
    bits = tf.bitwise.bitwise_and(tf.bitcast(x, tf.int32) + 0x1000, tf.constant(~0x1FFF, tf.int32))
    return tf.bitcast(bits, tf.float32)


def predictions_tf32(inputs, W):
    return tf.einsum("jned,bnd->bjne", _tf32(W), _tf32(inputs))


def _exact_squash(s, axis=-1):
    n2 = tf.reduce_sum(tf.square(s), axis, keepdims=True)
    n = tf.sqrt(tf.where(n2 > 0, n2, tf.ones_like(n2)))
    return tf.where(n2 > 0, n2 / (1 + n2) / n, tf.zeros_like(n2)) * s


class CapsuleRouting(tf.keras.layers.Layer):
    """Routing by agreement on inputs_hat (batch, classes, in_caps, dim) -> (v, c)."""

    def __init__(self, routings=3, stop_gradient=False, **kwargs):
        super().__init__(**kwargs)
        self.routings, self.stop = routings, stop_gradient

    def call(self, inputs_hat):
        inputs_hat_stopped = tf.stop_gradient(inputs_hat) if self.stop else inputs_hat
        b = tf.zeros(tf.shape(inputs_hat)[:3], dtype=inputs_hat.dtype)
        for i in range(self.routings):
            c = tf.nn.softmax(b, axis=1)
            if i == self.routings - 1:
                outputs = _exact_squash(tf.einsum("bjn,bjne->bje", c, inputs_hat))
            else:
                outputs = _exact_squash(tf.einsum("bjn,bjne->bje", c, inputs_hat_stopped))
                b += tf.einsum("bje,bjne->bjn", outputs, inputs_hat_stopped)
        return outputs, c


def margin_loss(y_true, y_pred):
    L = y_true * tf.square(tf.maximum(0., 0.9 - y_pred)) + 0.5 * (1 - y_true) * tf.square(tf.maximum(0., y_pred - 0.1))
    return tf.reduce_mean(tf.reduce_sum(L, 1))


def margin_loss_softmax(y_true, y_pred):
    return margin_loss(y_true, tf.nn.softmax(y_pred, axis=-1))


def reconstruction_mse(reconstruction, images):
    """0.0005 times Keras's 'mse': the mean over the pixels (channels-last images)."""
    flat = tf.reshape(images, (tf.shape(images)[0], -1))
    return 0.0005 * tf.reduce_mean(tf.reduce_mean(tf.square(reconstruction - flat), axis=-1))


ROUTE = {"layout": "batch classes in_caps dim", "iterations": 3}
PRED = {"layout": {"*": "batch classes in_caps out_dim in_dim", "weight": "classes in_caps out_dim in_dim"}}
LOSS = {"layout": "batch classes", "labels": "onehot", "order": ("labels", "lengths")}  # Keras: (y_true, y_pred)
CASES = [
    ("squash_keras_epsilon", "squash", squash, {"layout": "batch caps dim", "extremes": False, "profile": "ci"},
     "squash_epsilon_in_sqrt"),
    ("predictions", "predictions", predictions, PRED, None),
    ("predictions_tf32", "predictions", predictions_tf32, PRED, "tf32"),
    ("routing_layer", "routing", CapsuleRouting(3), ROUTE, None),
    ("routing_stop_gradient", "routing", CapsuleRouting(3, stop_gradient=True), {**ROUTE, "max_examples": 20},
     "detached_routing"),
    ("margin_loss", "margin_loss", margin_loss, LOSS, None),
    ("margin_loss_softmax", "margin_loss", margin_loss_softmax, LOSS, "margin_on_softmax"),
    ("reconstruction_mse", "reconstruction_loss", reconstruction_mse, {"layout": "batch height width channels"},
     "reconstruction_mean_over_pixels"),
]
