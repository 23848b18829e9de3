# GLMM references made with glmmTMB (the exact Laplace approximation, derivatives by automatic
# differentiation) and, beside each, glmer (lme4) — whose standard errors come from a
# finite-difference Hessian and sit ~1% from the exact ones.  The glmer references of
# ../shared/reference/glmm (cbpp_logit, cbpp_logit_agq, mmmec_pois_offset) are copied here.
# Usage, from the repository root:  Rscript tests/data/glmm/make_refs.R
suppressMessages({library(glmmTMB); library(lme4); library(mlmRev); library(jsonlite)
                  library(ordinal)})
invisible(Sys.setlocale("LC_COLLATE", "C"))
out <- "tests/data/glmm"
py <- Sys.getenv("PYTHON", ".venv/bin/python")
source(file.path(out, "read_parquet.R"))
# mlmRev's Contraception (Bangladesh 1988): a 0/1 outcome, 1934 women in 60 districts
data(Contraception)
con <- data.frame(use = as.integer(Contraception$use == "Y"), age = Contraception$age,
                  urban = as.character(Contraception$urban),
                  district = as.character(Contraception$district))
f <- file.path(out, "contraception.csv")
write.csv(con, f, row.names = FALSE)
system2(py, c("-c", shQuote(sprintf(
  "import polars as pl; pl.read_csv('%s', schema_overrides={'district': pl.Utf8, 'urban': pl.Utf8}).write_parquet('%s')",
  f, sub("csv$", "parquet", f)))))
unlink(f)
# lme4's grouseticks (red grouse chicks: ticks counted on 403 chicks in 118 broods at 63
# locations, 1995-97): nested factors (brood within location) and an observation-level one
data(grouseticks)
gt <- data.frame(TICKS = grouseticks$TICKS, YEAR = as.character(grouseticks$YEAR),
                 cHEIGHT = grouseticks$cHEIGHT, INDEX = as.character(grouseticks$INDEX),
                 BROOD = as.character(grouseticks$BROOD),
                 LOCATION = as.character(grouseticks$LOCATION))
f <- file.path(out, "grouseticks.csv")
write.csv(gt, f, row.names = FALSE)
system2(py, c("-c", shQuote(sprintf(paste0(
  "import polars as pl; pl.read_csv('%s', schema_overrides={c: pl.Utf8 for c in ",
  "['YEAR', 'INDEX', 'BROOD', 'LOCATION']}).write_parquet('%s')"), f, sub("csv$", "parquet", f)))))
unlink(f)
source(file.path(out, "tmb_glmer_pair.R"))  # one(): glmmTMB + glmer, one JSON
one("tmb_cbpp_logit", "cbpp", "cbind(incidence, failures) ~ period + (1 | herd)",
    binomial(), "binomial", "logit")
one("tmb_cbpp_probit", "cbpp", "cbind(incidence, failures) ~ period + (1 | herd)",
    binomial(link = "probit"), "binomial", "probit")
one("tmb_cbpp_cloglog", "cbpp", "cbind(incidence, failures) ~ period + (1 | herd)",
    binomial(link = "cloglog"), "binomial", "cloglog")
one("tmb_mmmec_offset", "mmmec", "deaths ~ uvb + (1 | region) + offset(logexp)",
    poisson(), "poisson", "log")
one("tmb_mmmec_slope", "mmmec", "deaths ~ uvb + (uvb | nation) + offset(logexp)",
    poisson(), "poisson", "log")
one("tmb_contraception", "contraception", "use ~ age + urban + (1 | district)",
    binomial(), "binomial", "logit")
one("tmb_contraception_slope", "contraception", "use ~ age + urban + (urban | district)",
    binomial(), "binomial", "logit")
one("tmb_cbpp_crossed", "cbpp", "cbind(incidence, failures) ~ 1 + (1 | herd) + (1 | period)",
    binomial(), "binomial", "logit")
one("tmb_grouseticks_nested", "grouseticks",
    "TICKS ~ YEAR + cHEIGHT + (1 | BROOD) + (1 | LOCATION)", poisson(), "poisson", "log")
one("tmb_grouseticks_olre", "grouseticks",
    "TICKS ~ YEAR + cHEIGHT + (1 | INDEX) + (1 | BROOD) + (1 | LOCATION)", poisson(),
    "poisson", "log")
# the negative binomial (NB2, theta estimated): glmer.nb's convention (the Laplace of PIRLS
# with the expected weights; glmmTMB's nbinom2 uses the observed Hessian, another
# approximation), with glmmTMB's figures beside it
nb_one <- function(case, data, formula) {
  d <- read_parquet(data)
  g <- glmer.nb(as.formula(formula), d)
  t <- glmmTMB(as.formula(formula), d, family = nbinom2)
  res <- list(case = case, data = data, formula = formula, family = "negative_binomial",
              link = "log", engine = "glmer.nb", loglik = as.numeric(logLik(g)),
              theta = getME(g, "glmer.nb.theta"),
              fixed = list(term = names(fixef(g)), estimate = unname(fixef(g)),
                           se = unname(sqrt(diag(as.matrix(vcov(g)))))),
              sd = unname(as.data.frame(VarCorr(g))$sdcor),
              glmmTMB = list(loglik = as.numeric(logLik(t)), theta = sigma(t)))
  write(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE),
        file.path(out, paste0(case, ".json")))
}
nb_one("nb_grouseticks", "grouseticks", "TICKS ~ YEAR + cHEIGHT + (1 | LOCATION)")
# the gamma with a log link and its dispersion by maximum likelihood: glmmTMB (glmer's gamma
# scale is not maximum likelihood); sleepstudy's reaction times (copied as sleepstudy.parquet)
gamma_one <- function(case, data, formula, link = "log") {
  d <- read_parquet(data)
  m <- glmmTMB(as.formula(formula), d, family = Gamma(link = link))
  vcs <- VarCorr(m)$cond
  res <- list(case = case, data = data, formula = formula, family = "gamma", link = link,
              engine = "glmmTMB", loglik = as.numeric(logLik(m)),
              dispersion = sigma(m)^2,  # glmmTMB's sigma for Gamma: sqrt(dispersion), the CV
              fixed = list(term = names(fixef(m)$cond), estimate = unname(fixef(m)$cond),
                           se = unname(sqrt(diag(vcov(m)$cond)))),
              sd_by_group = lapply(vcs, function(v) unname(attr(v, "stddev"))))
  write(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE),
        file.path(out, paste0(case, ".json")))
}
gamma_one("gamma_sleep_rs", "sleepstudy", "Reaction ~ Days + (Days | Subject)")
gamma_one("gamma_sleep_ri", "sleepstudy", "Reaction ~ Days + (1 | Subject)")
# the inverse link (the gamma's canonical one): 1/Reaction linear in Days
gamma_one("gamma_sleep_inverse_ri", "sleepstudy", "I(Reaction/100) ~ Days + (1 | Subject)", "inverse")
gamma_one("gamma_sleep_inverse_rs", "sleepstudy", "I(Reaction/100) ~ Days + (Days | Subject)", "inverse")
# ordinal outcomes: ordinal::clmm (cumulative link, the Laplace approximation) on its wine
# data (72 bitterness ratings 1-5 of wines by 9 judges; copied as wine.parquet)
data(wine)
wf <- file.path(out, "wine.csv")
write.csv(data.frame(rating = as.integer(as.character(wine$rating)),
                     temp = as.character(wine$temp), contact = as.character(wine$contact),
                     judge = as.character(wine$judge)), wf, row.names = FALSE)
system2(py, c("-c", shQuote(sprintf(paste0(
  "import polars as pl; pl.read_csv('%s', schema_overrides={'judge': pl.Utf8, 'temp': pl.Utf8, ",
  "'contact': pl.Utf8}).write_parquet('%s')"), wf, sub("csv$", "parquet", wf)))))
unlink(wf)
clmm_one <- function(case, formula, link) {
  d <- read_parquet("wine")
  d$rating <- factor(d$rating, levels = sort(unique(d$rating)), ordered = TRUE)
  m <- clmm(as.formula(formula), data = d, link = link, Hess = TRUE, nAGQ = 1)
  co <- summary(m)$coefficients
  nth <- length(m$alpha)
  res <- list(case = case, data = "wine", formula = formula, family = "ordinal", link = link,
              engine = "ordinal::clmm", loglik = as.numeric(logLik(m)),
              thresholds = list(term = rownames(co)[1:nth], estimate = unname(co[1:nth, 1]),
                                se = unname(co[1:nth, 2])),
              fixed = list(term = rownames(co)[-(1:nth)], estimate = unname(co[-(1:nth), 1]),
                           se = unname(co[-(1:nth), 2])),
              sd = unname(attr(VarCorr(m)[[1]], "stddev")))
  write(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE),
        file.path(out, paste0(case, ".json")))
}
clmm_one("clmm_wine_logit", "rating ~ temp + contact + (1 | judge)", "logit")
clmm_one("clmm_wine_probit", "rating ~ temp + contact + (1 | judge)", "probit")
cat("done\n")
