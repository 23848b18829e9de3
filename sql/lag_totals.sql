-- The totals of every component of lag_moments.sql (the X'X, X'y, y'y parts), and the checks:
-- pairs across cells, repeated times, the number of series (first rows).
SELECT gap, stratum, prev_stratum, sum(n) AS n, sum(crossing) AS crossing, sum(ties) AS ties,
       {sums}
FROM lag_moments
WHERE complete
GROUP BY gap, stratum, prev_stratum
ORDER BY gap NULLS FIRST, stratum, prev_stratum
