"""Label whole images with trained patch classifiers, run densely (exact at every pixel).

    seg = Segmenter(["a.safetensors", "b.safetensors"], tta=True)
    probs = seg.probabilities(image)           # (K, H, W): mean over checkpoints and 8 symmetries
    labels = seg.labels(probs)                 # (H, W): the checkpoint's threshold for two classes
    predict_files(seg, files, "out/")          # <stem>_labels.png, _prob.png, _overlay.png per image

Test-time augmentation averages the softmax over the 8 symmetries of the square, each one dense pass
mapped back: ``mean_k dihedral_inverse(softmax(dense(dihedral(x, k))), k)``. Several checkpoints
(model averaging) must share their classes; each keeps its own patch size, border and preprocessing.

Files are written one image at a time (memory bounded by one image), each output atomically, so an
interrupted run leaves complete files only and a rerun skips the images whose outputs all exist.

A volume checkpoint (``cnnkit segment train --volume``) labels volumes instead (``predict_volumes``,
``evaluate_volumes``): <stem>_labels.tif and <stem>_prob.tif, multi-page TIFFs with one page per slice.
Test-time augmentation then uses the flips and quarter turns of the slice plane (H, W) that training
drew from; depth is never flipped.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from cnnkit.dense import densify
from cnnkit.dense.net import DenseNet
from cnnkit.errors import CheckpointError, ConfigError, DataError
from cnnkit.models import create_patch_net
from cnnkit.models.patch import user_patch_builder
from cnnkit.segmentation.augment import dihedral, dihedral_inverse, preprocess
from cnnkit.segmentation.data import IGNORE_INDEX, IMAGE_SUFFIXES, decode_mask, load_image
from cnnkit.segmentation.metrics import SegmentationMeter
from cnnkit.segmentation.volume import VolumeMode, check_mask_shape, load_mask_volume, load_volume, volume_probabilities
from cnnkit.train.checkpoint import Checkpoint, load_checkpoint, load_weights
from cnnkit.train.checkpoint_schema import check_model_plan
from cnnkit.utils import atomic_path, ensure_writable_dir

log = logging.getLogger(__name__)

REQUIRED_META = ("patch", "border", "preprocess")
# distinct, readable colours first (Sasha Trubetskoy's list); more classes get colours from the
# bit-spread VOC map, which gives every index below 2^24 its own colour
BASE_COLOURS = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48),
                (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
                (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
                (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
                (255, 255, 255)]


@dataclass
class _Member:
    """One checkpoint, ready to run."""

    dense: DenseNet
    preprocess: dict
    source: str


@dataclass
class PredictSummary:
    written: int  # images whose outputs were written
    skipped: int  # images whose outputs all existed
    stale_tmp_removed: int  # temporary files an interrupted run had left


def load_segment_checkpoint(checkpoint: str | Path | Checkpoint, allow_code: Sequence[str] = ()) -> Checkpoint:
    """Read a ``cnnkit segment train`` checkpoint and check it before anything is built.

    A net named ``package.module:function`` is imported only if that exact string is in ``allow_code``.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    source = ckpt.meta.get("path", "checkpoint")
    task = ckpt.meta.get("task", "classify")
    if task == "classify":
        raise CheckpointError(f"{source} is an image classification checkpoint; evaluate it with `cnnkit eval`, "
                              "or pass a checkpoint from `cnnkit segment train`")
    if task != "segment":
        raise CheckpointError(f"{source} is a {task!r} checkpoint, not a segmentation one; pass a checkpoint "
                              "from `cnnkit segment train`")
    missing = [k for k in REQUIRED_META if k not in ckpt.meta]
    if missing:
        raise CheckpointError(f"{source} lacks {', '.join(missing)} in its metadata; pass a checkpoint "
                              "written by `cnnkit segment train`")
    if ":" in ckpt.model_name and ckpt.model_name not in allow_code:
        raise CheckpointError(f"{source} builds its net by importing {ckpt.model_name!r}, which loading never "
                              f"does on its own; pass --model {ckpt.model_name} (allow_code) if you trust it")
    return ckpt


class Segmenter:
    """One checkpoint or several (their probabilities averaged), with optional 8-fold TTA.

    threshold: "auto" (the first checkpoint's, for two classes; None there means argmax), None (argmax)
    or a float: predict ``positive`` when its probability is >= threshold.
    max_memory: bytes of working memory per dense pass (images are tiled, results identical).
    """

    def __init__(self, checkpoints: str | Path | Checkpoint | Sequence[str | Path | Checkpoint], *,
                 tta: bool = True, max_memory: int | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, threshold: float | str | None = "auto",
                 allow_code: str | Sequence[str] = ()):
        if isinstance(checkpoints, (str, Path, Checkpoint)):
            checkpoints = [checkpoints]
        allow = (allow_code,) if isinstance(allow_code, str) else tuple(allow_code)
        ckpts = [load_segment_checkpoint(c, allow) for c in checkpoints]
        if not ckpts:
            raise CheckpointError("no checkpoint given; pass at least one from `cnnkit segment train`")
        first = ckpts[0]
        self.tta, self.device, self.dtype = tta, torch.device(device), dtype
        self.classes = list(first.classes)
        self.meta = first.meta
        self.volume = VolumeMode.from_meta(first.meta)
        self.positive = int(first.meta.get("positive_class", 1))
        self.members = [self._member(c, max_memory) for c in ckpts]
        self._check_agree(ckpts)
        self.in_channels = self.members[0].dense.in_channels
        if threshold == "auto":
            threshold = first.meta.get("threshold") if self.num_classes == 2 else None
            others = {c.meta.get("threshold") for c in ckpts[1:]} - {threshold}
            if others and self.num_classes == 2:
                log.warning("the checkpoints were tuned to different thresholds; using the first's, %s", threshold)
        elif threshold is not None and self.num_classes != 2:
            raise ConfigError(f"threshold {threshold} applies to two classes but {self.members[0].source} has "
                              f"{self.num_classes}; drop the threshold (argmax is used)")
        self.threshold = None if threshold is None else float(threshold)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _member(self, ckpt: Checkpoint, max_memory: int | None) -> _Member:
        source = ckpt.meta.get("path", "checkpoint")
        if ":" in ckpt.model_name:  # import the user's module off the meta device: tensors made at import stay real
            user_patch_builder(ckpt.model_name)
        build = partial(create_patch_net, ckpt.model_name, **ckpt.model_options)
        check_model_plan(lambda: build()[0], {k: v.shape for k, v in ckpt.model_state.items()}, source,
                         ckpt.model_name)
        model, patch = build()
        load_weights(model, ckpt.model_state, source=source)
        model.to(device=self.device, dtype=self.dtype).eval()
        if tuple(ckpt.meta["patch"]) != tuple(patch):
            raise CheckpointError(f"{source} was trained on {ckpt.meta['patch']} patches but its net "
                                  f"{ckpt.model_name!r} takes {list(patch)}; pass the checkpoint with its own net")
        volume = VolumeMode.from_meta(ckpt.meta)
        dims = 3 if volume is not None and volume.mode == "3d" else 2
        if len(patch) != dims:
            raise CheckpointError(f"{source} was trained {'on volumes in 3D' if dims == 3 else 'in 2D'} but its net "
                                  f"{ckpt.model_name!r} is {len(patch)}D; the file is damaged or was not written "
                                  "by cnnkit")
        dense = densify(model, patch, border=ckpt.meta["border"], max_memory=max_memory)
        if dense.num_classes != len(ckpt.classes):
            raise CheckpointError(f"{source}: the net gives {dense.num_classes} outputs but the checkpoint names "
                                  f"{len(ckpt.classes)} classes; pass a checkpoint from `cnnkit segment train`")
        return _Member(dense, dict(ckpt.meta["preprocess"]), source)

    def _check_agree(self, ckpts: list[Checkpoint]) -> None:
        for ckpt, member in zip(ckpts[1:], self.members[1:]):
            if list(ckpt.classes) != self.classes:
                raise CheckpointError(f"{member.source} has classes {ckpt.classes} but {self.members[0].source} has "
                                      f"{self.classes}; average only checkpoints of the same classes")
            if member.dense.in_channels != self.members[0].dense.in_channels:
                raise CheckpointError(f"{member.source} takes {member.dense.in_channels} image channels but "
                                      f"{self.members[0].source} takes {self.members[0].dense.in_channels}; "
                                      "average only checkpoints for the same images")
            if VolumeMode.from_meta(ckpt.meta) != self.volume:
                def mode(v):
                    return "2D images" if v is None else f"--volume {v.spec()}"
                raise CheckpointError(f"{member.source} was trained with {mode(VolumeMode.from_meta(ckpt.meta))} but "
                                      f"{self.members[0].source} with {mode(self.volume)}; average only checkpoints "
                                      "of one kind")
            if int(ckpt.meta.get("positive_class", 1)) != self.positive:
                raise CheckpointError(f"{member.source} and {self.members[0].source} have different positive "
                                      "classes; average only checkpoints of the same task")

    @torch.no_grad()
    def probabilities(self, image: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """(K, H, W) class probabilities on the CPU for an image (C, H, W) as loaded (in [0, 1]);
        ``valid`` (H, W) bool is the region the preprocessing takes its statistics from."""
        image = image.to(self.device, self.dtype)
        valid = None if valid is None else valid.to(self.device)
        # the symmetries the net was trained with (all 8 for checkpoints that do not say)
        transforms = self.meta.get("symmetries", list(range(8))) if self.tta else (0,)
        total = None
        for member in self.members:
            x = preprocess(image, valid, **member.preprocess)  # (C, H, W)
            for k in transforms:
                p = dihedral_inverse(torch.softmax(member.dense(dihedral(x, k)[None]), 1)[0], k)  # (K, H, W)
                total = p if total is None else total.add_(p)
        return total.div_(len(self.members) * len(transforms)).cpu()

    def labels(self, probs: torch.Tensor) -> torch.Tensor:
        """(H, W) int64 classes: the threshold on the positive class for two classes, else argmax."""
        if self.threshold is not None and self.num_classes == 2:
            pos = probs[self.positive] >= self.threshold
            return torch.where(pos, self.positive, 1 - self.positive)
        return probs.argmax(0)


# --------------------------------------------------------------------------- files


def image_files(items: Sequence[str | Path]) -> list[Path]:
    """Image files given as files or folders (a folder's image files, sorted by name)."""
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p} is neither an image file nor a folder; check the path")
    if not files:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(map(str, items))}")
    return files


def class_colours(k: int, palette: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """(K, 3) uint8: ``palette`` first, then distinct colours not in it, one per class (class 0 too)."""
    colours = [tuple(int(v) for v in c) for c in (palette or [])][:k]
    used = set(colours)
    candidates = (BASE_COLOURS[i] if i < len(BASE_COLOURS) else _voc_colour(i - len(BASE_COLOURS) + 1)
                  for i in range(2**24 + len(BASE_COLOURS)))
    for c in candidates:
        if len(colours) >= k:
            break
        if c not in used:
            colours.append(c)
            used.add(c)
    return np.array(colours, dtype=np.uint8).reshape(k, 3)


def _voc_colour(i: int) -> tuple[int, int, int]:
    """PASCAL VOC's colour map: the bits of i spread over r, g, b from the most significant bit down."""
    rgb = [0, 0, 0]
    for shift in range(8):
        for ch in range(3):
            rgb[ch] |= ((i >> (3 * shift + ch)) & 1) << (7 - shift)
    return rgb[0], rgb[1], rgb[2]


def output_names(stem: str, num_classes: int) -> list[str]:
    """Files written for an image: labels, probabilities (one file for two classes), overlay."""
    probs = [f"{stem}_prob.png"] if num_classes == 2 else [f"{stem}_prob_{k}.png" for k in range(num_classes)]
    return [f"{stem}_labels.png", *probs, f"{stem}_overlay.png"]


def read_valid(path: Path, size: tuple[int, int], image: Path) -> torch.Tensor:
    """(H, W) bool valid region (nonzero = valid) of ``image``, which is ``size`` (H, W)."""
    region = decode_mask(path, "binary") != 0
    if tuple(region.shape) != size:
        raise DataError(f"valid-region mask {path} is {region.shape[1]}x{region.shape[0]} but image {image.name} "
                        f"is {size[1]}x{size[0]}; pass the region mask made for this image")
    return region


def _load(segmenter: Segmenter, path: Path) -> torch.Tensor:
    image = load_image(path)
    if image.shape[0] != segmenter.in_channels:
        raise DataError(f"image {path} has {image.shape[0]} channels but the model takes "
                        f"{segmenter.in_channels}; convert it (grey <-> RGB) first")
    return image


def _arrays(segmenter: Segmenter, image: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor,
            colours: np.ndarray) -> list[np.ndarray]:
    """The arrays of :func:`output_names`, in that order."""
    k = probs.shape[0]
    lab = labels.numpy().astype(np.uint8 if k <= 256 else np.uint16)
    p16 = (probs.clamp(0, 1).double().numpy() * 65535 + 0.5).astype(np.uint16)
    prob_maps = [p16[segmenter.positive]] if k == 2 else list(p16)
    rgb = image.numpy()
    rgb = np.repeat(rgb[:1], 3, 0) if rgb.shape[0] != 3 else rgb
    rgb = rgb.transpose(1, 2, 0).clip(0, 1) * 255  # (H, W, 3)
    overlay = 0.5 * rgb + 0.5 * colours[labels.numpy()]  # every class is tinted, class 0 included
    return [lab, *prob_maps, (overlay + 0.5).clip(0, 255).astype(np.uint8)]


def _save_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, format="PNG")


def _save_tiff(arr: np.ndarray, path: Path) -> None:
    """(D, H, W) -> a multi-page TIFF, one grey page per slice (never read as RGB, whatever D is)."""
    import tifffile

    tifffile.imwrite(path, arr, photometric="minisblack")


def _write_all(out: Path, names: list[str], arrays: list[np.ndarray], save=_save_png) -> None:
    """Write every output of one image atomically; after a failure none of them is left."""
    written = []
    try:
        for name, arr in zip(names, arrays):
            with atomic_path(out / name) as tmp:  # a failed write (disk full, ...) is an OutputError
                save(arr, tmp)
            written.append(out / name)
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise


def _remove_stale_tmp(out: Path, names: set[str]) -> int:
    """Temporary files (``.<name>.XXXXXXXX.tmp`` from atomic_path) that a killed run left for ``names``;
    those of other images are left alone (another process may be writing them)."""
    removed = 0
    for p in out.iterdir():
        parts = p.name[1:].rsplit(".", 2)
        if p.name.startswith(".") and len(parts) == 3 and parts[2] == "tmp" and parts[0] in names:
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def _check_unique(paths: Sequence[Path], name_of, what: str) -> None:
    """Two inputs of one name would write the same outputs: refused before anything is written."""
    seen: dict[str, Path] = {}
    for p in paths:
        if seen.setdefault(name_of(p), p) != p:
            raise DataError(f"{what} {seen[name_of(p)]} and {p} have the same name and would write the same outputs; "
                            "rename one or predict them into separate folders")


def _decoding(segmenter: Segmenter, positive, mask_mode, palette, ignore_value) -> tuple:
    """(positive, mask_mode, palette, ignore_value): the arguments given, else the checkpoint's."""
    meta, k = segmenter.meta, segmenter.num_classes
    positive = segmenter.positive if positive is None else positive
    if not 0 <= positive < k:
        raise DataError(f"positive class {positive} is not one of the {k} classes (0..{k - 1}); pass one of them")
    return (positive, mask_mode or meta.get("mask_mode") or "auto",
            palette if palette is not None else meta.get("palette"),
            ignore_value if ignore_value is not None else meta.get("ignore_value"))


def predict_files(segmenter: Segmenter, files: Sequence[Path], out: str | Path, *,
                  valid_files: Sequence[Path | None] | None = None, rank: int = 0, world_size: int = 1,
                  overwrite: bool = False, progress: bool | None = None) -> PredictSummary:
    """Label ``files[rank::world_size]`` into folder ``out``, one image at a time (see module doc).

    valid_files: one region mask per file (or None entries). An image that cannot be read or has the
    wrong number of channels is a DataError, and none of its outputs is written.
    """
    files = [Path(f) for f in files]
    valid_files = list(valid_files) if valid_files is not None else [None] * len(files)
    if len(valid_files) != len(files):
        raise DataError(f"{len(valid_files)} valid-region masks for {len(files)} images; give one per image")
    _check_unique(files, lambda f: f.stem, "images")
    # said once the first image has loaded, so that a bad input's stderr stays its one error line
    warn_valid = bool(segmenter.meta.get("valid_region")) and all(v is None for v in valid_files)
    out = ensure_writable_dir(out)
    mine = list(zip(files, valid_files))[rank::world_size]
    k = segmenter.num_classes
    removed = _remove_stale_tmp(out, {n for f, _ in mine for n in output_names(f.stem, k)})
    if removed:
        log.info("removed %d temporary files left by an interrupted run", removed)
    colours = class_colours(k, segmenter.meta.get("palette"))
    summary = PredictSummary(0, 0, removed)
    show = progress if progress is not None else sys.stderr.isatty() and rank == 0
    for path, valid_path in tqdm(mine, desc="predict", unit="image", disable=not show):
        names = output_names(path.stem, k)
        if not overwrite and all((out / n).is_file() for n in names):
            summary.skipped += 1
            continue
        image = _load(segmenter, path)
        if warn_valid:
            log.warning("the checkpoint was trained with valid-region masks, which set each image's "
                        "standardisation; without --valid the whole image is used and results differ: "
                        "pass --valid DIR")
            warn_valid = False
        valid = None if valid_path is None else read_valid(Path(valid_path), tuple(image.shape[1:]), path)
        probs = segmenter.probabilities(image, valid)
        _write_all(out, names, _arrays(segmenter, image, probs, segmenter.labels(probs), colours))
        summary.written += 1
    if summary.skipped:
        log.info("skipped %d images whose outputs exist in %s (overwrite to redo them)", summary.skipped, out)
    return summary


def evaluate_files(segmenter: Segmenter, files: Sequence[Path], mask_files: Sequence[Path],
                   valid_files: Sequence[Path | None] | None = None, *, positive: int | None = None,
                   mask_mode: str | None = None, palette=None, ignore_value: int | None = None,
                   progress: bool | None = None) -> dict:
    """Scores of ``segmenter`` on images with their masks (and valid regions), image by image.

    Mask decoding (mode, palette, ignore value) defaults to the checkpoint's. Returns the
    :class:`SegmentationMeter` scores with ``classes``, ``images``, ``threshold`` and ``tta``.
    """
    positive, mask_mode, palette, ignore_value = _decoding(segmenter, positive, mask_mode, palette, ignore_value)
    k = segmenter.num_classes
    valid_files = list(valid_files) if valid_files is not None else [None] * len(files)
    if not len(files) == len(mask_files) == len(valid_files):
        raise DataError(f"{len(files)} images, {len(mask_files)} masks and {len(valid_files)} valid-region masks; "
                        "give one of each per image")
    meter = SegmentationMeter(k, positive=positive)
    show = progress if progress is not None else sys.stderr.isatty()
    for path, mask_path, valid_path in tqdm(list(zip(files, mask_files, valid_files)), desc="evaluate",
                                            unit="image", disable=not show):
        image = _load(segmenter, Path(path))
        size = tuple(image.shape[1:])
        target = _read_target(Path(mask_path), Path(path), size, k, mask_mode, palette, ignore_value)
        valid = None if valid_path is None else read_valid(Path(valid_path), size, Path(path))
        if valid is not None:
            target[~valid] = IGNORE_INDEX
        probs = segmenter.probabilities(image, valid)
        meter.update(probs[None], target[None], segmenter.labels(probs)[None])
    return {**meter.compute(), "classes": segmenter.classes, "images": len(files),
            "threshold": segmenter.threshold, "tta": segmenter.tta}


def _read_target(path: Path, image: Path, size: tuple[int, int], k: int, mask_mode, palette,
                 ignore_value) -> torch.Tensor:
    target = decode_mask(path, mask_mode, palette, ignore_value)
    if tuple(target.shape) != size:
        raise DataError(f"mask {path} is {target.shape[1]}x{target.shape[0]} but image {image.name} is "
                        f"{size[1]}x{size[0]}; pass the mask made for this image, at its size")
    _check_values(target, path, k)
    return target


def _check_values(target: torch.Tensor, path: Path, k: int) -> None:
    bad = (target != IGNORE_INDEX) & ((target < 0) | (target >= k))
    if bad.any():
        value = int(target[bad].max())
        raise DataError(f"mask {path} has value {value} but the checkpoint has {k} classes (0..{k - 1}); pass "
                        f"masks of these classes, or --ignore-value {value} if {value} marks unlabelled pixels")


# --------------------------------------------------------------------------- volumes


def volume_output_names(stem: str, num_classes: int) -> list[str]:
    """Files written for a volume: labels and probabilities (one file for two classes), multi-page TIFFs."""
    probs = [f"{stem}_prob.tif"] if num_classes == 2 else [f"{stem}_prob_{k}.tif" for k in range(num_classes)]
    return [f"{stem}_labels.tif", *probs]


def _volume_name(path: Path) -> str:
    return path.stem if path.is_file() else path.name


def _load_volume(segmenter: Segmenter, path: Path) -> torch.Tensor:
    """A (C, D, H, W) volume checked against the net: its channels and, in 3D, its sides."""
    volume = load_volume(path)
    want = segmenter.in_channels // segmenter.volume.slices
    if volume.shape[0] != want:
        raise DataError(f"volume {path} has {volume.shape[0]} channels but the model takes {want}; convert it "
                        "(grey <-> RGB) first")
    for member in segmenter.members if segmenter.volume.mode == "3d" else ():
        need = max(max((p - 1) // 2, p // 2) for p in member.dense.patch)
        if member.dense.border == "reflect" and min(volume.shape[1:]) <= need:
            raise DataError(f"volume {path} is {'x'.join(map(str, volume.shape[1:]))} but {member.source} reflects "
                            f"{need} voxels at its border, which needs every side above {need}; give a larger "
                            "volume, or train with --border replicate")
    return volume


def predict_volumes(segmenter: Segmenter, volumes: Sequence[Path], out: str | Path, *, rank: int = 0,
                    world_size: int = 1, overwrite: bool = False, progress: bool | None = None) -> PredictSummary:
    """Label ``volumes[rank::world_size]`` into ``out``: <stem>_labels.tif (uint8 class indices, uint16
    beyond 256 classes) and <stem>_prob.tif (uint16 probability of the positive class x 65535;
    <stem>_prob_<k>.tif per class beyond two), one page per slice, each written atomically."""
    if segmenter.volume is None:
        raise ConfigError("predict_volumes needs a checkpoint from `cnnkit segment train --volume`")
    volumes = [Path(v) for v in volumes]
    _check_unique(volumes, _volume_name, "volumes")
    out = ensure_writable_dir(out)
    mine = volumes[rank::world_size]
    k = segmenter.num_classes
    removed = _remove_stale_tmp(out, {n for v in mine for n in volume_output_names(_volume_name(v), k)})
    summary = PredictSummary(0, 0, removed)
    show = progress if progress is not None else sys.stderr.isatty() and rank == 0
    for path in tqdm(mine, desc="predict", unit="volume", disable=not show):
        names = volume_output_names(_volume_name(path), k)
        if not overwrite and all((out / n).is_file() for n in names):
            summary.skipped += 1
            continue
        probs = volume_probabilities(segmenter, _load_volume(segmenter, path))  # (K, D, H, W)
        labels = segmenter.labels(probs).numpy().astype(np.uint8 if k <= 256 else np.uint16)
        p16 = (probs.clamp(0, 1).double().numpy() * 65535 + 0.5).astype(np.uint16)
        _write_all(out, names, [labels, *([p16[segmenter.positive]] if k == 2 else list(p16))], save=_save_tiff)
        summary.written += 1
    return summary


def evaluate_volumes(segmenter: Segmenter, volumes: Sequence[Path], mask_volumes: Sequence[Path], *,
                     positive: int | None = None, mask_mode: str | None = None, palette=None,
                     ignore_value: int | None = None, progress: bool | None = None) -> dict:
    """:func:`evaluate_files` for volumes: the scores over every labelled voxel of every volume."""
    positive, mask_mode, palette, ignore_value = _decoding(segmenter, positive, mask_mode, palette, ignore_value)
    k = segmenter.num_classes
    meter = SegmentationMeter(k, positive=positive)
    show = progress if progress is not None else sys.stderr.isatty()
    for path, mask_path in tqdm(list(zip(volumes, mask_volumes)), desc="evaluate", unit="volume", disable=not show):
        volume = _load_volume(segmenter, Path(path))
        target = load_mask_volume(Path(mask_path), mask_mode, palette, ignore_value)
        check_mask_shape(target, Path(mask_path), volume, Path(path))
        _check_values(target, Path(mask_path), k)
        probs = volume_probabilities(segmenter, volume)
        meter.update(probs[None], target[None], segmenter.labels(probs)[None])
    return {**meter.compute(), "classes": segmenter.classes, "images": len(volumes), "volumes": True,
            "threshold": segmenter.threshold, "tta": segmenter.tta}
