-- The per-group statistics the solver needs (those involving Z), ordered by group level.
SELECT CAST(grp AS VARCHAR) AS level, n, {columns}
FROM group_moments
WHERE complete
ORDER BY grp
