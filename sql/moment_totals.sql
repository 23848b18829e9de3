-- The method of moments (mlpipe/moments.py): the rows read and used, and X'X, X'y, y'y over
-- the complete rows (compensated sums).
SELECT count(*) AS rows_read, count(*) FILTER (WHERE complete) AS n, {sums}
FROM (SELECT ({complete}) AS complete, {columns} FROM {source} AS src) AS frame
