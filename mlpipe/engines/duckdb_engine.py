"""The embedded DuckDB engine: the statistics pass of mlpipe/stats.py (SQL in sql/)."""

from __future__ import annotations

from .base import Engine


class DuckDBEngine(Engine):
    name = "duckdb"

    def statistics(self, data, formula, *, weights=None, correlation=None,
                   residual_variance_by=None, coding=None):
        from ..stats import compute_statistics

        return compute_statistics(data, formula, weights=weights, correlation=correlation,
                                  residual_variance_by=residual_variance_by, coding=coding,
                                  **self.options.duckdb())
