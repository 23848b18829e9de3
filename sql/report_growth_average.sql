-- Report: the grid of the average (population) trajectory of a growth model, read by the
-- model's linear predictor (sql/predict.sql) for X·β and the rows x of X along it.  One pass
-- over the rows the model used: the time's range, the other predictors at their overall
-- means (modes for categorical ones, as the group-specific lines hold them), and, for the
-- observed means by time, the approximate number of distinct times and approximate
-- quantiles of time (HyperLogLog and t-digest: O(1) memory).  Grouping columns are NULL.
WITH summary AS (
    SELECT CAST(min({time}) AS DOUBLE) AS __mlpipe_lo, CAST(max({time}) AS DOUBLE) AS __mlpipe_hi,
           approx_count_distinct({time}) AS __mlpipe_distinct,
           approx_quantile(CAST({time} AS DOUBLE), {fractions}) AS __mlpipe_edges{aggregates}
    FROM {source}
    WHERE {complete}
)
SELECT {keep}__mlpipe_distinct, __mlpipe_edges,
       __mlpipe_lo + (__mlpipe_hi - __mlpipe_lo) * (__mlpipe_t / {k}.0) AS {time}
FROM summary CROSS JOIN range(0, {points}) AS grid(__mlpipe_t)
