-- The method of moments (mlpipe/moments.py): the row counts of every combination of the
-- levels of two grouping factors that occurs (the nonzeros of Z_k'Z_l), as the two levels'
-- indices from their moment_levels.sql tables.  O(combinations), read in batches.
SELECT a.idx AS i, b.idx AS j, CAST(pairs.n AS DOUBLE) AS n
FROM (
    SELECT {keys}, count(*) AS n
    FROM (SELECT {key_columns} FROM {source} AS src WHERE {complete}) AS frame
    GROUP BY {keys}
) AS pairs
JOIN {table_a} AS a ON {join_a}
JOIN {table_b} AS b ON {join_b}
