-- The totals of every component of lag_moments.sql (lag_keys.sql numbers them: r) — the X'X,
-- X'y, y'y parts — and the checks: pairs across cells, repeated times.
SELECT k.r, any_value(k.gap) AS gap, any_value(k.stratum) AS stratum,
       any_value(k.prev_stratum) AS prev_stratum, sum(lm.n) AS n,
       sum(lm.crossing) AS crossing, sum(lm.ties) AS ties, {sums}
FROM lag_moments AS lm
JOIN lag_keys AS k
  ON lm.gap IS NOT DISTINCT FROM k.gap AND lm.stratum = k.stratum
 AND lm.prev_stratum IS NOT DISTINCT FROM k.prev_stratum
WHERE lm.complete
GROUP BY k.r
ORDER BY k.r
