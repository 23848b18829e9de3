-- The levels of one grouping factor of a model with several (cells grouped in
-- group_moments), in the sort order of the factor's columns — the order in which
-- cell_statistics.sql numbers them with dense_rank() — with R's label: the column values
-- joined by ':'.  One row per level, so a crossed design of millions of cells builds its
-- strings for the levels only.
SELECT {label} AS label
FROM (SELECT DISTINCT {keys} FROM group_moments WHERE complete) AS levels
ORDER BY {keys}
