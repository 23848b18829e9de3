-- The statistics pass of a model with a residual structure (mlpipe/residual.py): serial
-- correlation within a series (ar1 / car1) and/or residual variances by stratum.  Each row
-- meets the previous row of its series (LAG over the series ordered by time, complete rows
-- only; without a correlation structure there is no previous row), and the sums are grouped by cell, by the gap to the previous row (NULL for a
-- series' first row) and by the strata of the row and of the previous one:
--   s_i_j  Σ c_i c_j             (this row; summed over gaps and strata: the usual sums)
--   b_i_j  Σ l_i l_j             (the previous row)
--   x_i_j  Σ (l_i c_j + c_i l_j) (across the pair)
-- `crossing` counts pairs whose rows lie in different cells, `ties` pairs with equal times;
-- both are refused.  Without strata the stratum columns are constants, not grouped by.  group_moments.sql's table is then these sums added over gap and strata.
-- The sums are the inner aggregates' {outputs}: the same names, or (pieces constant within
-- cells, mlpipe/residual.py `_LagFactored`) products of their values and sums without them.
CREATE OR REPLACE TEMP TABLE lag_moments AS
SELECT {group_by}, complete, gap, stratum, prev_stratum, n, crossing, ties, {outputs}
FROM (
SELECT
    {group_by},
    complete,
    gap,
    {strata_select},
    count(*) AS n,
    count(*) FILTER (WHERE prev_t IS NOT NULL AND ({crossing})) AS crossing,
    count(*) FILTER (WHERE prev_t = t) AS ties,
    {sums}
FROM (
    SELECT
        *,
        {gap} AS gap
    FROM (
        SELECT
            *,
            {previous}
        FROM (
            SELECT
                {groups},
                ({complete}) AS complete,
                {series},
                {time} AS t,
                {stratum} AS stratum,
                {columns}
            FROM {source} AS src
        ) AS model_frame
        {window}
    ) AS paired
) AS lagged
GROUP BY {group_by}, complete, gap{strata_keys}
) AS sums
