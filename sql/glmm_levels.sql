-- GLMMs by iterated passes (mlpipe/glmm_passes.py): the grouping factor's levels over the
-- complete rows, numbered in their sort order (idx), with their row counts.  Every pass
-- joins the data to it, and the conditional modes by idx.
CREATE OR REPLACE TEMP TABLE __mlpipe_glmm_levels AS
SELECT grp, CAST(row_number() OVER (ORDER BY grp) - 1 AS BIGINT) AS idx, n
FROM (SELECT src.{group} AS grp, count(*) AS n
      FROM {source} AS src WHERE {complete} GROUP BY src.{group}) AS levels
