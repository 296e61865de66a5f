"""Exact retrieval ranking: distances, the order a stable sort gives, and mAP / precision@k from the
ranks of the relevant items only (see :mod:`cnnkit.analysis.retrieval`, which extracts the features).

:func:`evaluate_retrieval` is exact and streams: chunks of queries sized to a memory budget, each
chunk's distances sorted once, and only the ranks of the relevant items kept.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from cnnkit.errors import ConfigError, DataError

METRICS = ("euclidean", "cosine")


def l2_normalise(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit Euclidean length (a zero row stays zero)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps)


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
