-- Report: the rows of a deterministic sample of subjects for the growth (spaghetti) plot,
-- read by the model's linear predictor (sql/predict.sql) for the conditional fit X·β + Z·b.
-- The subjects drawn are the {subjects} whose key label has the smallest MD5 hash: the same
-- on every run and machine, one grouped pass (O(subjects) in DuckDB, none of it in Python).
-- A subject's series longer than {rows} rows is thinned evenly along time (every step-th
-- row), so at most {subjects} × {rows} rows come back.  `used` is not materialized: two
-- streaming scans of the source rather than all its rows held.
WITH used AS NOT MATERIALIZED (
    SELECT *, {label} AS __mlpipe_subject, CAST({time} AS DOUBLE) AS __mlpipe_time
    FROM {source}
    WHERE {complete}
),
subjects AS (
    SELECT __mlpipe_subject, count(*) AS __mlpipe_n, md5(__mlpipe_subject) AS __mlpipe_hash
    FROM used
    GROUP BY __mlpipe_subject
),
picked AS (
    SELECT __mlpipe_subject, __mlpipe_n, count(*) OVER () AS __mlpipe_subjects,
           row_number() OVER (ORDER BY __mlpipe_hash, __mlpipe_subject) AS __mlpipe_rank
    FROM subjects
    QUALIFY __mlpipe_rank <= {subjects}
),
numbered AS (
    SELECT used.*, picked.__mlpipe_n, picked.__mlpipe_subjects, picked.__mlpipe_rank,
           row_number() OVER (PARTITION BY used.__mlpipe_subject
                              ORDER BY used.__mlpipe_time, {order}) AS __mlpipe_k
    FROM used JOIN picked ON used.__mlpipe_subject = picked.__mlpipe_subject
)
SELECT * FROM numbered
WHERE __mlpipe_n <= {rows}
   OR (__mlpipe_k - 1) % CAST(ceil(__mlpipe_n / {rows}) AS BIGINT) = 0
