-- Per-group (per-cell) sufficient statistics: sums of cross-products of the model columns
-- [Z X y]. One streaming scan of the source (which carries the means of center() /
-- group_mean() from a pre-aggregation when the formula uses them). Rows are grouped by the
-- grouping column(s) — with several grouping factors, a cell is one distinct combination of
-- all their columns — and by whether they are complete (no null in a used column), so the
-- same scan also counts the rows the model drops; the incomplete groups are never read back.
CREATE OR REPLACE TEMP TABLE group_moments AS
SELECT
    {group_by},
    complete,
    count(*) AS n,
    {sums}
FROM (
    SELECT
        {groups},
        ({complete}) AS complete,
        {columns}
    FROM {source} AS src
) AS model_frame
GROUP BY {group_by}, complete
