# lmerTest anova() references for tests/test_anova.py: type III (and I, II) F tests with
# Satterthwaite and Kenward-Roger denominator df, on real data.
#
# Usage (from the repository root):
#   Rscript tests/data/anova/make_refs.R [OUTDIR]        # OUTDIR defaults to tests/data/anova
# Environment: PYTHON (default .venv/bin/python) reads the Parquet files to CSV for R.
#
# The data are the Parquet files in this directory (copies of tests/data/{sleepstudy,hsb82}.parquet
# and tests/data/extra/{cake,oats,machines}.parquet); string columns become factors with
# their levels sorted in byte order (LC_COLLATE=C), the first being the reference level, as
# mlpipe codes them.  Each JSON holds the model, every table anova(m, type, ddf) printed and
# lmerTest's type III hypothesis matrices (attr(, "hypotheses")).
suppressMessages({library(lmerTest); library(pbkrtest); library(jsonlite)})
invisible(Sys.setlocale("LC_COLLATE", "C"))
args <- commandArgs(TRUE); out <- if (length(args)) args[1] else "tests/data/anova"
py <- Sys.getenv("PYTHON", ".venv/bin/python")

read_parquet <- function(name) {
  pq <- file.path(out, paste0(name, ".parquet"))
  csv <- tempfile(fileext = ".csv")
  facs <- system2(py, c("-c", shQuote(sprintf(paste0(
    "import polars as pl; d = pl.read_parquet('%s'); d.write_csv('%s'); ",
    "print(' '.join(c for c, t in d.schema.items() if t == pl.String))"), pq, csv))),
    stdout = TRUE)
  facs <- strsplit(facs, " ")[[1]]
  d <- read.csv(csv, colClasses = setNames(rep("character", length(facs)), facs))
  for (v in names(d)) if (is.character(d[[v]])) d[[v]] <- factor(d[[v]], levels = sort(unique(d[[v]])))
  d
}

tab_rows <- function(a) {
  lapply(seq_len(nrow(a)), function(i) list(
    term = rownames(a)[i], sum_sq = a[i, "Sum Sq"], mean_sq = a[i, "Mean Sq"],
    numdf = a[i, "NumDF"], dendf = a[i, "DenDF"], f_value = a[i, "F value"],
    p_value = a[i, "Pr(>F)"]))
}

models <- list(
  list(name = "sleep_factor_days", data = "sleepstudy",
       formula = "Reaction ~ factor(Days) + (Days | Subject)", kr = TRUE),
  list(name = "cake_recipe_temp", data = "cake",
       formula = "angle ~ recipe * temp + (1 | replicate)", kr = TRUE),
  list(name = "cake_recipe_temperature", data = "cake",
       formula = "angle ~ recipe * temperature + (1 | replicate)", kr = FALSE),
  list(name = "oats_nested", data = "oats",
       formula = "yield ~ Variety * nitro + (1 | Block/Variety)", kr = TRUE),
  list(name = "hsb_cross_level", data = "hsb82",
       formula = "mAch ~ meanses*cses + sector*cses + (cses | school)", kr = TRUE),
  list(name = "machines_nested", data = "machines",
       formula = "score ~ Machine + (1 | Worker) + (1 | Worker:Machine)", kr = TRUE)
)

for (spec in models) {
  d <- read_parquet(spec$data)
  m <- lmer(as.formula(spec$formula), data = d, REML = TRUE,
            control = lmerControl(optimizer = "bobyqa",
                                  optCtrl = list(rhobeg = 2e-4, rhoend = 2e-10, maxfun = 1e5)))
  tables <- list()
  for (type in c("III", "II", "I")) {
    ddfs <- if (spec$kr) c("Satterthwaite", "Kenward-Roger") else "Satterthwaite"
    for (ddf in ddfs) {
      a <- anova(m, type = type, ddf = ddf)
      tables[[length(tables) + 1]] <- list(type = type, ddf = ddf, heading = attr(a, "heading"),
                                           rows = tab_rows(a))
    }
  }
  hyp <- attr(anova(m, type = "III"), "hypotheses")
  hyp <- lapply(names(hyp), function(nm) list(term = nm, L = unname(hyp[[nm]]),
                                              columns = colnames(hyp[[nm]])))
  res <- list(name = spec$name, data = paste0(spec$data, ".parquet"), formula = spec$formula,
              method = "REML", lmerTest = as.character(packageVersion("lmerTest")),
              pbkrtest = as.character(packageVersion("pbkrtest")),
              lme4 = as.character(packageVersion("lme4")),
              REMLcrit = unname(REMLcrit(m)), beta = unname(fixef(m)),
              fixed_names = names(fixef(m)), tables = tables, hypotheses_type3 = hyp)
  writeLines(toJSON(res, digits = NA, auto_unbox = TRUE, pretty = TRUE, matrix = "rowmajor"),
             file.path(out, paste0(spec$name, ".json")))
  cat("wrote", spec$name, "\n")
  print(anova(m))
}
