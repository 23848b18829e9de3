-- Report: the observed mean of the response by time for the growth plot, over the rows the
-- model used: per distinct time ({bin} is the time itself) or per quantile bin of time
-- ({bin} a CASE on the bin edges); each bin placed at the mean time of its rows.
SELECT {bin} AS bin, avg(CAST({time} AS DOUBLE)) AS time, avg({response}) AS mean,
       count(*) AS n
FROM {source}
WHERE {complete}
GROUP BY bin
ORDER BY time
