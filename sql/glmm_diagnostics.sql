-- GLMMs by iterated passes (mlpipe/glmm_passes.py): the diagnostics at the estimates, one
-- more pass over the rows at the final linear predictor (glmm_frame.sql) — the rows whose
-- fitted probability is numerically 0 or 1 (separation) and the Pearson statistic
-- sum (y - t mu)^2 / Var (overdispersion of a Poisson fit).
SELECT count(*) FILTER (WHERE mu < 1e-8 OR mu > 1.0 - 1e-8) AS extreme,
       fsum((y - t * mu) * (y - t * mu) / ({variance})) AS pearson
FROM ({frame}) AS fam
