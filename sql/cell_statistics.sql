-- The per-cell statistics of a model with several grouping factors (a cell is a distinct
-- combination of all grouping columns), ordered by cell. For every factor: the index of its
-- level (levels in the sort order of the factor's columns, 0-based) and the level's label
-- (R's, the column values joined by ':').
SELECT {factor_columns}, n, {columns}
FROM group_moments
WHERE complete
ORDER BY {cell_order}
