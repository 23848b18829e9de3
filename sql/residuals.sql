-- Conditional residuals r = y − X·β − Σ_k Z_k·b_k (and rp, the Pearson residual times σ,
-- whose quantiles are summarized) of the rows a model was fitted to, from one
-- scan of the data (the CTE is sql/predict.sql returning the residual r of the complete rows
-- and, per grouping factor, the level it matched: {levels}).  The residuals are materialized
-- once (spilling if need be) and summarized per level of every factor (n, mean, variance;
-- O(levels) rows, `factor` names the level column) and over all rows (the same, and min,
-- quartiles, max), the latter as the one row whose factor is NULL.  Means and variances are
-- compensated sums (fsum), the variance in two passes (the sum of squares about the mean;
-- NULL for n < 2, as var_samp), so they do not depend on how DuckDB splits the rows among
-- threads.
WITH resid AS MATERIALIZED (
    {predicted}
),
by_level AS (
    SELECT factor, level, r
    FROM (UNPIVOT (SELECT * EXCLUDE (rp) FROM resid) ON {levels} INTO NAME factor VALUE level)
    UNION ALL
    SELECT CAST(NULL AS VARCHAR) AS factor, CAST(NULL AS VARCHAR) AS level, r
    FROM resid
),
means AS (
    SELECT factor, level, count(*) AS n, fsum(r) / count(*) AS mean_residual
    FROM by_level
    GROUP BY factor, level
),
summary AS (
    SELECT
        means.factor,
        means.level,
        means.n,
        means.mean_residual,
        CASE WHEN means.n > 1
             THEN fsum((by_level.r - means.mean_residual) ^ 2) / (means.n - 1)
        END AS residual_variance
    FROM by_level
    JOIN means
      ON by_level.factor IS NOT DISTINCT FROM means.factor
     AND by_level.level IS NOT DISTINCT FROM means.level
    GROUP BY means.factor, means.level, means.n, means.mean_residual
),
overall AS (
    SELECT list_concat([min(rp)], {quantile}(rp, [0.25, 0.5, 0.75]), [max(rp)]) AS quantiles
    FROM resid
)
SELECT
    summary.*,
    CASE WHEN summary.factor IS NULL THEN overall.quantiles END AS quantiles
FROM summary CROSS JOIN overall
