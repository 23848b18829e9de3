-- GLMMs by iterated passes (mlpipe/glmm_passes.py): the model's complete rows at the current
-- linear predictor eta = X beta + Z b + offset (beta bound as $beta0.., the conditional
-- modes b of each level joined on the grouping column, with the level's index), with the
-- family's mu, working weight w, score and log-likelihood ll.  For the Laplace fit's
-- gradient (nAGQ = 1) also a = z' M z, M = Lambda H^-1 Lambda' of the level joined beside
-- its modes ({quad}; empty otherwise).  glmm_pass.sql and glmm_diagnostics.sql read it.
SELECT *, {family}
FROM (
    SELECT md.idx AS idx, fr.*, {eta} AS eta{quad}
    FROM (
        SELECT src.{group} AS grp, {columns}, {offset} AS off, {y} AS y, {trials} AS t,
               {const} AS cst
        FROM {source} AS src
        WHERE {complete}
    ) AS fr
    JOIN __mlpipe_glmm_modes AS md ON fr.grp = md.grp
) AS lin
