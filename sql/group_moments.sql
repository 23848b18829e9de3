-- Per-group (per-cell) sufficient statistics: sums of cross-products of the model columns
-- [Z X y]. One streaming scan of the source (which carries the means of center() /
-- group_mean() from a pre-aggregation when the formula uses them). Rows are grouped by the
-- grouping column(s) — with several grouping factors, a cell is one distinct combination of
-- all their columns. A row that is not complete (a null in a used column) has its grouping
-- columns set to NULL, so all of them fall into one group whose count is the rows the model
-- drops (never read back beyond that): one pass counts them, and the hash aggregate has no
-- key column more than the grouping columns (measured: 10-25% of the pass on 10M rows).
-- The outer SELECT names the sums: each is an aggregate itself, or — for a product with
-- pieces constant within the cell (a level-2 predictor) — that constant times an aggregate
-- without it (mlpipe/stats.py, FACTOR_SAMPLE_ROWS).
CREATE OR REPLACE TEMP TABLE group_moments AS
SELECT {group_by}, complete, n, {outputs}
FROM (
    SELECT
        {group_by},
        {first_key} IS NOT NULL AS complete,
        count(*) AS n,
        {sums}
    FROM (
        SELECT * EXCLUDE (complete) REPLACE ({keys_if_complete})
        FROM (
            SELECT
                {groups},
                ({complete}) AS complete,
                {columns}
            FROM {source} AS src
        ) AS rows
    ) AS model_frame
    GROUP BY {group_by}
) AS cell_sums
