-- Report: scaled conditional residuals (y − Xβ − Zb)/σ of a reservoir sample of the rows the
-- model used. {fitted} is the compiled linear predictor over the sampled row (β bound as
-- $mlpipe_b*, the conditional modes from the registered mlpipe_ranef table).
WITH frame AS (
    SELECT {columns} FROM {source} WHERE {complete}
),
sampled AS (
    SELECT * FROM frame USING SAMPLE reservoir({sample} ROWS) REPEATABLE (20240601)
)
SELECT (({response}) - ({fitted})) / $mlpipe_sigma AS resid
FROM sampled
LEFT JOIN mlpipe_ranef AS r
       ON CAST({group} AS VARCHAR) = r.mlpipe_level
