-- GLMMs: the rows read and the complete rows used.
SELECT count(*), count(*) FILTER (WHERE {complete}) FROM {source} AS src
