# glmer's fast mode (nAGQ = 0: theta by the Laplace approximation, beta inside PIRLS) on the
# GLMM datasets of this folder, for mlpipe's nAGQ = 0 fits (mlpipe/glmm_passes.py).
# Usage, from the repository root:  Rscript tests/data/glmm/make_refs_nagq0.R
suppressMessages({library(lme4); library(jsonlite)})
invisible(Sys.setlocale("LC_COLLATE", "C"))
out <- "tests/data/glmm"
py <- Sys.getenv("PYTHON", ".venv/bin/python")
source(file.path(out, "read_parquet.R"))
one <- function(case, data, formula, family, link) {
  d <- read_parquet(data)
  fam <- get(family)(link = link)
  g <- glmer(as.formula(formula), d, family = fam, nAGQ = 0)
  vcs <- VarCorr(g)
  res <- list(case = case, data = data, formula = formula, family = family, link = link,
              nagq = 0, loglik = as.numeric(logLik(g)), deviance = deviance(g),
              estimate = unname(fixef(g)), se = unname(sqrt(diag(as.matrix(vcov(g))))),
              theta = unname(getME(g, "theta")),
              sd_by_group = lapply(vcs, function(v) unname(attr(v, "stddev"))))
  writeLines(toJSON(res, auto_unbox = TRUE, digits = 15), file.path(out, paste0(case, ".json")))
}
one("nagq0_contraception", "contraception", "use ~ age + urban + (1 | district)", "binomial", "logit")
one("nagq0_contraception_slope", "contraception", "use ~ age + urban + (urban | district)", "binomial", "logit")
one("nagq0_contraception_cloglog", "contraception", "use ~ age + urban + (1 | district)", "binomial", "cloglog")
one("nagq0_cbpp", "cbpp", "cbind(incidence, failures) ~ period + (1 | herd)", "binomial", "logit")
one("nagq0_mmmec_slope", "mmmec", "deaths ~ uvb + (uvb | nation) + offset(logexp)", "poisson", "log")
one("nagq0_grouseticks", "grouseticks", "TICKS ~ YEAR + cHEIGHT + (1 | LOCATION)", "poisson", "log")
