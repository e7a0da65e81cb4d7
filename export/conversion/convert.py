"""Turn the trained float models into what the device runs: a TFLite embedder and one ONNX graph.

- The backbone (a Keras model taking 0..255 pixels) becomes TFLite: full-integer int8 with
  uint8 input by default (raw pixels go in, no float preprocessing on the device), or
  float16 / float32. int8 calibration uses real preprocessed stacks, never random noise.
  Export and the quantization probe both convert through `saved_model_to_tflite`, so a
  converter setting found to matter is set in one place.
- The 28 forests become one ONNX graph, input N x 1280 float32, output N x 28 probabilities
  (one session instead of 28; measured much faster). Locations without a forest output 0.
"""

from __future__ import annotations

import csv
import io
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

QUANTIZATIONS = ("int8", "int8-float-stem", "float16", "float32")  # what a bundle may carry
# "int8-float-stem": int8 except the first FLOAT_STEM_OPS ops (input scaling, stem convolution,
# first depthwise convolution), kept in float. Measured on the real HPA stacks with Lite0: the
# stem carries most of the int8 error (4.5 quantization steps RMSE vs a median 0.31), and
# keeping it in float lifts the embedding cosine to float from mean 0.976 / min 0.911 to
# 0.993 / 0.985 at the same size; the input is then float32 (the agent casts the pixels).
FLOAT_STEM_OPS = 4
# Measured by `hpa-edge quant-probe`, never exported: int16 activations with int8 weights;
# int8 with every LOGISTIC and MUL op (swish, squeeze-excite) in float; int8 with the K ops
# TF's quantization debugger ranks worst (RMSE in quantization steps) in float.
PROBE_VARIANTS = ("int16x8", "int8-float-sigmoid", "int8-worst-K")
ONNX_OPSET = 17
ONNX_ML_OPSET = 3


def to_tflite(model: Any, quantization: str, calibration: Iterable[np.ndarray] | None = None) -> bytes:
    """The Keras backbone as a TFLite flatbuffer; int8 needs calibration images (uint8, H x W x 3)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
    with saved_model(model) as folder:
        return saved_model_to_tflite(folder, quantization, calibration)


@contextmanager
def saved_model(model: Any) -> Iterator[str]:
    """The Keras backbone as a SavedModel in a temporary folder, removed afterwards.

    Keras 3 models go through a SavedModel: from_keras_model expects the legacy tf_keras, and
    from_concrete_functions left weights as variables that every int8 variant failed on. One
    SavedModel can be converted several ways (the quantization probe does).
    """
    with tempfile.TemporaryDirectory(prefix="hpa-edge-savedmodel-") as folder:
        model.export(folder, format="tf_saved_model", verbose=False)
        yield folder


def saved_model_to_tflite(
    folder: str, variant: str, calibration: Iterable[np.ndarray] | None = None
) -> bytes:
    """A SavedModel as a TFLite flatbuffer: the one place a TFLiteConverter is built.

    `variant` is one of QUANTIZATIONS or of PROBE_VARIANTS (K a number of ops); every integer
    variant needs calibration images. int8 takes uint8 pixels as they are; the variants with
    float ops take float32 input.
    """
    import tensorflow as tf

    check_variant(variant)
    converter = tf.lite.TFLiteConverter.from_saved_model(folder)
    if variant == "float32":
        return bytes(converter.convert())
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
        return bytes(converter.convert())
    representative = _calibration_set(calibration)
    converter.representative_dataset = representative
    if variant == "int16x8":
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        ]
        return bytes(converter.convert())
    if variant == "int8":
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.float32
        return bytes(converter.convert())
    # int8 with some ops kept in float, chosen through TF's quantization debugger
    converter.target_spec.supported_ops = [
        tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
        tf.lite.OpsSet.TFLITE_BUILTINS,
    ]
    selective = tf.lite.experimental.QuantizationDebugger(
        converter=converter,
        debug_dataset=representative,
        debug_options=_float_ops(variant, converter, representative),
    )
    return bytes(selective.get_nondebug_quantized_model())


def check_variant(variant: str) -> None:
    """ValueError naming the choices unless `saved_model_to_tflite` knows the variant."""
    if variant in QUANTIZATIONS or variant in PROBE_VARIANTS or _worst_count(variant) is not None:
        return
    raise ValueError(
        f"unknown quantization {variant!r}; choose from {', '.join(QUANTIZATIONS + PROBE_VARIANTS)}"
    )


def _worst_count(variant: str) -> int | None:
    """K of 'int8-worst-K', None for any other variant."""
    found = re.fullmatch(r"int8-worst-(\d+)", variant)
    return int(found.group(1)) if found else None


def _float_ops(variant: str, converter: Any, representative: Any) -> Any:
    """The debugger options that keep the variant's ops in float."""
    import tensorflow as tf

    if variant == "int8-float-sigmoid":
        return tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=["LOGISTIC", "MUL"])
    debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=representative)
    debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    rows = list(csv.DictReader(io.StringIO(dump.getvalue())))  # in graph order
    worst = _worst_count(variant)
    if worst is None:  # int8-float-stem
        chosen = rows[:FLOAT_STEM_OPS]
    else:  # by RMSE in quantization steps, largest first
        chosen = sorted(
            rows, key=lambda r: -(float(r["mean_squared_error"] or 0) ** 0.5 / float(r["scale"] or 1))
        )[:worst]
    return tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=[r["tensor_name"] for r in chosen])


def _calibration_set(calibration: Iterable[np.ndarray] | None) -> Any:
    images = [np.asarray(image) for image in (calibration if calibration is not None else [])]
    if not images:
        raise ValueError("int8 quantization needs calibration images")

    def representative() -> Iterable[list[np.ndarray]]:
        for image in images:
            yield [image.astype(np.float32)[None]]

    return representative


def forests_to_onnx(forests: Sequence[Any], n_features: int) -> bytes:
    """One ONNX graph: 'embedding' N x n_features -> 'probabilities' N x len(forests)."""
    import onnx
    from onnx import TensorProto, helper
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    nodes: list[Any] = []
    initializers: list[Any] = [
        helper.make_tensor("one_start", TensorProto.INT64, [1], [1]),
        helper.make_tensor("one_end", TensorProto.INT64, [1], [2]),
        helper.make_tensor("one_axis", TensorProto.INT64, [1], [1]),
        helper.make_tensor("zero_column", TensorProto.FLOAT, [n_features, 1], np.zeros(n_features)),
    ]
    columns: list[str] = []
    for j, forest in enumerate(forests):
        column = f"p{j}"
        columns.append(column)
        if forest is None:
            nodes.append(helper.make_node("MatMul", ["embedding", "zero_column"], [column], name=f"zero{j}"))
            continue
        graph = convert_sklearn(
            forest,
            initial_types=[("embedding", FloatTensorType([None, n_features]))],
            options={id(forest): {"zipmap": False}},
            target_opset={"": ONNX_OPSET, "ai.onnx.ml": ONNX_ML_OPSET},
        ).graph
        prefix = f"l{j}_"
        rename = {o.name: prefix + o.name for o in graph.output}
        for node in graph.node:
            node.name = prefix + node.name
            node.input[:] = [i if i == "embedding" else prefix + i for i in node.input]
            node.output[:] = [prefix + o for o in node.output]
            nodes.append(node)
        for init in graph.initializer:
            init.name = prefix + init.name
            initializers.append(init)
        probabilities = rename[graph.output[1].name]  # [label, probabilities]; classes are [0, 1]
        nodes.append(
            helper.make_node(
                "Slice", [probabilities, "one_start", "one_end", "one_axis"], [column], name=f"take{j}"
            )
        )
    nodes.append(helper.make_node("Concat", columns, ["probabilities"], axis=1, name="concat"))
    graph = helper.make_graph(
        nodes,
        "hpa_edge_classifiers",
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [None, n_features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, len(forests)])],
        initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid("ai.onnx.ml", ONNX_ML_OPSET)],
        producer_name="hpa-edge",
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())
