-- GLMMs by iterated passes (mlpipe/glmm_passes.py): one PIRLS iteration.  At the linear
-- predictor eta = X beta + Z b + offset (beta bound as $beta0.., the conditional modes b of
-- each level joined by its index), per level: the weighted cross-products of the model
-- columns c0.. and the working response zt = eta - offset + score / w, and the
-- log-likelihood (with its constants).
SELECT idx, {sums}, fsum(ll) AS ll
FROM (
    SELECT *, eta - off + score / w AS zt
    FROM (
        SELECT *, {family}
        FROM (
            SELECT fr.*, {eta} AS eta
            FROM (
                SELECT lv.idx AS idx, {columns}, {offset} AS off, {y} AS y, {trials} AS t,
                       {const} AS cst
                FROM {source} AS src
                JOIN __mlpipe_glmm_levels AS lv ON src.{group} = lv.grp
                WHERE {complete}
            ) AS fr
            LEFT JOIN __mlpipe_glmm_modes AS md ON fr.idx = md.idx
        ) AS lin
    ) AS fam
) AS work
GROUP BY idx
