-- The components of lag_moments.sql per cell: each cell numbered in the order
-- group_statistics.sql / cell_statistics.sql read the cells (so the arrays line up), each
-- component by its number in lag_keys.sql.  Unordered: each row is scattered into the
-- arrays by its (cell, component).
SELECT cells.idx, k.r, lm.n, {columns}
FROM lag_moments AS lm
JOIN (
    SELECT {group_by}, row_number() OVER (ORDER BY {cell_order}) - 1 AS idx
    FROM group_moments
    WHERE complete
) AS cells USING ({group_by})
JOIN lag_keys AS k
  ON lm.gap IS NOT DISTINCT FROM k.gap AND lm.stratum = k.stratum
 AND lm.prev_stratum IS NOT DISTINCT FROM k.prev_stratum
WHERE lm.complete
