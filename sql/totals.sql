-- Totals over all groups: n, X'X, X'y, y'y (and every other cross-product).
SELECT {sums}
FROM group_moments
