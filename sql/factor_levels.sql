-- The levels of one grouping factor of a model with several (cells grouped in
-- group_moments), as a temporary table: the factor's key columns, the level's index (0-based,
-- in the sort order of those columns) and R's label (the column values joined by ':').  One
-- row per level: cell_statistics.sql joins it to the cells for their level indices (a window
-- over the cells would sort all of them once per factor), and the labels are read from it,
-- so a crossed design of millions of cells builds its strings for the levels only.
-- {distinct} is DISTINCT, or empty for a factor on all the cells' columns (its levels are
-- the cells: no hash of millions of rows to find them).
CREATE OR REPLACE TEMP TABLE {table} AS
SELECT {keys},
       CAST(row_number() OVER (ORDER BY {keys}) - 1 AS BIGINT) AS idx,
       {label} AS label
FROM (SELECT {distinct} {keys} FROM group_moments WHERE complete) AS levels
