-- The distinct components of lag_moments.sql — (gap, stratum, previous stratum); a NULL gap
-- is a series' first row — numbered in a fixed order (r), so that the per-cell rows and the
-- totals name their component by number.
CREATE OR REPLACE TEMP TABLE lag_keys AS
SELECT gap, stratum, prev_stratum,
       CAST(row_number() OVER (ORDER BY gap NULLS FIRST, stratum, prev_stratum NULLS FIRST) - 1
            AS BIGINT) AS r
FROM (SELECT DISTINCT gap, stratum, prev_stratum FROM lag_moments WHERE complete) AS k
