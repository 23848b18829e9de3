-- GLMMs by iterated passes (mlpipe/glmm_passes.py): one PIRLS iteration.  At the linear
-- predictor eta = X beta + Z b + offset (beta bound as $beta0.., the conditional modes b of
-- each level joined on the grouping column, with the level's index), per level: the weighted cross-products of the model
-- columns c0.. and the working response zt = eta - offset + score / w, and the
-- log-likelihood (with its constants).  For the Laplace fit's gradient (nAGQ = 1) also the
-- sums of a * dw/deta times each column, a = z' M z with M = Lambda H^-1 Lambda' of the
-- level joined beside its modes ({quad}, {derivative}; empty otherwise).
SELECT idx, {sums}, fsum(ll) AS ll
FROM (
    SELECT *, eta - off + score / w AS zt{derivative}
    FROM (
        SELECT *, {family}
        FROM (
            SELECT md.idx AS idx, fr.*, {eta} AS eta{quad}
            FROM (
                SELECT src.{group} AS grp, {columns}, {offset} AS off, {y} AS y,
                       {trials} AS t, {const} AS cst
                FROM {source} AS src
                WHERE {complete}
            ) AS fr
            JOIN __mlpipe_glmm_modes AS md ON fr.grp = md.grp
        ) AS lin
    ) AS fam
) AS work
GROUP BY idx
