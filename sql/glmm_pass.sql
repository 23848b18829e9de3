-- GLMMs by iterated passes (mlpipe/glmm_passes.py): one PIRLS iteration.  Over the rows at
-- the current linear predictor (glmm_frame.sql), per level: the weighted cross-products of
-- the model columns c0.. and the working response zt = eta - offset + score / w, and the
-- log-likelihood (with its constants); for the Laplace fit's gradient also the sums of
-- a * dw/deta times each column ({derivative}; empty otherwise).
SELECT idx, {sums}, fsum(ll) AS ll
FROM (
    SELECT *, eta - off + score / w AS zt{derivative}
    FROM ({frame}) AS fam
) AS work
GROUP BY idx
