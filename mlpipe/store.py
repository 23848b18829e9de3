"""Appendable statistics stores: statistics that grow with new partitions (nightly jobs).

A store is a statistics file (`Statistics.save`) that also records the inputs it holds —
each file's absolute path, size and content fingerprint (BLAKE2b-128 of its bytes) —
under `inputs` in its metadata:

    mlpipe stats DATA --formula F --out STORE          # create (records DATA's files)
    mlpipe stats NEW_DATA --append-to STORE            # merge NEW_DATA's statistics in
    mlpipe fit --stats STORE                           # fit all inputs without rereading

An append computes NEW_DATA's statistics for the store's model with the store's coding of
categorical predictors, merges them (`Statistics.merge`: per-group / per-cell sums add,
groups present in both are combined), adds the new files to `inputs` and replaces the file
atomically, so an interrupted append leaves the previous store as it was.  Refused, with
the store unchanged (exit code 2): a file whose content the store already holds (whatever
its name), a level of a categorical predictor the store's coding does not have (rebuild the
store over all inputs), formulas whose constants depend on all rows (center(),
group_mean(), scale(), poly()), residual structures (a series split between inputs would
lose its lags), and in-memory data (nothing to fingerprint).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import DataError, InputError

CHUNK = 1 << 23  # 8 MiB reads when fingerprinting


def fingerprint(path: str | os.PathLike[str]) -> str:
    """BLAKE2b-128 of a file's bytes (hex)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def input_records(data) -> list[dict]:
    """The files a data source reads: [{path, size, fingerprint}]."""
    from ._sql import Source

    source = Source(data)
    if source.in_memory:
        raise InputError("a statistics store records its input files: give a path, not data "
                         "in memory")
    files = source.files()
    if not files:
        raise DataError(f"no files match {data}")
    return [{"path": os.path.abspath(f), "size": os.path.getsize(f),
             "fingerprint": fingerprint(f)} for f in files]


def _check_appendable(formula_text: str, stats) -> None:
    from .formula import parse_formula

    parsed = parse_formula(formula_text)
    if parsed.aggregates() or parsed.prepass():
        raise InputError("the store's formula uses center()/group_mean()/scale()/poly(), whose "
                         "constants come from all rows: an append would change them; build "
                         "the statistics over all inputs at once")
    if stats.residual is not None:
        raise InputError("a store with a residual correlation or variance structure cannot be "
                         "appended to (a series split between inputs loses its lags); build "
                         "the statistics over all inputs at once")


def create(data, formula: str, out: str | os.PathLike[str], *, engine=None, **options):
    """Build the statistics of `data` for `formula`, record its files and save the store at
    `out`.  `engine`: what builds them (mlpipe/engines; default DuckDB); `options`: the
    model's (weights, residual structure)."""
    from .engines import get_engine

    engine = engine or get_engine(None)
    records = input_records(data)
    stats = engine.statistics(data, formula, **options)
    stats.inputs = records
    stats.save(out)
    return stats


def append(data, store: str | os.PathLike[str], *, formula: str | None = None, engine=None):
    """Merge the statistics of `data` into the store at `store` (see the module docstring);
    returns the new statistics.  The store is rewritten only when everything succeeded.
    `engine`: what builds them (mlpipe/engines; default DuckDB)."""
    from .engines import get_engine
    from .stats import Statistics

    engine = engine or get_engine(None)
    old = Statistics.load(store)
    if formula is not None and " ".join(formula.split()) != " ".join(old.formula.split()):
        raise InputError(f"the store {store} holds statistics of {old.formula!r}, not "
                         f"{formula!r}")
    _check_appendable(old.formula, old)
    records = input_records(data)
    held = {r["fingerprint"]: r for r in old.inputs}
    for r in records:
        if r["fingerprint"] in held:
            same = held[r["fingerprint"]]["path"]
            raise InputError(f"{r['path']} is already in the store {store} (the same content "
                             f"as {same}); nothing was appended")
    if len({r["fingerprint"] for r in records}) < len(records):
        raise InputError(f"{data} holds two files with the same content; nothing was appended")
    new = engine.statistics(data, old.formula, weights=old.weights or None,
                            coding=old.factor_levels)
    merged = old.merge(new)
    merged.inputs = list(old.inputs) + records
    merged.save(store)
    return merged


def stored_inputs(store: str | os.PathLike[str]) -> list[dict]:
    """The inputs a store records."""
    from .stats import Statistics

    return Statistics.load(Path(store)).inputs
