-- GLMMs by iterated passes (mlpipe/glmm_passes.py): the diagnostics at the estimates, one
-- more pass — the rows whose fitted probability is numerically 0 or 1 (separation) and the
-- Pearson statistic sum (y - t mu)^2 / Var (overdispersion of a Poisson fit).
SELECT count(*) FILTER (WHERE mu < 1e-8 OR mu > 1.0 - 1e-8) AS extreme,
       fsum((y - t * mu) * (y - t * mu) / ({variance})) AS pearson
FROM (
    SELECT *, {family}
    FROM (
        SELECT md.idx AS idx, fr.*, {eta} AS eta
        FROM (
            SELECT src.{group} AS grp, {columns}, {offset} AS off, {y} AS y,
                   {trials} AS t, {const} AS cst
            FROM {source} AS src
            WHERE {complete}
        ) AS fr
        JOIN __mlpipe_glmm_modes AS md ON fr.grp = md.grp
    ) AS lin
) AS fam
