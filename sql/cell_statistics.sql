-- The per-cell statistics of a model with several grouping factors (a cell is a distinct
-- combination of all grouping columns), ordered by cell. For every factor: the index of its
-- level (levels in the sort order of the factor's columns, 0-based; their labels come from
-- factor_levels.sql, once per level). The indices come from one small table of levels per
-- factor joined to the cells — not from a window over the cells, which sorts all of them
-- once per factor.
WITH {level_tables}
SELECT {factor_columns}, gm.n, {columns}
FROM group_moments AS gm
{joins}
WHERE gm.complete
ORDER BY {cell_order}
