-- All rows of the source (answered from Parquet metadata where possible).
SELECT count(*) FROM {source}
