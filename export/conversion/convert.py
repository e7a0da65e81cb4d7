"""Turn the trained float models into what the device runs: a TFLite embedder and one ONNX graph.

- The backbone (a Keras model taking 0..255 pixels) becomes TFLite: full-integer int8 with
  uint8 input by default (raw pixels go in, no float preprocessing on the device), or
  float16 / float32. int8 calibration uses real preprocessed stacks, never random noise.
- The 28 forests become one ONNX graph, input N x 1280 float32, output N x 28 probabilities
  (one session instead of 28; measured much faster). Locations without a forest output 0.
"""

from __future__ import annotations

import csv
import io
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

QUANTIZATIONS = ("int8", "int8-float-stem", "float16", "float32")
# "int8-float-stem": int8 except the first FLOAT_STEM_OPS ops (input scaling, stem convolution,
# first depthwise convolution), kept in float. Measured on the real HPA stacks with Lite0: the
# stem carries most of the int8 error (4.5 quantization steps RMSE vs a median 0.31), and
# keeping it in float lifts the embedding cosine to float from mean 0.976 / min 0.911 to
# 0.993 / 0.985 at the same size; the input is then float32 (the agent casts the pixels).
FLOAT_STEM_OPS = 4
ONNX_OPSET = 17
ONNX_ML_OPSET = 3


def to_tflite(model: Any, quantization: str, calibration: Iterable[np.ndarray] | None = None) -> bytes:
    """The Keras backbone as a TFLite flatbuffer; int8 needs calibration images (uint8, H x W x 3)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
    # Keras 3 models go through a SavedModel: from_keras_model expects the legacy tf_keras, and
    # from_concrete_functions left weights as variables that every int8 variant failed on.
    with tempfile.TemporaryDirectory(prefix="hpa-edge-savedmodel-") as folder:
        model.export(folder, format="tf_saved_model", verbose=False)
        if quantization == "int8-float-stem":
            return _convert_with_float_stem(folder, calibration)
        return _convert_saved_model(folder, quantization, calibration)


def _calibration_set(calibration: Iterable[np.ndarray] | None) -> Any:
    images = [np.asarray(image) for image in (calibration if calibration is not None else [])]
    if not images:
        raise ValueError("int8 quantization needs calibration images")

    def representative() -> Iterable[list[np.ndarray]]:
        for image in images:
            yield [image.astype(np.float32)[None]]

    return representative


def _convert_with_float_stem(folder: str, calibration: Iterable[np.ndarray] | None) -> bytes:
    """int8 with the first ops in float, chosen by name from TF's quantization debugger."""
    import tensorflow as tf

    representative = _calibration_set(calibration)
    converter = tf.lite.TFLiteConverter.from_saved_model(folder)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [
        tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
        tf.lite.OpsSet.TFLITE_BUILTINS,
    ]
    debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=representative)
    debugger.run()
    buffer = io.StringIO()
    debugger.layer_statistics_dump(buffer)
    first = [row["tensor_name"] for row in csv.DictReader(io.StringIO(buffer.getvalue()))][:FLOAT_STEM_OPS]
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=first)
    selective = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=representative, debug_options=options
    )
    return bytes(selective.get_nondebug_quantized_model())


def _convert_saved_model(folder: str, quantization: str, calibration: Iterable[np.ndarray] | None) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(folder)
    if quantization == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "int8":
        representative = _calibration_set(calibration)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.float32
    return bytes(converter.convert())


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
