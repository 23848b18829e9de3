-- The per-cell statistics of a model with several grouping factors (a cell is a distinct
-- combination of all grouping columns), ordered by cell. For every factor: the index of its
-- level (levels in the sort order of the factor's columns, 0-based; their labels come from
-- factor_levels.sql, once per level).
SELECT {factor_columns}, n, {columns}
FROM group_moments
WHERE complete
ORDER BY {cell_order}
