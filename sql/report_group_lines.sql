-- Report: group-specific regression lines. Per group (and over all rows, the grouping set
-- ()), the observed range of the slope variable and the other predictors at their group
-- means (modes for categorical ones); for the chosen groups (registered as mlpipe_pick) a
-- grid of points along the range, with the fitted value of each point.
WITH summary AS (
    SELECT {group}, {aggregates}
    FROM {source}
    WHERE {complete}
    GROUP BY GROUPING SETS (({group}), ())
),
chosen AS (
    SELECT * FROM summary
    WHERE mlpipe_all = 1
       OR CAST({group} AS VARCHAR) IN (SELECT mlpipe_level FROM mlpipe_pick)
),
pts AS (
    SELECT {group}, {keep} mlpipe_all, {lo_hi_x}
    FROM chosen CROSS JOIN range(0, {points}) AS grid(mlpipe_t)
)
SELECT CASE WHEN pts.mlpipe_all = 1 THEN NULL
            ELSE CAST(pts.{group} AS VARCHAR) END AS level,
       CAST({x} AS DOUBLE) AS x,
       {fitted} AS yhat
FROM pts
LEFT JOIN mlpipe_ranef AS r
       ON pts.mlpipe_all = 0 AND CAST(pts.{group} AS VARCHAR) = r.mlpipe_level
