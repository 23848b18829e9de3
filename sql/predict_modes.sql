-- One grouping factor's conditional modes as a join partner of sql/predict.sql: the
-- registered table has one row per level (O(levels)) with its label __mlpipe_level, the
-- label's parts __mlpipe_p<j> (one per grouping column j of the factor) and one column
-- __mlpipe_b<a> per random-effect term.  The parts are cast to the grouping columns' types
-- at fit time (__mlpipe_g<j>) and matched to the row's keys of the same name; when a value
-- contains ':' the label cannot be split and the row's label is matched instead.
LEFT JOIN (
    SELECT *{keys}
    FROM {table}
) AS {alias} ON {on}
