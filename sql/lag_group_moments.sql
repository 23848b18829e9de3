-- The usual per-cell sums of a model with a residual structure: lag_moments.sql's sums of
-- this row's products, added over gaps and strata (the table group_moments.sql builds).
CREATE OR REPLACE TEMP TABLE group_moments AS
SELECT
    {group_by},
    complete,
    sum(n) AS n,
    {sums}
FROM lag_moments
GROUP BY {group_by}, complete
