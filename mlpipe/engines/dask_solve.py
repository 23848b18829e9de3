"""The fit with the per-group statistics kept on the Dask workers (`--keep-on-workers`).

    client                                     workers
    ------                                     -------
                                               scan: partial Statistics per input part
                                               split: each partial's groups by a hash of the
                                                 group label into P partitions
                                               merge: partition k's pieces of every partial
                                                 (tree reduction, cells added by key)
                                               -> P Partitions kept in worker memory, each an
                                                  Objective over its groups (totals zero)
    totals X'X, X'y, y'y, n  <--------------  (small: summed on the client)
    optimizer:  θ  --------------------------> Partition.core(θ): Σ R_aug'R_aug, Σ log|L_i|²
                β̂, R_X, r² (profile_fixed) <- (p+1)×(p+1) and a scalar per partition
                gradient: θ, β̂, R_X  -------> Partition.gradient: the gradient's sums
    Satterthwaite: gradient rounds near the optimum (the Hessian) and one round of the
                 sums of Var(β̂)'s Jacobian (mlpipe/inference.py satterthwaite_sums)
    modes: θ, β̂, σ  -----------------------> each partition writes its groups' conditional
                                               modes to a Parquet file
    result: the small values; ranef a lazy scan of those files (sunk into ranef.parquet)

The client never holds an O(groups) array: every evaluation is one map over the partitions
(two with the gradient) returning p×p-sized sums, and the profiled deviance is the same
function of those sums as the one-machine `Objective`'s (mlpipe/objective.py), so the fit
equals the DuckDB engine's to the rounding of a different order of additions.

Models with one grouping factor only (a nested or crossed model's Schur complements couple
the factors' levels across partitions); Kenward-Roger and profile intervals (they need the
per-group algebra on one machine) are refused.  The modes are written where the workers and
the client both see them: `temp_directory` (`--temp-directory`) or the system's temporary
directory, so a remote `--scheduler` needs a shared file system there.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import numpy as np
from scipy import linalg

from ..objective import Decomposition, Objective

#: partitions of the groups per worker (a few, so a lost worker's share is recomputed in
#: pieces and the rounds stay balanced)
PARTITIONS_PER_WORKER = 2


# ---------------------------------------------------------------------- on the workers

def split_by_group(st, k: int) -> list:
    """A partial Statistics cut into `k` by a hash of its group labels (the same label lands
    in the same piece in every partial), totals zeroed (the client sums the `header`s')."""
    import polars as pl

    labels = np.asarray(st.levels).astype(str)
    if st.group_type.upper().startswith(("DOUBLE", "FLOAT", "REAL")):
        labels = np.where(labels == "-0.0", "0.0", labels)  # one value, as DuckDB groups
    if st.m:
        bucket = (pl.Series(labels, dtype=pl.Utf8).hash(seed=0)
                  .to_numpy() % np.uint64(k)).astype(np.int64)
    else:
        bucket = np.zeros(0, np.int64)
    p = st.p
    out = []
    for j in range(k):
        idx = np.flatnonzero(bucket == j)
        out.append(dataclasses.replace(
            st, levels=st.levels[idx], n_i=st.n_i[idx], ztz=st.ztz[..., idx],
            ztx=st.ztx[..., idx], zty=st.zty[..., idx], yty_i=st.yty_i[idx],
            xtx=np.zeros((p, p)), xty=np.zeros(p), yty=0.0, n=0, rows_read=0,
            rows_dropped=0, log_weights=0.0, source=""))
    return out


def header(st):
    """The partial without its groups: the model's names, coding and totals (small; the
    client sums the partials' totals)."""
    return dataclasses.replace(st, levels=st.levels[:0], n_i=st.n_i[:0], ztz=st.ztz[..., :0],
                               ztx=st.ztx[..., :0], zty=st.zty[..., :0], yty_i=st.yty_i[:0])


def piece(pieces: list, j: int):
    return pieces[j]


def _size(st) -> int:
    return st.m


class Partition:
    """A worker's share of the groups: their statistics and an Objective over them (with
    X'X, X'y, y'y zero, so its M is −Σ R_aug'R_aug over these groups)."""

    def __init__(self, st, reml: bool):
        self.m = st.m
        self.obj = Objective(st, reml=reml) if st.m else None

    def core(self, theta):
        """(Σ R_aug'R_aug, Σ log|L_i|²) over the partition's groups at θ."""
        obj = self.obj
        if obj is None:
            return None
        with np.errstate(invalid="raise", divide="raise"), obj._lock:
            _T, _J, _L, _R, M, logdet_l = obj._core(np.asarray(theta, float), obj._ws)
            return obj._M0 - M, float(logdet_l)

    def gradient(self, theta, beta, rx, with_rx: bool):
        """The gradient's sums over the partition's groups at θ and the whole data's β̂, R_X."""
        obj = self.obj
        if obj is None:
            return None
        with np.errstate(invalid="raise", divide="raise"), obj._lock:
            T, J, L, _R, _M, _ld = obj._core(np.asarray(theta, float), obj._ws)
            return obj.gradient_sums(T, J, L, beta, rx, with_rx)

    def within(self):
        """`model.group_sum_of_squares` over the partition's groups (model.validate)."""
        from ..model import group_sum_of_squares

        return None if self.obj is None else group_sum_of_squares(self.obj.stats)

    def satterthwaite(self, theta):
        """`inference.satterthwaite_sums` over the partition's groups (its X'X is zero)."""
        from ..inference import satterthwaite_sums

        if self.obj is None:
            return None
        return satterthwaite_sums(self.obj.stats, self.obj, np.asarray(theta, float))

    def moments(self, beta):
        return None if self.obj is None else self.obj.moment_sums(beta)

    def write_modes(self, theta, beta, sigma: float, path: str):
        """The conditional modes of the partition's groups (results' long form) to `path`;
        the number of rows written (0 and no file for an empty partition)."""
        from ..results import _conditional_modes

        if self.obj is None:
            return 0
        dec = self.obj.decompose(np.asarray(theta, float), beta=np.asarray(beta, float))
        table = _conditional_modes(self.obj.stats, dec, sigma)
        table.write_parquet(path)
        return table.height


def make_partition(st, reml: bool) -> Partition:
    return Partition(st, reml)


def _call(part: Partition, method: str, *args):
    return getattr(part, method)(*args)


# ---------------------------------------------------------------------- on the client

class WorkerStatistics:
    """The statistics pass's result with the groups on the workers: `header` (a Statistics
    of the totals and the model's names, no groups), `parts` (futures of the per-partition
    Statistics), `m` (groups in all).  Holds the Dask client (and the LocalCluster it
    started); `close()` releases them."""

    def __init__(self, client, cluster, parts: list, header, m: int):
        self.client, self.cluster, self.parts, self.header, self.m = (client, cluster, parts,
                                                                      header, m)

    def close(self) -> None:
        self.parts = []
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        self.client = self.cluster = None


def keep_statistics(client, cluster, files: list, formula: str, weights, coding: dict,
                    types: dict, duck: dict, n_workers: int) -> WorkerStatistics:
    """The scan's partials, split by group and merged per partition on the workers.  On an
    error the caller closes the client (and cluster); on success the WorkerStatistics owns
    them."""
    from ..errors import DataError
    from .dask_engine import (RETRIES, combine, killed_worker_reported, map_partials,
                              tree_reduce, wait_for_scan)

    k = max(1, PARTITIONS_PER_WORKER * n_workers)
    partials, names = map_partials(client, files, formula, weights, coding, types, duck)
    heads = client.map(header, partials, retries=RETRIES, pure=False)
    split = client.map(split_by_group, partials, k=k, retries=RETRIES, pure=False)
    buckets = []
    for j in range(k):
        pieces = [client.submit(piece, s, j, retries=RETRIES, pure=False) for s in split]
        buckets.append(tree_reduce(client, combine, pieces)[0])
    with killed_worker_reported(names):
        wait_for_scan(partials, files)
        tot = client.gather(heads)
        sizes = client.gather(client.map(_size, buckets, pure=False))
    del partials, split
    def total(name: str):
        return sum(getattr(t, name) for t in tot)

    head = dataclasses.replace(
        tot[0], xtx=total("xtx"), xty=total("xty"), yty=total("yty"), n=total("n"),
        rows_read=total("rows_read"), rows_dropped=total("rows_dropped"),
        log_weights=total("log_weights"))
    if head.n == 0:
        raise DataError(f"no rows left after dropping rows with missing values "
                        f"({head.rows_read} rows read, all dropped)")
    return WorkerStatistics(client, cluster, buckets, head, int(sum(sizes)))


class DistributedObjective(Objective):
    """The profiled REML/ML deviance over groups kept on the workers: `Objective`'s criterion,
    gradient and parts with its per-group sums computed by the partitions, one map round per
    evaluation (two with the gradient).  The optimizer, Satterthwaite's derivatives and the
    Wald intervals use it as they use the one-machine objective."""

    def __init__(self, kept: WorkerStatistics, *, reml: bool = True):
        super().__init__(kept.header, reml=reml)
        self.kept = kept
        self.rounds = 0
        self._parts_f = kept.client.map(make_partition, kept.parts, reml=reml, pure=False)

    def __getstate__(self):  # never shipped: the partitions are
        raise TypeError("a DistributedObjective stays on the client")

    def _map(self, method: str, *args) -> list:
        self.rounds += 1
        client = self.kept.client
        futures = [client.submit(_call, f, method, *args, pure=False) for f in self._parts_f]
        return [r for r in client.gather(futures) if r is not None]

    # the one-machine Objective's evaluations, with the sums over groups from the workers
    # (Objective._core keeps the latest θ's: the gradient's round and Satterthwaite's steps
    # in σ alone reuse it)
    def _compute_core(self, theta, ws):
        out = self._map("core", theta)
        M = self._M0.copy()
        for rr, _ld in out:
            M -= rr
        return None, None, None, None, M, float(sum(ld for _rr, ld in out))

    def _parts(self, theta, with_rx: bool):
        from ..objective import Parts

        M, logdet_l = self._core(theta, self._ws)[-2:]
        _xtx, rx, beta, r2, logdet_rx = self._profile(M)
        if not np.isfinite(r2) or r2 <= 0:
            raise linalg.LinAlgError("the penalized residual sum of squares is not positive")
        out = self._map("gradient", np.asarray(theta, float), beta, rx, with_rx)
        g_ld, g_r2, g_rx = (sum(o[i] for o in out) for i in range(3))
        return Parts(logdet_l, logdet_rx, r2, g_ld, g_rx, g_r2)

    def xtx_adj_at(self, theta) -> np.ndarray:
        """R_X'R_X at θ (Satterthwaite's Jacobian of Var(β̂))."""
        return self._profile(self._core(theta, self._ws)[-2])[0]

    def decompose(self, theta) -> Decomposition:
        """The small parts of the decomposition at θ (the per-group L, R_ZX, c_u stay on the
        workers: None here)."""
        M, logdet_l = self._core(theta, self._ws)[-2:]
        xtx_adj, rx, beta, r2, logdet_rx = self._profile(M)
        return Decomposition(np.asarray(theta, float), self.theta_map.T(theta), None, None,
                             None, xtx_adj, rx, beta, r2, logdet_l, logdet_rx)

    def satterthwaite(self, theta, sigma: float, beta):
        """lmerTest's Satterthwaite df as the one-machine fit computes them (the Hessian by
        differences of the exact gradient, Var(β̂)'s Jacobian in closed form), the sums
        over groups from the partitions."""
        from ..inference import satterthwaite_parts

        out = self._map("satterthwaite", np.asarray(theta, float))
        M = np.asarray(self.stats.xtx, float) + sum(o[0] for o in out)
        S = [sum(o[1][k] for o in out) for k in range(len(self.theta_map))]
        return satterthwaite_parts(self.stats, theta, sigma, reml=self.reml, obj=self,
                                   sums=(M, S)).result(beta)

    def moment_sums(self, beta):
        """`Objective.moment_sums` over all partitions (so `moment_start` is Objective's)."""
        out = self._map("moments", beta)
        q = self.stats.q
        return (sum(o[0] for o in out), float(sum(o[1] for o in out)),
                sum((o[2] for o in out), np.zeros((q, q))),
                sum((o[3] for o in out), np.zeros((q, q))))

    def write_modes(self, dec: Decomposition, sigma: float, directory: str) -> list[str]:
        """Each partition writes its groups' conditional modes to a file in `directory`;
        the files written."""
        paths = [os.path.join(directory, f"part-{j:05d}.parquet")
                 for j in range(len(self._parts_f))]
        client = self.kept.client
        rows = client.gather([client.submit(_call, f, "write_modes", dec.theta, dec.beta,
                                            sigma, path, pure=False)
                              for f, path in zip(self._parts_f, paths)])
        return [path for path, n in zip(paths, rows) if n]


def modes_directory(temp_directory: str | None) -> str:
    """A fresh directory for the workers' conditional modes, removed at exit."""
    import atexit

    if temp_directory:
        os.makedirs(temp_directory, exist_ok=True)
    path = tempfile.mkdtemp(prefix="mlpipe-modes-", dir=temp_directory or None)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def fit_on_workers(engine, data, formula: str, *, method: str, ddf: str | None,
                   ci: str | None, level: float, weights: str | None = None):
    """`mlpipe.fit(..., engine="dask", keep_on_workers=True)`: the statistics pass, the
    optimization, Satterthwaite df, Wald intervals and the conditional modes with the groups
    on the workers (see the module's docstring).  A FitResult whose `ranef` is a lazy scan of
    the modes the workers wrote and whose `stats` is None (no stats.parquet)."""
    import time

    import polars as pl

    from .. import runlog
    from ..errors import InputError
    from ..inference import wald_intervals
    from ..model import optimizer_progress, set_ddf, validate
    from ..optimize import optimize
    from ..results import FitResult

    if ddf == "kenward-roger":
        raise InputError("Kenward-Roger needs the per-group algebra on one machine: use --ddf "
                         "satterthwaite with --keep-on-workers")
    if ci == "profile":
        raise InputError("profile intervals refit the model many times on one machine: use "
                         "--ci wald with --keep-on-workers")
    kept = engine.worker_statistics(data, formula, weights=weights)
    try:
        reml = method == "REML"
        t0 = time.perf_counter()
        obj = DistributedObjective(kept, reml=reml)
        within = obj._map("within")
        validate(kept.header, groups=kept.m,
                 within=float(sum(within)) if within else None)
        with optimizer_progress(obj):
            summary = optimize(obj, method=obj.default_method)
        dec = obj.decompose(np.asarray(summary.final_theta))
        sigma = obj.sigma(dec)
        directory = modes_directory(engine.options.temp_directory)
        ranef = pl.scan_parquet(obj.write_modes(dec, sigma, directory))  # m ≥ 2: a file
        result = FitResult.build(kept.header, obj, dec, summary, ranef=ranef,
                                 groups={kept.header.group: kept.m})
        t1 = time.perf_counter()
        runlog.stage("solve", t1 - t0, evaluations=summary.evaluations,
                     converged=summary.converged, criterion=summary.final_objective,
                     rounds=obj.rounds)
        beta = dec.beta
        if ddf is not None:
            set_ddf(result, obj.satterthwaite(dec.theta, sigma, beta))
        if ci == "wald":
            se = np.sqrt(np.diag(result.vcov_matrix))
            result.confidence_intervals = wald_intervals(
                kept.header, dec.theta, sigma, beta, se, reml=reml, level=level, obj=obj)
        result.ci_level = level if ci else None
        result.stats = None  # the groups' statistics were on the workers: no stats.parquet
        result.factor_levels = dict(kept.header.factor_levels)
        result.group_types = {kept.header.group: kept.header.group_type}
        result.timings = {**kept.header.timings, "solve": t1 - t0,
                          "inference": time.perf_counter() - t1}
        runlog.stage("inference", result.timings["inference"], ddf=result.df_method)
        return result
    finally:
        kept.close()

