-- A fitted model's linear predictor for the rows of a data source, in one streaming scan:
-- the one compilation of X·β + Σ_k Z_k·b_k that predictions, residuals and the report use.
--
-- frame:      every input column, plus the internal columns computed from the source row:
--             the population linear predictor X·β (__mlpipe_xb, NULL when a fixed-effect
--             predictor is missing or a factor level is unknown to the model), the response,
--             the columns of Z and, per grouping column, its key typed as at fit time.
-- joins:      per grouping factor k, a LEFT JOIN of its conditional modes (one row per level,
--             O(levels); sql/predict_modes.sql) as re<k> on that factor's keys; a row whose
--             level of factor k is unseen or has a null finds no match, so Z_k·b_k is 0 and
--             only that factor's contribution drops out.
-- The middle SELECT adds fitted_population (X·β), fitted (X·β + Σ_k Z_k·b_k) and the level
-- each factor matched; the outer SELECT picks the output columns; the WHERE clause filters
-- rows (the model's complete rows for residuals); ORDER BY on the row number restores the
-- input order, which a join does not preserve; a LIMIT bounds what is fetched into memory.
SELECT {output}
FROM (
    SELECT
        frame.*,
        frame.__mlpipe_xb AS fitted_population,
        frame.__mlpipe_xb + {zb} AS fitted{matched}
    FROM (
        SELECT
            {input},
            {frame_columns}
        FROM {source}
        WHERE {where}
    ) AS frame
    {joins}
) AS predicted
{order}
{limit}
