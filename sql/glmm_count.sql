-- GLMMs: the number of (level, covariate pattern) combinations of glmm_patterns.sql, checked
-- before they are fetched.
SELECT count(*) FROM ({sql}) AS patterns
