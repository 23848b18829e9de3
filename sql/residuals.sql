-- Conditional residuals y − X·β − Z·b of the rows a model was fitted to, from one scan of the
-- data (the CTE is sql/predict.sql returning the group level and the residual r of the
-- complete rows).  The residuals are materialized once (spilling if need be) and summarized
-- twice: per group (n, mean, variance; O(groups) rows) and over all rows (min, quartiles, max),
-- the latter as the one row whose level is NULL.
WITH resid AS MATERIALIZED (
    {predicted}
)
SELECT
    level,
    count(*) AS n,
    avg(r) AS mean_residual,
    var_samp(r) AS residual_variance,
    CAST(NULL AS DOUBLE[]) AS quantiles
FROM resid
GROUP BY level
UNION ALL
SELECT
    CAST(NULL AS VARCHAR) AS level,
    count(*) AS n,
    avg(r) AS mean_residual,
    var_samp(r) AS residual_variance,
    list_concat([min(r)], {quantile}(r, [0.25, 0.5, 0.75]), [max(r)]) AS quantiles
FROM resid
