-- The columns and types of a data source, without reading its rows.
DESCRIBE SELECT * FROM {source}
