-- Per-group sufficient statistics: sums of cross-products of the model columns [Z X y].
-- One streaming scan of the source (plus one pre-aggregation per level of centering when the
-- formula uses center() / group_mean()); one result row per level of the grouping factor.
CREATE OR REPLACE TEMP TABLE group_moments AS
{means}
SELECT
    grp,
    count(*) AS n,
    {sums}
FROM (
    SELECT
        {group} AS grp,
        {columns}
    FROM {source} AS src{joins}
    WHERE {complete}
) AS model_frame
GROUP BY grp
