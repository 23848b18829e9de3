-- GLMMs: about how many (level, covariate pattern) combinations glmm_patterns.sql would make
-- (HyperLogLog over a hash of the keys: one streaming pass in constant memory, ~2% error),
-- checked before the exact grouping builds them — continuous predictors make every row a
-- pattern, and counting them exactly would hold them all.
SELECT approx_count_distinct(hash({keys}))
FROM (
    SELECT {groups}, {columns}, {y} AS y
    FROM {source} AS src
    WHERE {complete}
) AS frame
