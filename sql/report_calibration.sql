-- Report: a GLMM's calibration — the rows the model used in bins of equal size by
-- their fitted mean μ (probability or rate), per bin the trial-weighted mean of μ against the
-- observed mean (Σ y / Σ trials), and the trials.  The inner query is sql/predict.sql
-- returning mu, y and t (the trials: 1 for a 0/1 or count outcome).
SELECT bin, fsum(mu * t) / fsum(t) AS fitted, fsum(y) / fsum(t) AS observed, fsum(t) AS n
FROM (
    SELECT mu, y, t, ntile({bins}) OVER (ORDER BY mu) AS bin
    FROM ({inner}) AS predicted
) AS binned
GROUP BY bin
ORDER BY bin
