-- The per-cell statistics of a model with several grouping factors (a cell is a distinct
-- combination of all grouping columns), ordered by cell. For every factor: the index of its
-- level, from the factor's table of levels (factor_levels.sql) joined to the cells.
SELECT {factor_columns}, gm.n, {columns}
FROM group_moments AS gm
{joins}
WHERE gm.complete
ORDER BY {cell_order}
