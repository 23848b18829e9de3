-- GLMMs (mlpipe/glmm.py): the model's complete rows compressed to (level, covariate pattern):
-- per distinct level and values of every X and Z column and the offset, the row count, the
-- sums of y (successes), of y² (for the Pearson statistic) and of the trials, the sum of the
-- log-likelihood's constant (log binomial coefficients, -log y!), the smallest y and the
-- largest fractional part of y (for the checks), with each grouping factor's level label
-- (label0, ...).  Exact: the rows of a pattern share their linear predictor.
SELECT {label}, {pattern_keys}, count(*) AS n, {sum_y} AS sy, fsum(t) AS st,
       fsum(c) AS sc, {sum_yy} AS syy, {y_min} AS ymin, {y_frac} AS yfrac
FROM (
    SELECT {groups}, {columns}, {y} AS y, {trials} AS t, {const} AS c
    FROM {source} AS src
    WHERE {complete}
) AS frame
GROUP BY {gkeys}, {pattern_keys}
-- a fixed order: the hash aggregate hands the groups out in an order that varies between
-- runs, and the fit's sums over the patterns would differ in their last bits
ORDER BY {gkeys}, {pattern_keys}
