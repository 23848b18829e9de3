-- The components of lag_moments.sql per cell, each cell numbered in the order
-- group_statistics.sql / cell_statistics.sql read the cells (so the arrays line up).
SELECT cells.idx, lm.gap, lm.stratum, lm.prev_stratum, lm.n, {columns}
FROM lag_moments AS lm
JOIN (
    SELECT {group_by}, row_number() OVER (ORDER BY {cell_order}) - 1 AS idx
    FROM group_moments
    WHERE complete
) AS cells USING ({group_by})
WHERE lm.complete
ORDER BY cells.idx, lm.gap NULLS FIRST, lm.stratum, lm.prev_stratum
