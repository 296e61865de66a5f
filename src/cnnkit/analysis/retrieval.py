"""Features from any named layer, and image retrieval with them.

The lecture (after Krizhevsky et al. 2012): "the top hidden layer can be used as feature for
retrieval": images whose feature vectors are close show the same kind of object, although pixel
distances between them are large. Chatfield et al. (BMVC 2014) add that L2-normalising the features
matters (about 5% mAP on VOC 2007); :func:`evaluate_retrieval` therefore measures both.

Ranking: each query ranks the whole database by distance (Euclidean or cosine). Precision@k is the
fraction of the k nearest that share the query's class; average precision (AP) is the mean of the
precision at the rank of every relevant item; mAP is the mean AP over queries. Ties are broken by
database order (a stable sort), so results are deterministic. By chance (random ranking) the mAP is
close to the fraction of relevant items, about 0.1 for ten balanced classes.

:func:`evaluate_retrieval` is exact and streams: chunks of queries sized to a memory budget, each
chunk's distances sorted once, and only the ranks of the relevant items kept. CIFAR-10 (10,000 queries
against 50,000 images, LeNet-5) takes about 30 s of CPU time and 0.75 GB; see benchmarks/retrieval.py.
"""

from __future__ import annotations

import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Subset

from cnnkit.analysis.common import check_layer, checkpoint_splits, image_tile, load_images, save_png
from cnnkit.data import labels_of
from cnnkit.data.common import ArrayDataset
from cnnkit.errors import CheckpointError, ConfigError, DataError
from cnnkit.models import extract_features
from cnnkit.utils import atomic_path

log = logging.getLogger(__name__)

METRICS = ("euclidean", "cosine")
FEATURE_SUFFIXES = (".npy", ".safetensors")
# The pixel baseline: its cost per ranking, queries x database x pixels multiply-adds (1e11 is seconds on
# two cores; the whole of CIFAR-10, 1.5e12, would take minutes), and the pixels it holds in memory.
PIXEL_BASELINE_LIMIT = 100_000_000_000
PIXEL_VALUES_LIMIT = 250_000_000  # float32 values (1 GB), queries' and database's together
QUERY_SEED = 0  # the random subset of queries that `queries` keeps
FEATURE_BATCH_BYTES = 32 * 2**20  # float32 input images per forward pass of compute_features
WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# --------------------------------------------------------------------------- features


def default_feature_layer(model: nn.Module) -> str:
    """The top hidden layer: the last module whose output feeds the output layer (dropout skipped)."""
    leaves = [(n, m) for n, m in model.named_modules() if n and next(m.children(), None) is None]
    last = max((i for i, (_, m) in enumerate(leaves) if isinstance(m, WEIGHTED)), default=None)
    candidates = [n for n, m in leaves[:last] if not isinstance(m, (nn.Dropout, nn.Flatten))] if last else []
    if not candidates:
        raise ConfigError("the model has no hidden layer before its output layer; pass --layer NAME")
    name, short = candidates[-1], candidates[-1].rsplit(".", 1)[-1]
    return short if sum(n.rsplit(".", 1)[-1] == short for n, _ in leaves) == 1 else name


def l2_normalise(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit Euclidean length (a zero row stays zero)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps)


def image_batches(images, batch_size: int = 256):
    """(B, C, H, W) float32 batches in [0, 1], in order, of a dataset or an (N, C, H, W) tensor. An
    :class:`ArrayDataset` is sliced as its item method would (no per-item indexing, no second copy)."""
    if torch.is_tensor(images):
        yield from images.split(batch_size)
    elif isinstance(images, ArrayDataset):
        for x in images.images.split(batch_size):  # (B, C0, H, W), C0 = 1 or images.channels
            x = x.float().div_(255) if x.dtype == torch.uint8 else x.clone()
            yield x.repeat(1, images.channels, 1, 1) if x.shape[1] != images.channels else x
    else:
        yield from (x for x, _ in DataLoader(images, batch_size=batch_size, shuffle=False))


@torch.no_grad()
def compute_features(model: nn.Module, images, layer: str, *, mean: torch.Tensor | None = None,
                     batch_size: int | None = None, l2: bool = False, progress: bool | None = None,
                     desc: str = "features") -> torch.Tensor:
    """(N, D) float32 features of ``layer`` (flattened) for a dataset or an (N, C, H, W) tensor.

    ``batch_size`` defaults to as many images as fit in :data:`FEATURE_BATCH_BYTES`, at most 1024:
    small images go in large batches (LeNet-5 on CIFAR-10 runs 2-3x faster at 1024 than at 256),
    large ones in small batches, which bounds the activations' memory.
    """
    from cnnkit.train.engine import bar

    model.eval()
    param = next(model.parameters())
    n = len(images)
    if n == 0:
        raise DataError("no images to compute features for")
    if batch_size is None:
        first = images[0] if torch.is_tensor(images) else images[0][0]  # (C, H, W)
        batch_size = max(1, min(1024, FEATURE_BATCH_BYTES // (4 * first.numel())))
    mean = None if mean is None else mean.to(param.device, param.dtype)
    features, start = None, 0
    for x in bar(image_batches(images, batch_size), progress, desc, total=-(-n // batch_size)):
        x = x.to(param.device, param.dtype)
        if mean is not None:
            x = x - mean  # the mean image the network was trained with
        f = extract_features(model, x, [layer])[layer].flatten(1).float().cpu()  # (B, D)
        if features is None:
            features = torch.empty(n, f.shape[1])  # filled in place: the features are never held twice
        features[start:start + len(f)] = f
        start += len(f)
    return l2_normalise(features) if l2 else features


def save_features(path: str | Path, features: torch.Tensor, *, labels: torch.Tensor | None = None,
                  meta: dict | None = None) -> list[Path]:
    """Write features atomically: ``.safetensors`` (features, labels and meta in one file) or ``.npy``
    (the (N, D) array; meta and labels go to a ``.json`` file beside it). Returns the files written."""
    path = Path(path)
    if path.suffix not in FEATURE_SUFFIXES:
        raise ConfigError(f"feature file {path} must end in .npy or .safetensors")
    meta = dict(meta or {})
    features = features.detach().float().cpu().contiguous()
    if path.suffix == ".safetensors":
        tensors = {"features": features}
        if labels is not None:
            tensors["labels"] = labels.long().cpu().contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"cnnkit": json.dumps(meta)})
        return [path]
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, features.numpy())  # a file handle: np.save would append .npy to a path
    side = path.with_suffix(".json")
    if labels is not None:
        meta["labels"] = labels.tolist()
    with atomic_path(side) as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
    return [path, side]


def load_features(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(features, labels or None, meta) from a file written by :func:`save_features`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"feature file {path} does not exist; write one with `cnnkit features`")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("cnnkit", "{}"))
                labels = f.get_tensor("labels") if "labels" in f.keys() else None
                return f.get_tensor("features"), labels, meta
        features = torch.from_numpy(np.load(path, allow_pickle=False))
    except Exception as exc:
        raise DataError(f"cannot read feature file {path} ({type(exc).__name__}); "
                        "pass a .npy or .safetensors file written by `cnnkit features`") from None
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text()) if side.is_file() else {}
    labels = torch.tensor(meta.pop("labels")) if "labels" in meta else None
    return features, labels, meta


# --------------------------------------------------------------------------- ranking and metrics

# Queries per distance call. BLAS rounds a row's distances alike for any block of a few to a few hundred
# rows (not for a single row, nor for thousands), so the distances, and the ranking, do not depend on
# how many queries a chunk holds; 64 is also what every earlier version used.
DISTANCE_ROWS = 64
RANKING_MEMORY = 256 * 2**20  # bytes of per-chunk work arrays: chunk x N x about 32 bytes


def distances(queries: torch.Tensor, database: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """(Q, N) distances: Euclidean, or cosine distance 1 - cos."""
    if metric == "euclidean":
        return torch.cdist(queries, database)
    if metric == "cosine":
        return 1 - l2_normalise(queries) @ l2_normalise(database).T
    raise ConfigError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")


def nearest(queries: torch.Tensor, database: torch.Tensor, k: int, metric: str = "euclidean",
            chunk: int = 256) -> torch.Tensor:
    """(Q, k) database indices of the k nearest items of each query, nearest first."""
    k = min(k, len(database))
    return torch.cat([distances(q, database, metric).sort(dim=1, stable=True).indices[:, :k]
                      for q in queries.split(chunk)])


class Database:
    """A database made ready for many distance calls: what :func:`distances` recomputes for every
    chunk of queries, computed once, and distances bit for bit those of :func:`distances` against the
    whole database (the tests check it). For Euclidean distance that is torch.cdist's padded
    [y, 1, |y|^2], which it multiplies with [-2x, |x|^2, 1] when either side has more than 25 rows
    (at most 25 items are kept as they are, for :func:`distances`); for cosine, the normalised rows.
    """

    def __init__(self, batches, n: int, dims: int, metric: str = "euclidean"):
        """From (B, D) float batches of the n items in order; never holds the items twice."""
        if metric not in METRICS:
            raise ConfigError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
        self.metric, self.n, self.dims = metric, n, dims
        self.small, self.ready, start = n <= 25, None, 0
        for b in batches:
            if self.ready is None:
                width = dims + 2 if metric == "euclidean" and not self.small else dims
                self.ready = torch.empty(n, width, dtype=b.dtype)
            rows = self.ready[start:start + len(b)]
            if self.small:
                rows.copy_(b)
            elif metric == "euclidean":
                rows[:, :dims], rows[:, dims], rows[:, dims + 1] = b, 1, b.pow(2).sum(-1)
            else:
                rows.copy_(l2_normalise(b))
            start += len(b)
        if start != n or self.ready is None:
            raise DataError(f"the database has {start} items, expected {n}")

    @classmethod
    def of(cls, database: torch.Tensor, metric: str = "euclidean") -> Database:
        return cls(database.split(4096), len(database), database.shape[1], metric)

    def __len__(self) -> int:
        return self.n

    def distances(self, queries: torch.Tensor) -> torch.Tensor:
        """(q, n) distances, :data:`DISTANCE_ROWS` queries per product."""
        blocks = queries.split(DISTANCE_ROWS)
        if self.small or self.metric == "cosine":
            metric, ready = self.metric, self.ready
            return torch.cat([distances(x, ready, metric) if self.small else 1 - l2_normalise(x) @ ready.T
                              for x in blocks])
        out = torch.empty(len(queries), self.n, dtype=self.ready.dtype)
        for row, x in zip(range(0, len(queries), DISTANCE_ROWS), blocks):
            norm = x.pow(2).sum(-1, keepdim=True)  # (r, 1)
            torch.matmul(torch.cat([x.mul(-2), norm, torch.ones_like(norm)], -1), self.ready.T,
                         out=out[row:row + len(x)])
        return out.clamp_min_(0).sqrt_()  # elementwise: once for the chunk, not once per product


def stable_order(dist: torch.Tensor, threads: int | None = None) -> np.ndarray:
    """(q, N) database indices nearest first, equal distances in database order: a stable argsort.

    float32 distances are sorted as unique int64 keys, the distance's bits (made monotone) above the
    database index, which NumPy's vectorised sort orders several times faster than a stable sort,
    on ``threads`` threads (default torch's); other dtypes take NumPy's stable argsort.
    """
    if dist.dtype != torch.float32:
        return np.argsort(dist.numpy(), axis=1, kind="stable")
    q, n = dist.shape
    d = dist.numpy()
    if not d.min() > 0:  # zeros, negative distances or NaN: the careful way
        d = d + np.float32(0)  # a copy, where -0.0 is 0.0: a sort holds the two equal
        d[np.isnan(d)] = np.nan  # one NaN bit pattern, which orders after +inf, as torch.sort places NaN
        bits = d.view(np.int32)
        np.bitwise_xor(bits, 0x7FFFFFFF, out=bits, where=bits < 0)  # negative floats order backwards as ints
    keys = np.empty((q, n, 2), dtype=np.int32)  # (q, N, 2): the two halves of an int64
    high, low = (1, 0) if sys.byteorder == "little" else (0, 1)
    keys[..., high] = d.view(np.int32)  # positive floats order as their bits do
    keys[..., low] = np.arange(n, dtype=np.int32)
    keys = keys.view(np.int64)[..., 0]  # (q, N)
    parts = np.array_split(keys, max(1, min(threads or torch.get_num_threads(), q)))
    if len(parts) == 1:
        keys.sort(axis=1)
    else:
        with ThreadPoolExecutor(len(parts)) as pool:  # NumPy sorts without the GIL
            list(pool.map(lambda p: p.sort(axis=1), parts))
    return keys.view(np.int32).reshape(q, n, 2)[..., low]  # the database indices, now in key order


def relevant_ranks(order: np.ndarray, query_labels: np.ndarray, database_labels: np.ndarray):
    """For each class among the queries: (rows of its queries, (n, R) 1-based ranks of the R database
    items of that class, in increasing order)."""
    table = database_labels.astype(np.min_scalar_type(-max(database_labels.max(), query_labels.max()) - 1))
    relevant = table[order] == query_labels.astype(table.dtype)[:, None]  # (q, N) True where the class matches
    counts = np.bincount(database_labels, minlength=int(query_labels.max()) + 1)
    for c in np.unique(query_labels):
        rows = np.flatnonzero(query_labels == c)
        yield rows, np.nonzero(relevant[rows])[1].reshape(len(rows), counts[c]) + 1


def evaluate_retrieval(queries: torch.Tensor, query_labels: torch.Tensor, database, database_labels: torch.Tensor,
                       *, metric: str = "euclidean", ks=(1, 5, 10), chunk: int | None = None,
                       progress: bool | None = None, desc: str = "ranking") -> dict:
    """mAP, precision@k, and the chance mAP (fraction of relevant items), over every query.

    The ranking is exact: the order a stable sort of each query's distances gives, ties in database
    order. Only the ranks of the relevant items are kept: AP = mean over them of (hits so far / rank),
    summed in rank order, and precision@k = relevant items of rank <= k, over k. Queries go ``chunk``
    at a time (default: as many as fit in :data:`RANKING_MEMORY`), so memory does not grow with the
    number of queries. ``database`` is an (N, D) tensor or a :class:`Database` made for ``metric``.
    """
    n = len(database_labels)
    if n == 0 or len(queries) == 0:
        raise DataError("retrieval needs at least one query and one database item")
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    database = Database.of(database, metric) if torch.is_tensor(database) else database
    if len(database) != n or database.metric != metric:
        raise ConfigError(f"the database holds {len(database)} items for {database.metric} distance; "
                          f"expected {n} labels and {metric}")
    if queries.shape[1] != database.dims:
        raise DataError(f"query features have {queries.shape[1]} dimensions, database {database.dims}; "
                        "compute both with the same layer")
    from cnnkit.train.engine import bar

    ks = sorted({min(int(k), n) for k in ks})
    if chunk is None:  # a multiple of DISTANCE_ROWS, so the distance calls are those of any other chunk
        chunk = max(1, RANKING_MEMORY // (32 * n) // DISTANCE_ROWS) * DISTANCE_ROWS
    db_labels = database_labels.numpy()
    ap = np.zeros(len(queries))
    at_k = {k: np.zeros(len(queries)) for k in ks}  # precision@k of every query
    starts = range(0, len(queries), chunk)
    for start in bar(starts, progress, desc, total=len(starts)):
        q, ql = queries[start:start + chunk], query_labels[start:start + chunk].numpy()
        order = stable_order(database.distances(q))  # (q, N) nearest first
        for rows, ranks in relevant_ranks(order, ql, db_labels):
            if ranks.shape[1]:  # a class absent from the database: AP and precision stay 0
                precision = np.arange(1, ranks.shape[1] + 1) / ranks  # at the rank of each relevant item
                ap[start + rows] = np.cumsum(precision, axis=1)[:, -1] / ranks.shape[1]
            for k in ks:
                at_k[k][start + rows] = (ranks <= k).sum(1) / k
    counts = torch.bincount(database_labels, minlength=int(max(database_labels.max(), query_labels.max())) + 1)
    chance = counts[query_labels].double() / n
    ap = torch.from_numpy(ap)
    precision = {k: torch.from_numpy(v) for k, v in at_k.items()}
    return {"map": float(ap.mean()), "chance_map": float(chance.mean()),
            **{f"precision@{k}": float(v.mean()) for k, v in precision.items()},
            "queries": len(queries), "database": n, "ap": ap, "precision": precision}


# --------------------------------------------------------------------------- the picture


def plot_neighbours(path: str | Path, query_images: torch.Tensor, neighbour_images: torch.Tensor,
                    match: torch.Tensor | None = None, *, tile: int = 56) -> Path:
    """Each row: a query (blue frame), a gap, then its neighbours nearest first, framed green when
    of the query's class and red when not (grey when the query's class is unknown)."""
    q, k = neighbour_images.shape[:2]  # (Q, k, C, H, W)
    border, gap = 3, 12
    cell = tile + 2 * border + 4
    canvas = np.full((q * cell + 4, (k + 1) * cell + gap + 4, 3), 255, dtype=np.uint8)
    colours = {None: (150, 150, 150), True: (30, 160, 60), False: (210, 40, 40)}
    for i in range(q):
        row = [(query_images[i], (40, 90, 220))]
        for j in range(k):
            ok = None if match is None else bool(match[i, j])
            row.append((neighbour_images[i, j], colours[ok]))
        for j, (image, colour) in enumerate(row):
            y, x = 2 + i * cell, 2 + j * cell + (gap if j else 0)
            canvas[y:y + tile + 2 * border, x:x + tile + 2 * border] = colour
            canvas[y + border:y + border + tile, x + border:x + border + tile] = image_tile(image, tile)
    return save_png(path, canvas)


# --------------------------------------------------------------------------- the commands


def _prepare(checkpoint, device: str, layer: str | None):
    from cnnkit.train.checkpoint import load_checkpoint
    from cnnkit.utils import resolve_device

    ckpt = load_checkpoint(checkpoint)
    if ckpt.mean_image is None:
        raise CheckpointError(f"{checkpoint} holds no mean image; pass a checkpoint from `cnnkit train`")
    model = ckpt.build_model().to(resolve_device(device)).eval()
    return ckpt, model, check_layer(model, layer) if layer else default_feature_layer(model)


def export_features(checkpoint, out: str | Path, *, layer: str | None = None, split: str = "val",
                    data: str | None = None, images: list[Path] | None = None, l2: bool = False,
                    device: str = "auto") -> dict:
    """Features of ``layer`` for a split of the checkpoint's data (or for image files), to ``out``."""
    from cnnkit.train.evaluation import expand_image_paths

    if Path(out).suffix not in FEATURE_SUFFIXES:
        raise ConfigError(f"feature file {out} must end in .npy or .safetensors")
    if split not in ("train", "val", "all"):
        raise ConfigError(f"unknown split {split!r}; use train, val or all")
    ckpt, model, layer = _prepare(checkpoint, device, layer)
    meta = {"checkpoint": str(checkpoint), "layer": layer, "l2_normalised": l2, "classes": list(ckpt.classes)}
    if images:
        files = expand_image_paths(images)
        features = compute_features(model, load_images(files, ckpt), layer, mean=ckpt.mean_image, l2=l2)
        labels = None
        meta.update(source="files", files=[str(f) for f in files])
    else:
        splits = checkpoint_splits(ckpt, data)
        parts = {"train": [splits.train], "val": [splits.val], "all": [splits.train, splits.val]}[split]
        features = torch.cat([compute_features(model, p, layer, mean=ckpt.mean_image, l2=l2) for p in parts])
        labels = torch.cat([labels_of(p) for p in parts])
        meta.update(source=splits.description, split=split)
    written = save_features(out, features, labels=labels, meta=meta)
    return {"files": [str(p) for p in written], "shape": list(features.shape), "layer": layer, "l2": l2}


def _normalised(x: torch.Tensor, norm: str) -> torch.Tensor:
    return l2_normalise(x) if norm == "l2" else x


def query_subset(total: int, n: int | None) -> torch.Tensor | None:
    """Indices, in increasing order, of a random subset of ``n`` of ``total`` queries drawn with
    :data:`QUERY_SEED` (the same subset in every run), or None for all of them."""
    if n is not None and n < 1:
        raise ConfigError(f"the number of queries must be at least 1, got {n}")
    if n is None or n >= total:
        return None
    return torch.randperm(total, generator=torch.Generator().manual_seed(QUERY_SEED))[:n].sort().values


def _subset(dataset, index: torch.Tensor | None):
    if index is None:
        return dataset
    return dataset.subset(index) if isinstance(dataset, ArrayDataset) else Subset(dataset, index.tolist())


def pixel_baseline_skipped(queries: int, database: int, pixels: int) -> str | None:
    """Why the pixel baseline is not run for this size (in words), or None when it is."""
    work, values = queries * database * pixels, (queries + database) * pixels
    if work <= PIXEL_BASELINE_LIMIT and values <= PIXEL_VALUES_LIMIT:
        return None
    if values > PIXEL_VALUES_LIMIT:
        return (f"{queries + database} images x {pixels} pixels would hold {4 * values / 2**30:.1f} GiB, "
                f"over the limit of {4 * PIXEL_VALUES_LIMIT / 2**30:.1f} GiB")
    return (f"{queries} queries x {database} images x {pixels} pixels = {work:.1e} multiply-adds per ranking, "
            f"over the limit of {PIXEL_BASELINE_LIMIT:.0e}; pass --queries "
            f"{PIXEL_BASELINE_LIMIT // (database * pixels)} or fewer to include it")


def run_retrieval(checkpoint, *, layer: str | None = None, metric: str = "euclidean", ks=(1, 5, 10),
                  data: str | None = None, images: list[Path] | None = None, out: str | Path | None = None,
                  normalise: str = "l2", show: int = 8, show_k: int = 8, queries: int | None = None,
                  device: str = "auto", progress: bool | None = None) -> dict:
    """Queries (held-out split, or image files) against the training split as database.

    Every labelled run reports mAP and precision@k for raw and for L2-normalised features side by
    side, and the same for raw pixels while that stays small enough (see :func:`pixel_baseline_skipped`);
    the neighbours picture uses ``normalise`` ("l2" or "none"). ``queries`` keeps a seeded random
    subset of that many queries (default all).
    """
    from cnnkit.train.evaluation import expand_image_paths

    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if normalise not in ("l2", "none"):
        raise ConfigError(f"--normalise must be l2 or none, got {normalise!r}")
    if any(int(k) < 1 for k in ks):
        raise ConfigError(f"every k of precision@k must be at least 1, got {list(ks)}")
    ckpt, model, layer = _prepare(checkpoint, device, layer)
    splits = checkpoint_splits(ckpt, data)
    if images:
        files = expand_image_paths(images)
        available, index = len(files), query_subset(len(files), queries)
        files = files if index is None else [files[int(i)] for i in index]
        query_set, q_labels = load_images(files, ckpt), None
    else:
        index = query_subset(len(splits.val), queries)
        query_set, available = _subset(splits.val, index), len(splits.val)
        q_labels = labels_of(query_set)
    features = partial(compute_features, model, layer=layer, mean=ckpt.mean_image, progress=progress)
    database = features(splits.train, desc="database features")
    db_labels = labels_of(splits.train)
    q_features = features(query_set, desc="query features")
    result = {"checkpoint": str(checkpoint), "layer": layer, "metric": metric, "dimensions": database.shape[1],
              "queries": len(q_features), "queries_available": available, "query_seed": QUERY_SEED,
              "database": len(database), "rows": []}
    if q_labels is not None:
        runs = [(layer, norm, _normalised(q_features, norm), _normalised(database, norm)) for norm in ("none", "l2")]
        skipped = pixel_baseline_skipped(len(query_set), len(splits.train), ckpt.mean_image.numel())
        if skipped is None:
            # The baseline the lecture's claim is about: the same ranking on raw (mean-subtracted) pixels. The
            # database's pixels go straight into the form the distance products use, one normalisation at a time.
            def pixels(dataset, norm):  # (B, C*H*W) batches
                return (_normalised((x - ckpt.mean_image).flatten(1), norm) for x in image_batches(dataset, 1024))

            size = ckpt.mean_image.numel()
            runs += [("pixels", norm, torch.cat(list(pixels(query_set, norm))),
                      partial(Database, pixels(splits.train, norm), len(splits.train), size, metric))
                     for norm in ("none", "l2")]
        else:
            result["pixels_skipped"] = skipped
        for source, norm, q, db in runs:
            scores = evaluate_retrieval(q, q_labels, db if torch.is_tensor(db) else db(), db_labels, metric=metric,
                                        ks=ks, progress=progress, desc=f"ranking {source} {norm}")
            scores.pop("ap"), scores.pop("precision")
            result["rows"].append({"features": source, "normalisation": norm, **scores})
            log.debug("%s, %s features, %s: mAP %.4f (chance %.4f), %s", source, norm, metric, scores["map"],
                      scores["chance_map"],
                      ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k.startswith("precision")))
    if out is not None:
        from cnnkit.utils import ensure_writable_dir, write_json_atomic

        out = ensure_writable_dir(out)
        shown = torch.linspace(0, len(q_features) - 1, min(show, len(q_features))).round().long().unique()
        idx = nearest(_normalised(q_features[shown], normalise), _normalised(database, normalise), show_k, metric)
        q_imgs = query_set[shown] if images else torch.stack([query_set[int(i)][0] for i in shown])
        n_imgs = torch.stack([torch.stack([splits.train[int(j)][0] for j in row]) for row in idx])  # (S, k, C, H, W)
        match = None if q_labels is None else db_labels[idx] == q_labels[shown][:, None]
        png = plot_neighbours(out / "neighbours.png", q_imgs, n_imgs, match)
        result["neighbours_png"] = str(png)
        write_json_atomic(out / "retrieval.json", result)
    return result
