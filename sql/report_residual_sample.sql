-- Report: a reservoir sample of the rows the model used (no null in a model column), read
-- by the model's linear predictor (sql/predict.sql) for the scaled residuals
-- (y − Xβ − Σ Z_k b_k)/σ of the Q-Q plot.
WITH used AS (
    SELECT * FROM {source} WHERE {complete}
)
SELECT * FROM used USING SAMPLE reservoir({sample} ROWS) REPEATABLE (20240601)
