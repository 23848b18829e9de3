-- Conditional residuals y − X·β − Σ_k Z_k·b_k of the rows a model was fitted to, from one
-- scan of the data (the CTE is sql/predict.sql returning the residual r of the complete rows
-- and, per grouping factor, the level it matched: {levels}).  The residuals are materialized
-- once (spilling if need be) and summarized twice: per level of every factor (n, mean,
-- variance; O(levels) rows, `factor` names the level column) and over all rows (min,
-- quartiles, max), the latter as the one row whose factor is NULL.
WITH resid AS MATERIALIZED (
    {predicted}
)
SELECT
    factor,
    level,
    count(*) AS n,
    avg(r) AS mean_residual,
    var_samp(r) AS residual_variance,
    CAST(NULL AS DOUBLE[]) AS quantiles
FROM (UNPIVOT resid ON {levels} INTO NAME factor VALUE level)
GROUP BY factor, level
UNION ALL
SELECT
    CAST(NULL AS VARCHAR) AS factor,
    CAST(NULL AS VARCHAR) AS level,
    count(*) AS n,
    avg(r) AS mean_residual,
    var_samp(r) AS residual_variance,
    list_concat([min(r)], {quantile}(r, [0.25, 0.5, 0.75]), [max(r)]) AS quantiles
FROM resid
