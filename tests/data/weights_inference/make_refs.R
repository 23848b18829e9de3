# References for fixed-effect inference under case weights (lme4's weights =): lmerTest's
# Satterthwaite df, SEs and p-values, and Kenward-Roger from pbkrtest's own algorithm
# (vcovAdj_internal, Lb_ddf) with the residual covariance of the weighted model.  pbkrtest
# itself builds Sigma = Z G Z' + sigma^2 I whatever the prior weights (.get_SigmaG), so its
# (and lmerTest's) Kenward-Roger output for a weighted fit is that of another model: its
# unadjusted SEs are not vcov(m)'s.  Here the last G is diag(1 / w), Sigma rebuilt from it,
# and Phi = vcov(m).  On the weighted data of
# tests/data/formula_language (sleepstudy_w: w = 1 / (1 + Days / 3); penicillin_w:
# w = 1 + (sample index mod 3)).  Usage, from the repository root:
#   Rscript tests/data/weights_inference/make_refs.R
suppressMessages({library(lmerTest); library(pbkrtest); library(jsonlite)})
invisible(Sys.setlocale("LC_COLLATE", "C"))
out <- "tests/data/weights_inference"
read <- function(name) {
  d <- arrow_free_read(name)
  d
}
arrow_free_read <- function(name) {
  py <- Sys.getenv("PYTHON", ".venv/bin/python")
  f <- tempfile(fileext = ".csv")
  system2(py, c("-c", shQuote(sprintf(
    "import polars as pl; pl.read_parquet('tests/data/formula_language/%s.parquet').write_csv('%s')",
    name, f))))
  d <- read.csv(f)
  for (v in names(d)) if (is.character(d[[v]])) d[[v]] <- factor(d[[v]], levels = sort(unique(d[[v]])))
  d
}
one <- function(case, data, formula, weights) {
  d <- read(data)
  m <- lmer(as.formula(formula), data = d, weights = d[[weights]], REML = TRUE,
            control = lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12)))
  res <- list(case = case, data = data, formula = formula, weights = weights,
              reml_criterion = as.numeric(REMLcrit(m)),
              # the summary's "Scaled residuals": Pearson (sqrt(w) (y - fitted)) / sigma
              scaled_residuals = unname(quantile(residuals(m, type = "pearson",
                                                           scaled = TRUE))))
  co <- summary(m, ddf = "Satterthwaite")$coefficients
  res[["Satterthwaite"]] <- list(term = rownames(co), estimate = unname(co[, 1]),
                                 se = unname(co[, 2]), df = unname(co[, 3]), p = unname(co[, 5]))
  SG <- pbkrtest:::get_SigmaG(m)
  SG$G[[SG$n.ggamma]] <- Matrix::Diagonal(x = 1 / d[[weights]])
  gg <- c(unlist(lapply(VarCorr(m), function(v) v[lower.tri(v, diag = TRUE)])), sigma(m)^2)
  SG$Sigma <- Reduce(`+`, Map(`*`, gg, SG$G))
  X <- getME(m, "X")
  Phi <- as.matrix(vcov(m))
  Vadj <- pbkrtest:::vcovAdj_internal(Phi, SG, X)
  p <- ncol(X)
  df <- sapply(seq_len(p), function(j) {
    L <- matrix(0, 1, p); L[j] <- 1
    pbkrtest:::Lb_ddf(L, Phi, Vadj)
  })
  res[["Kenward-Roger"]] <- list(term = colnames(X), estimate = unname(fixef(m)),
                                 se = sqrt(unname(diag(as.matrix(Vadj)))), df = df,
                                 unadjusted_se = sqrt(unname(diag(Phi))))
  write(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE),
        file.path(out, paste0(case, ".json")))
}
one("sleep_weights", "sleepstudy_w", "Reaction ~ Days + (Days | Subject)", "w")
one("penicillin_weights", "penicillin_w", "diameter ~ 1 + (1 | plate) + (1 | sample)", "w")
cat("done\n")
