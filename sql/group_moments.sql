-- Per-group sufficient statistics: sums of cross-products of the model columns [Z X y].
-- One streaming scan of the source; the result has one row per level of the grouping factor.
CREATE OR REPLACE TEMP TABLE group_moments AS
SELECT
    grp,
    count(*) AS n,
    {sums}
FROM (
    SELECT
        {group} AS grp,
        {columns}
    FROM {source}
    WHERE {complete}
) AS model_frame
GROUP BY grp
