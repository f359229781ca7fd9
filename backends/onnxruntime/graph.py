"""The model's inference graph in ONNX, built from the canonical parameters with onnx.helper.

The onnxruntime backend runs it; `capsspec export` (capsspec.tools.onnx_export) writes it to a file.

The graph is written node by node from the spec (no framework's tracer in between), so every
step below is the reference's arithmetic (capsspec/ops.py, model.py) spelled in ONNX operators:

    images (batch, C, H, W) float32
      -> Conv -> Relu                                           conv1
      -> Conv -> Reshape (B, T, D, Gh, Gw) -> Transpose (B, T, Gh, Gw, D) -> Reshape (B, N, D)
         -> squash                                              PrimaryCaps, capsule i = (t*Gh + y)*Gw + x
      -> MatMul with digit.weight as (N, D, J*E)                predictions u_hat
      -> routing, unrolled: softmax over the parents j of logits that start at 0 per example
         (with none_of_the_above, over them and one more 0 logit, Concat then Slice),
         s = c . u_hat, v = squash(s), logits += u_hat . v (not after the last iteration)
      -> lengths = sqrt(sum v^2)    predicted = ArgMax(lengths)  (first maximum: ties go to the lowest index)
      -> mask by the longest capsule (ArgMax of sum v^2, as the reference's mask) -> decoder
         (Gemm + Relu, ..., Gemm + sigmoid written as 0.5 (1 + tanh(z / 2)), as the reference)

squash is the reference's form: n = |s|; f = 1 / (n + 1/n) where n > 0, else 0; v = f s. The
division runs on n where n > 0 and on 1 elsewhere (a Where before the Reciprocal), so a zero
vector yields exactly 0 and no inf or NaN is ever formed, with no epsilon anywhere.

Routing is unrolled rather than a Loop: the iteration count is part of the checkpoint's config,
so the graph is static; an unrolled graph is a dozen nodes per iteration (the weights are
shared, not copied), every runtime and graph optimizer handles it (a Loop body is a subgraph that
ONNX Runtime's fusions and constant folding do not cross, and that the mobile and web runtimes
support less fully), and the execution is exactly the reference's sequence of operations.

Outputs: "lengths" (B, J), "predicted" (B,) int64, "reconstruction" (B, C*H*W) when the config
has a decoder, and "v" (B, J, E) and "coupling" (B, N, J) (what the spec's forward returns). The
batch dimension is dynamic ("batch"). The initializers are the canonical parameters under their
canonical names and shapes, unchanged; the model's metadata holds the config as JSON.

float32 only: ONNX Runtime's CPU provider has no float64 Conv kernel (checked with onnxruntime
1.32: "Could not find an implementation for Conv(11)"), so a float64 graph would not run there.
A float64 checkpoint is exported as a float32 model (its parameters rounded once), and says so.

with_labels=True builds a variant with a second input "labels" (B,) int64 that masks by the true
class instead of the longest capsule (the spec's forward with labels); the exported file never
has it. The onnx package is imported when a function here is called, never at import time.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, NamedTuple

import numpy as np

from capsspec.config import CapsNetConfig
from capsspec.version import __version__

__all__ = ["OPSET", "INPUT_NAME", "LABELS_NAME", "OUTPUT_NAMES", "build_model", "model_bytes"]

OPSET = 17  # every operator used here is unchanged since opset 13; 17 is widely supported by runtimes
IR_VERSION = 8  # the lowest IR version that carries opset 17, so older runtimes can load the file
INPUT_NAME = "images"
LABELS_NAME = "labels"
OUTPUT_NAMES = ("lengths", "predicted", "reconstruction", "v", "coupling")


def load_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise ValueError("ONNX export needs the onnx package: pip install 'capsspec[onnx]'") from exc
    return onnx


class _Graph:
    """A small builder: fresh names, constants as initializers, nodes in order."""

    def __init__(self, onnx: Any) -> None:
        self.onnx = onnx
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value: np.ndarray, hint: str = "const") -> str:
        name = self.name(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def param(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(self.onnx.numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: list[str] | None = None,
           **attrs: Any) -> str:
        outs = outputs or [self.name(hint or op_type.lower())]
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, outs, name=self.name(op_type), **attrs))
        return outs[0]


class _Consts(NamedTuple):
    """The graph's shared constants."""

    last_axis: str
    zero: str
    one: str
    half: str


def _squash(g: _Graph, s: str, axis_const: str, zero: str, one: str, hint: str) -> str:
    """The reference's squash along the last axis: f(|s|) s with f = 1 / (n + 1/n), 0 where n = 0."""
    sq = g.op("ReduceSum", [g.op("Mul", [s, s]), axis_const], keepdims=1)
    n = g.op("Sqrt", [sq], hint=f"{hint}_norm")
    nonzero = g.op("Greater", [n, zero])
    safe_n = g.op("Where", [nonzero, n, one])  # 1 where n = 0: nothing below divides by zero
    f = g.op("Reciprocal", [g.op("Add", [safe_n, g.op("Reciprocal", [safe_n])])])
    f = g.op("Where", [nonzero, f, zero])
    return g.op("Mul", [f, s], hint=hint)


def _conv2d(g: _Graph, x: str, weight: str, bias: str, stride: int, hint: str) -> str:
    """The reference's conv2d: no padding, square stride."""
    return g.op("Conv", [x, weight, bias], strides=[stride] * 2, hint=hint)


def _primary_capsules(g: _Graph, k: _Consts, h1: str, p: dict[str, str], c: CapsNetConfig) -> str:
    """PrimaryCaps: the convolution (no ReLU: squash is its non-linearity), regrouped into (B, N, D) capsules."""
    gh, gw = c.primary_grid
    a = _conv2d(g, h1, p["primary.weight"], p["primary.bias"], c.primary_stride, "primary_conv")
    # Channels o = t*D + d moved last before the reshape: capsule i = (t*Gh + y)*Gw + x, dim d.
    # A 0 in a Reshape shape copies that dimension (the dynamic batch).
    a = g.op("Reshape", [a, g.const(np.array([0, c.primary_types, c.primary_dim, gh, gw], np.int64), "shape")])
    a = g.op("Transpose", [a], perm=[0, 1, 3, 4, 2])
    s_primary = g.op("Reshape", [a, g.const(np.array([0, c.num_primary, c.primary_dim], np.int64), "shape")])
    return _squash(g, s_primary, k.last_axis, k.zero, k.one, "u")


def _predictions(g: _Graph, u: str, p: dict[str, str], c: CapsNetConfig) -> str:
    """u_hat[b, i, j, e] = W[i, j, e, :] @ u[b, i]: one (B, D) x (D, J*E) product per child capsule; (B, J, N, E)."""
    n_caps, j, e, d = c.num_primary, c.num_classes, c.class_dim, c.primary_dim
    w = g.op("Reshape", [p["digit.weight"], g.const(np.array([n_caps, j * e, d], np.int64), "shape")])
    w = g.op("Transpose", [w], perm=[0, 2, 1])  # (N, D, J*E); constant-folded by the runtime
    u_t = g.op("Transpose", [u], perm=[1, 0, 2])  # (N, B, D)
    uh = g.op("MatMul", [u_t, w])  # (N, B, J*E)
    uh = g.op("Reshape", [uh, g.const(np.array([n_caps, 0, j, e], np.int64), "shape")])
    return g.op("Transpose", [uh], perm=[1, 2, 0, 3], hint="u_hat")  # (B, J, N, E): both routing products are MatMuls


def _routing(g: _Graph, k: _Consts, uh: str, c: CapsNetConfig) -> tuple[str, str]:
    """Routing by agreement, unrolled: (v (B, J, E), coupling (B, J, N) of the last iteration)."""
    helper, TP = g.onnx.helper, g.onnx.TensorProto
    # The logits start at 0 for each example: (B, J, N) zeros.
    batch = g.op("Slice", [g.op("Shape", [INPUT_NAME]), g.const(np.array([0], np.int64)),
                           g.const(np.array([1], np.int64))])
    logits_shape = g.op("Concat", [batch, g.const(np.array([c.num_classes, c.num_primary], np.int64), "shape")],
                        axis=0)
    logits = g.op("ConstantOfShape", [logits_shape], value=helper.make_tensor("zero", TP.FLOAT, [1], [0.0]),
                  hint="logits")
    nowhere = ""
    if c.none_of_the_above:  # one more logit per child, fixed at 0, that no class stands for: (B, 1, N) zeros
        nowhere_shape = g.op("Concat", [batch, g.const(np.array([1, c.num_primary], np.int64), "shape")], axis=0)
        nowhere = g.op("ConstantOfShape", [nowhere_shape], value=helper.make_tensor("zero", TP.FLOAT, [1], [0.0]),
                       hint="none_of_the_above")
    v = coupling = ""
    for t in range(c.routing_iterations):
        if nowhere:  # softmax over the J parents and the 0 logit (its own shift counts it), then the J kept
            both = g.op("Softmax", [g.op("Concat", [logits, nowhere], axis=1)], axis=1)
            coupling = g.op("Slice", [both, g.const(np.array([0], np.int64)),
                                      g.const(np.array([c.num_classes], np.int64)),
                                      g.const(np.array([1], np.int64))], hint=f"c{t}")
        else:
            coupling = g.op("Softmax", [logits], axis=1, hint=f"c{t}")  # over the parents j
        s = g.op("MatMul", [g.op("Unsqueeze", [coupling, g.const(np.array([2], np.int64))]), uh])  # (B, J, 1, E)
        s = g.op("Squeeze", [s, g.const(np.array([2], np.int64))], hint=f"s{t}")  # (B, J, E)
        v = _squash(g, s, k.last_axis, k.zero, k.one, f"v{t}")
        if t + 1 < c.routing_iterations:  # the last update of the logits cannot change any output
            agree = g.op("MatMul", [uh, g.op("Unsqueeze", [v, g.const(np.array([3], np.int64))])])  # (B, J, N, 1)
            logits = g.op("Add", [logits, g.op("Squeeze", [agree, g.const(np.array([3], np.int64))])], hint="logits")
    return v, coupling


def _capsule_lengths(g: _Graph, k: _Consts, v: str) -> str:
    """The output "lengths" = sqrt(sum v^2); returns the squared lengths (what mask compares)."""
    sq_len = g.op("ReduceSum", [g.op("Mul", [v, v]), k.last_axis], keepdims=0, hint="squared_lengths")
    g.op("Sqrt", [sq_len], outputs=["lengths"])
    return sq_len


def _mask(g: _Graph, v: str, sq_len: str, c: CapsNetConfig, with_labels: bool) -> str:
    """The capsules masked to one class, flattened class-major (B, J*E): the labelled class with_labels,
    else the longest capsule (the reference's mask picks the largest squared length, first maximum)."""
    j, e = c.num_classes, c.class_dim
    if with_labels:
        keep = LABELS_NAME
    else:
        keep = g.op("ArgMax", [sq_len], axis=1, keepdims=0, select_last_index=0, hint="kept_class")
    onehot = g.op("Equal", [g.op("Unsqueeze", [keep, g.const(np.array([1], np.int64))]),
                            g.const(np.arange(j, dtype=np.int64), "classes")])  # (B, J) bool
    onehot = g.op("Cast", [onehot], to=g.onnx.TensorProto.FLOAT)
    masked = g.op("Mul", [v, g.op("Unsqueeze", [onehot, g.const(np.array([2], np.int64))])])
    return g.op("Reshape", [masked, g.const(np.array([0, j * e], np.int64), "shape")], hint="masked")  # class-major


def _decoder(g: _Graph, k: _Consts, h: str, p: dict[str, str], c: CapsNetConfig) -> None:
    """The output "reconstruction": Gemm + Relu per layer, the last one's sigmoid as 0.5 (1 + tanh(z / 2))."""
    layers = c.num_decoder_layers
    for n in range(layers):
        z = g.op("Gemm", [h, p[f"decoder.{n}.weight"], p[f"decoder.{n}.bias"]], transB=1, hint=f"decoder{n}")
        if n + 1 < layers:
            h = g.op("Relu", [z])
        else:  # the reference's sigmoid: 0.5 (1 + tanh(z / 2)), which never overflows
            th = g.op("Tanh", [g.op("Mul", [z, k.half])])
            g.op("Mul", [g.op("Add", [th, k.one]), k.half], outputs=["reconstruction"])


def build_model(params: Mapping[str, np.ndarray], config: CapsNetConfig, *, with_labels: bool = False,
                doc: str = "") -> Any:
    """The inference graph of `config` holding `params` (canonical float32 arrays) as an onnx.ModelProto.

    params are assumed to match config (the caller checks them: capsspec.validation.check_params).
    """
    onnx = load_onnx()
    helper, TP = onnx.helper, onnx.TensorProto
    c = config
    dt = np.float32
    j, e = c.num_classes, c.class_dim
    g = _Graph(onnx)
    k = _Consts(last_axis=g.const(np.array([-1], np.int64), "axis_last"), zero=g.const(np.array(0, dt), "zero"),
                one=g.const(np.array(1, dt), "one"), half=g.const(np.array(0.5, dt), "half"))
    p = {name: g.param(name, np.ascontiguousarray(v, dtype=dt)) for name, v in params.items()}

    h1 = g.op("Relu", [_conv2d(g, INPUT_NAME, p["conv1.weight"], p["conv1.bias"], c.conv1_stride, "conv1")],
              hint="conv1_relu")
    u = _primary_capsules(g, k, h1, p, c)
    v, coupling = _routing(g, k, _predictions(g, u, p, c), c)
    g.op("Identity", [v], outputs=["v"])
    g.op("Transpose", [coupling], perm=[0, 2, 1], outputs=["coupling"])  # (B, N, J)
    sq_len = _capsule_lengths(g, k, v)
    # ONNX's ArgMax takes the first maximum unless select_last_index=1: ties go to the lowest class.
    g.op("ArgMax", ["lengths"], axis=1, keepdims=0, select_last_index=0, outputs=["predicted"])

    inputs = [helper.make_tensor_value_info(INPUT_NAME, TP.FLOAT, ["batch", *c.input_shape])]
    outputs = [helper.make_tensor_value_info("lengths", TP.FLOAT, ["batch", j]),
               helper.make_tensor_value_info("predicted", TP.INT64, ["batch"])]
    if c.use_decoder:
        if with_labels:
            inputs.append(helper.make_tensor_value_info(LABELS_NAME, TP.INT64, ["batch"]))
        _decoder(g, k, _mask(g, v, sq_len, c, with_labels), p, c)
        outputs.append(helper.make_tensor_value_info("reconstruction", TP.FLOAT, ["batch", c.image_size]))
    outputs += [helper.make_tensor_value_info("v", TP.FLOAT, ["batch", j, e]),
                helper.make_tensor_value_info("coupling", TP.FLOAT, ["batch", c.num_primary, j])]

    graph = helper.make_graph(g.nodes, "capsnet", inputs, outputs, initializer=g.initializers,
                              doc_string="CapsNet inference (capsspec): images in [0, 1], NCHW float32")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="capsspec",
                              doc_string=doc)
    model.ir_version = IR_VERSION

    meta = {"capsspec_version": __version__, "config": json.dumps(c.to_dict(), sort_keys=True),
            "routing": f"{c.routing_iterations} iterations, unrolled"
                       + (", with the none-of-the-above logit" if c.none_of_the_above else ""),
            "outputs": ", ".join(o.name for o in outputs)}
    helper.set_model_props(model, meta)
    return model


def model_bytes(params: Mapping[str, np.ndarray], config: CapsNetConfig, *, with_labels: bool = False) -> bytes:
    """The serialized model of build_model (what an InferenceSession takes)."""
    return build_model(params, config, with_labels=with_labels).SerializeToString()


