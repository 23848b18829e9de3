-- The method of moments (mlpipe/moments.py): one grouping factor's per-level sums, as a
-- temporary table — the level's key columns, its index (0-based, in the sort order of the
-- keys), R's label, the row count and the sums of the fixed-effect columns and of y over
-- the complete rows.  O(levels).
CREATE OR REPLACE TEMP TABLE {table} AS
SELECT {keys},
       CAST(row_number() OVER (ORDER BY {keys}) - 1 AS BIGINT) AS idx,
       {label} AS label, n, {sum_names}
FROM (
    SELECT {keys}, count(*) AS n, {sums}
    FROM (SELECT {key_columns}, {columns} FROM {source} AS src WHERE {complete}) AS frame
    GROUP BY {keys}
) AS levels
