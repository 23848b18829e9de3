-- Per-group sufficient statistics: sums of cross-products of the model columns [Z X y].
-- One streaming scan of the source (which carries the means of center() / group_mean() from
-- a pre-aggregation when the formula uses them). Rows are grouped by the grouping factor and
-- by whether they are complete (no null in a used column), so the same scan also counts the
-- rows the model drops; the incomplete groups are never read back.
CREATE OR REPLACE TEMP TABLE group_moments AS
SELECT
    grp,
    complete,
    count(*) AS n,
    {sums}
FROM (
    SELECT
        {group} AS grp,
        ({complete}) AS complete,
        {columns}
    FROM {source} AS src
) AS model_frame
GROUP BY grp, complete
