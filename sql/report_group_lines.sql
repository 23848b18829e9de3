-- Report: the points of the group-specific regression lines, read by the model's linear
-- predictor (sql/predict.sql).  Per level of the factor drawn (and over all rows, the
-- grouping set ()), the observed range of the slope variable and the other predictors at
-- the level's means (modes for categorical ones); for the levels chosen (registered as
-- mlpipe_pick, by label) and the overall row, a grid of points along the range.  Grouping
-- columns of other factors are NULL, so their conditional modes do not enter the lines;
-- the overall row's keys are NULL too: its points are the fixed-effects line.
WITH summary AS (
    SELECT {keys}, {aggregates}
    FROM {source}
    WHERE {complete}
    GROUP BY GROUPING SETS (({keys}), ())
),
labelled AS (
    SELECT *, CASE WHEN __mlpipe_all = 1 THEN NULL ELSE {label} END AS __mlpipe_line
    FROM summary
),
chosen AS (
    SELECT * FROM labelled
    WHERE __mlpipe_all = 1
       OR __mlpipe_line IN (SELECT mlpipe_level FROM mlpipe_pick)
)
SELECT {keys}, {keep}__mlpipe_all, __mlpipe_line, {lo_hi_x}
FROM chosen CROSS JOIN range(0, {points}) AS grid(__mlpipe_t)
