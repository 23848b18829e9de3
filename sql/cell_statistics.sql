-- The per-cell statistics of a model with several grouping factors (a cell is a distinct
-- combination of all grouping columns), in the hash aggregate's order: mlpipe/stats.py
-- orders them by cell from the level indices fetched here (`_order_cells`). For every
-- factor: the index of its level, from the factor's table of levels (factor_levels.sql)
-- joined to the cells; and, where a grouping column is no factor of its own, its rank.
SELECT {factor_columns}, gm.n, {columns}
FROM group_moments AS gm
{joins}
WHERE gm.complete
