-- Totals over all groups: n, X'X, X'y, y'y (and every other cross-product), and all rows read.
SELECT
    (SELECT coalesce(sum(n), 0) FROM group_moments) AS rows_read,
    {sums}
FROM group_moments
WHERE complete
