# References for the shipped growth configs (configs/egsingle_*.toml) on mlmRev's egsingle
# (tests/data/multilevel/egsingle.parquet, the same rows as data/egsingle.parquet):
#   quadratic  lmer(math ~ poly(year, 2) + (year | schoolid/childid))
#   piecewise  lmer(math ~ pmin(year, 0.5) + pmax(year - 0.5, 0) + (... | schoolid) + (1 | schoolid:childid))
#   ar1        nlme::lme(math ~ year, random = ~ year | schoolid/childid,
#                        correlation = corAR1(form = ~ 1 | schoolid/childid))  (rows sorted by year)
# REML only (the configs' method).  Usage, from the repository root:
#   Rscript tests/data/growth/make_refs.R
suppressMessages({library(lme4); library(nlme); library(mlmRev); library(jsonlite)})
invisible(Sys.setlocale("LC_COLLATE", "C"))
out <- "tests/data/growth"
data(egsingle)
d <- as.data.frame(egsingle)[, c("schoolid", "childid", "year", "math")]
d$schoolid <- factor(as.character(d$schoolid), levels = sort(unique(as.character(d$schoolid))))
d$childid <- factor(as.character(d$childid), levels = sort(unique(as.character(d$childid))))
d <- d[order(d$schoolid, d$childid, d$year), ]

fixed_list <- function(est, se) list(term = names(est), estimate = unname(est), se = unname(se))
save <- function(name, config, loglik, fixed, extra = list()) {
  write(toJSON(c(list(case = name, config = config, loglik = loglik, fixed = fixed), extra),
               auto_unbox = TRUE, digits = NA, pretty = TRUE),
        file.path(out, paste0(name, ".json")))
}
lmer_ref <- function(name, config, formula) {
  m <- lmer(formula, d, REML = TRUE, control = lmerControl(optimizer = "bobyqa",
            optCtrl = list(maxfun = 1e5, rhoend = 1e-12)))
  save(name, config, as.numeric(logLik(m)),
       fixed_list(fixef(m), sqrt(diag(as.matrix(vcov(m))))),
       list(sigma = sigma(m), engine = "lme4"))
}
lmer_ref("egsingle_quadratic", "egsingle_quadratic.toml",
         math ~ poly(year, 2) + (year | schoolid/childid))
lmer_ref("egsingle_piecewise", "egsingle_piecewise.toml",
         math ~ pmin(year, 0.5) + pmax(year - 0.5, 0) + (pmin(year, 0.5) + pmax(year - 0.5, 0) | schoolid) +
           (1 | schoolid:childid))
best <- NULL
for (o in c("nlminb", "optim")) {
  m <- try(lme(math ~ year, random = ~ year | schoolid/childid, data = d, method = "REML",
               correlation = corAR1(form = ~ 1 | schoolid/childid),
               control = lmeControl(maxIter = 500, msMaxIter = 500, niterEM = 100,
                                    msMaxEval = 5000, opt = o)), silent = TRUE)
  if (!inherits(m, "try-error") && (is.null(best) || logLik(m) > logLik(best))) best <- m
}
save("egsingle_ar1", "egsingle_ar1.toml", as.numeric(logLik(best)),
     fixed_list(fixef(best), sqrt(diag(vcov(best)))),
     list(sigma = best$sigma, engine = "nlme",
          phi = unname(coef(best$modelStruct$corStruct, unconstrained = FALSE))))
cat("done\n")
