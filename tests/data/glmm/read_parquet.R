# read_parquet(name): tests/data/glmm/NAME.parquet as a data.frame, its string columns as
# factors with sorted levels (CSV through the project's Python would lose that), for the
# reference scripts of this folder (make_refs.R, make_refs_nagq0.R).  Needs `out` (this
# folder) and `py` (the Python with polars) set by the script that sources it.
read_parquet <- function(name) {
  f <- tempfile(fileext = ".csv")
  system2(py, c("-c", shQuote(sprintf(paste0(
    "import polars as pl; d = pl.read_parquet('%s/%s.parquet'); d.write_csv('%s'); ",
    "open('%s.str', 'w').write(chr(10).join(c for c, t in d.schema.items() if t == pl.Utf8))"),
    out, name, f, f))))
  strs <- readLines(paste0(f, ".str"), warn = FALSE)
  d <- read.csv(f, colClasses = setNames(rep("character", length(strs)), strs))
  for (v in names(d)) if (is.character(d[[v]])) d[[v]] <- factor(d[[v]], levels = sort(unique(d[[v]])))
  d
}
