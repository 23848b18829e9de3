# one(case, data, formula, family, mlpipe_family, link): glmmTMB's fit (the exact Laplace)
# and glmer's beside it, written as OUT/CASE.json; sourced by make_refs.R and
# make_refs_more.R, which set `out` and source read_parquet.R first.
one <- function(case, data, formula, family, mlpipe_family, link) {
  d <- read_parquet(data)
  fam <- family
  m <- glmmTMB(as.formula(formula), d, family = fam)
  g <- glmer(as.formula(formula), d, family = fam,
             control = glmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5)))
  vcs <- VarCorr(m)$cond
  vc <- vcs[[1]]
  res <- list(case = case, data = data, formula = formula, family = mlpipe_family,
              link = link, engine = "glmmTMB",
              loglik = as.numeric(logLik(m)),
              fixed = list(term = names(fixef(m)$cond), estimate = unname(fixef(m)$cond),
                           se = unname(sqrt(diag(vcov(m)$cond)))),
              sd = unname(attr(vc, "stddev")),
              sd_by_group = lapply(vcs, function(v) unname(attr(v, "stddev"))),
              corr = if (ncol(vc) > 1) unname(attr(vc, "correlation")[2, 1]) else NULL,
              glmer = list(loglik = as.numeric(logLik(g)), estimate = unname(fixef(g)),
                           se = unname(sqrt(diag(as.matrix(vcov(g)))))))
  write(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE),
        file.path(out, paste0(case, ".json")))
}
