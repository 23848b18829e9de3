-- Predictions for the rows of a data source, in one streaming scan.
--
-- frame:      every input column, plus the internal columns computed from the source row:
--             the population linear predictor X·β (__mlpipe_xb, NULL when a fixed-effect
--             predictor is missing or a factor level is unknown to the model), the response,
--             the grouping key and the columns of Z.
-- join:       a LEFT JOIN of the conditional modes b (one row per group level, O(groups)) on
--             the grouping key; rows of unseen or missing groups find no match, so Z·b is 0
--             and the conditional prediction falls back to the population one.
-- The outer SELECT picks the output columns; the WHERE clause filters rows (the model's
-- complete rows for residuals); ORDER BY on the row number restores the input order, which a
-- join does not preserve; a LIMIT bounds what is fetched into memory.
SELECT {output}
FROM (
    SELECT
        frame.*,
        frame.__mlpipe_xb AS fitted_population,
        frame.__mlpipe_xb + {zb} AS fitted
    FROM (
        SELECT
            {input},
            {frame_columns}
        FROM {source}
        WHERE {where}
    ) AS frame
    {join}
) AS predicted
{order}
{limit}
