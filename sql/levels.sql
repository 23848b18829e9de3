-- Sorted distinct levels of the categorical predictors, over the rows the model uses.
SELECT {lists}
FROM {source}
WHERE {complete}
