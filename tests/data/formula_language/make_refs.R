# lme4 reference fits for tests/test_formula_language.py: the formula pieces of issue 12
# (factor(), relevel(), %in%, ^, pi, offset(), scale(), poly()) and case weights, on real
# datasets (lme4's sleepstudy and Penicillin, mlmRev's Hsb82, lme4's cake).  Same JSON
# layout as tests/data/extra/*.json, plus `weights` (the weight column, if any) and
# `fitted_head` (lme4's fitted values of the first 20 rows, offset included).
#
# Usage (from the repository root):
#   Rscript tests/data/formula_language/make_refs.R [OUTDIR [CASE ...]]   # default tests/data/formula_language
# Environment: PYTHON (default .venv/bin/python) converts the exported CSVs to Parquet.
#
# Data flow as in tests/data/extra/make_refs.R: each dataset is written to CSV by R
# (15 significant digits), read back, the models are fitted on the read-back data and the
# CSV is converted to Parquet (factors as strings).  Factor levels sort in byte order.
# Weights: sleepstudy's w = 1 / (1 + Days / 3) (later days less precise), Penicillin's
# w = 1 + (sample index mod 3), and HSB reduced to cell means (school x sex x minority)
# weighted by the cell's size n — the usual use of prior weights for aggregated data.
suppressMessages({library(lme4); library(mlmRev); library(jsonlite)})
invisible(Sys.setlocale("LC_COLLATE", "C"))
args <- commandArgs(TRUE); out <- if (length(args)) args[1] else "tests/data/formula_language"
only <- if (length(args) > 1) args[-1] else NULL
csvdir <- Sys.getenv("CSVDIR", file.path(tempdir(), "formula_language_csv"))
dir.create(csvdir, recursive = TRUE, showWarnings = FALSE)
dir.create(out, recursive = TRUE, showWarnings = FALSE)

export <- function(d, name) {
  d <- as.data.frame(d)
  for (v in names(d)) if (is.factor(d[[v]])) d[[v]] <- as.character(d[[v]])
  f <- file.path(csvdir, paste0(name, ".csv"))
  write.csv(d, f, row.names = FALSE)
  facs <- names(d)[sapply(d, is.character)]
  writeLines(facs, file.path(csvdir, paste0(name, ".factors")))
  back <- read.csv(f, colClasses = setNames(rep("character", length(facs)), facs))
  for (v in facs) back[[v]] <- factor(back[[v]], levels = sort(unique(back[[v]])))
  back
}

vc_list <- function(m) {
  vc <- as.data.frame(VarCorr(m))
  lapply(seq_len(nrow(vc)), function(i) list(grp = vc$grp[i], var1 = vc$var1[i],
     var2 = vc$var2[i], vcov = vc$vcov[i], sdcor = vc$sdcor[i]))
}
crit <- function(m) as.numeric(if (isREML(m)) REMLcrit(m) else deviance(m))

# lme4 at the best optimum it finds, polished with a tight bobyqa (as extra/make_refs.R)
best_fit <- function(formula, data, reml, weights) {
  one <- function(opt, start = NULL, rhoend = NULL) {
    args <- list(formula = as.formula(formula), data = data, REML = reml, start = start,
                 control = lmerControl(optimizer = opt, calc.derivs = FALSE,
                                       optCtrl = if (is.null(rhoend)) list() else
                                         list(rhoend = rhoend)))
    if (!is.null(weights)) args$weights <- data[[weights]]
    suppressMessages(suppressWarnings(do.call(lmer, args)))
  }
  fits <- list(bobyqa = one("bobyqa"), Nelder_Mead = one("Nelder_Mead"))
  crits <- sapply(fits, crit)
  k <- names(which.min(crits))
  pol <- one("bobyqa", list(theta = getME(fits[[k]], "theta")), rhoend = 1e-12)
  if (crit(pol) < crits[[k]]) return(list(fit = pol, optimizer = "polished"))
  list(fit = fits[[k]], optimizer = k)
}

fit_one <- function(case, data, formula, dataname, weights = NULL) {
  res <- list(case = case, data = dataname, formula = formula, weights = weights,
              lme4_version = as.character(packageVersion("lme4")))
  for (reml in c(TRUE, FALSE)) {
    best <- best_fit(formula, data, reml, weights)
    m <- best$fit
    fe <- summary(m)$coefficients
    re <- ranef(m, condVar = TRUE)
    ranefs <- lapply(names(re), function(g) {
      r <- re[[g]]; pv <- attr(r, "postVar")
      sds <- t(apply(pv, 3, function(M) sqrt(diag(M))))
      if (ncol(r) == 1) sds <- t(sds)
      list(group = g, levels = rownames(r), terms = colnames(r),
           values = unname(as.matrix(r)), cond_sd = unname(matrix(sds, nrow = nrow(r))))
    })
    key <- if (reml) "reml" else "ml"
    res[[key]] <- list(
      fixed = list(term = rownames(fe), estimate = unname(fe[, 1]), se = unname(fe[, 2])),
      varcorr = vc_list(m), sigma = sigma(m), loglik = as.numeric(logLik(m)),
      deviance_or_reml = crit(m), aic = AIC(m), bic = BIC(m), nobs = nobs(m),
      ngroups = as.list(ngrps(m)), singular = isSingular(m),
      theta = unname(getME(m, "theta")), optimizer = best$optimizer,
      ranef = ranefs, fitted_head = unname(head(fitted(m), 20)))
  }
  write(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE),
        file.path(out, paste0(case, ".json")))
  cat("done", case, "\n")
}

data(sleepstudy); data(Penicillin); data(Hsb82); data(cake)
s <- sleepstudy; s$w <- 1 / (1 + s$Days / 3)
sleep <- export(s, "sleepstudy_w")
p <- Penicillin; p$w <- 1 + (as.integer(p$sample) %% 3)
pen <- export(p, "penicillin_w")
hsb <- export(Hsb82[, c("school", "mAch", "ses", "cses", "meanses", "sector", "sx",
                        "minrty")], "hsb")
cells <- aggregate(cbind(mAch, ses) ~ school + sx + minrty + sector, data = Hsb82, FUN = mean)
cells$n <- aggregate(mAch ~ school + sx + minrty + sector, data = Hsb82, FUN = length)$mAch
cells <- export(cells[order(cells$school, cells$sx, cells$minrty), ], "hsb_cells")
ck <- cake[, c("replicate", "recipe", "temp", "angle")]
ck$replicate <- as.integer(as.character(ck$replicate))
ck <- export(ck, "cake")
# datasets the formula code was not developed on: nlme's Milk (Time 1-19: factor() of a
# number with two-digit levels), mlmRev's star (NAs in the response and in sx, eth: R
# evaluates scale() and poly() on every row of the data, the NA rows included, before it
# drops them) and Early (three ages, a treatment)
milk <- export(nlme::Milk[, c("Cow", "Diet", "Time", "protein")], "milk")
data(star); data(Early)
st <- export(star[, c("id", "sch", "tch", "cltype", "sx", "eth", "yrs", "math")], "star")
early <- export(Early[, c("id", "cog", "age", "trt")], "early")

cases <- list(
  list("sleep_factor", sleep, "Reaction ~ factor(Days) + (1 | Subject)", "sleepstudy_w"),
  list("sleep_relevel", sleep, 'Reaction ~ relevel(factor(Days), "3") + (1 | Subject)',
       "sleepstudy_w"),
  list("cake_factor_interaction", ck, "angle ~ recipe * factor(temp) + (1 | replicate)",
       "cake"),
  list("hsb_relevel_string", hsb, 'mAch ~ relevel(sector, "Public") * cses + (cses | school)',
       "hsb"),
  list("hsb_power", hsb, "mAch ~ (meanses + cses + sector)^2 + (cses | school)", "hsb"),
  list("hsb_in", hsb, "mAch ~ sector + cses %in% sector + (cses | school)", "hsb"),
  list("sleep_pi", sleep, "Reaction ~ Days + I(sin(2 * pi * Days/7)) + (Days | Subject)",
       "sleepstudy_w"),
  list("sleep_offset", sleep, "Reaction ~ Days + offset(10 * Days) + (Days | Subject)",
       "sleepstudy_w"),
  list("sleep_weights", sleep, "Reaction ~ Days + (Days | Subject)", "sleepstudy_w", "w"),
  list("hsb_cells_weights", cells, "mAch ~ ses + sx + minrty + sector + (1 | school)",
       "hsb_cells", "n"),
  list("penicillin_weights", pen, "diameter ~ 1 + (1 | plate) + (1 | sample)",
       "penicillin_w", "w"),
  list("sleep_scale", sleep, "Reaction ~ scale(Days) + (scale(Days) | Subject)",
       "sleepstudy_w"),
  list("sleep_poly", sleep, "Reaction ~ poly(Days, 2) + (1 | Subject)", "sleepstudy_w"),
  # piecewise-linear growth (mlpipe's pw(Days, 4) is these two columns)
  list("sleep_piecewise", sleep, paste("Reaction ~ pmin(Days, 4) + pmax(Days - 4, 0) +",
       "(pmin(Days, 4) + pmax(Days - 4, 0) | Subject)"), "sleepstudy_w"),
  list("hsb_poly", hsb, "mAch ~ poly(ses, 3) + sector + (1 | school)", "hsb"),
  # stop 27's additions
  list("milk_factor_time", milk, "protein ~ factor(Time) + Diet + (1 | Cow)", "milk"),
  list("milk_poly_diet", milk, "protein ~ poly(Time, 3) * Diet + (1 | Cow)", "milk"),
  list("star_scale_na", st, "math ~ scale(yrs) + cltype + (scale(yrs) | sch)", "star"),
  list("star_poly_na", st, "math ~ poly(yrs, 2) + sx + (1 | sch)", "star"),
  list("star_power_relevel", st,
       'math ~ (relevel(cltype, "reg") + sx + yrs)^2 + (1 | sch)', "star"),
  list("early_poly_trt", early, "cog ~ poly(age, 2) * trt + (1 | id)", "early")
)
for (c in cases) if (is.null(only) || c[[1]] %in% only)
  tryCatch(fit_one(c[[1]], c[[2]], c[[3]], c[[4]], if (length(c) > 4) c[[5]] else NULL),
           error = function(e) cat("FAIL", c[[1]], conditionMessage(e), "\n"))

# poly()'s coefficients, to check the pre-pass (R's attr(poly(x, k), "coefs"))
coefs <- list(sleep_days_2 = attr(poly(sleep$Days, 2), "coefs"),
              hsb_ses_3 = attr(poly(hsb$ses, 3), "coefs"),
              sleep_scale = list(center = mean(sleep$Days), scale = sd(sleep$Days)))
write(toJSON(coefs, auto_unbox = TRUE, digits = NA, pretty = TRUE),
      file.path(out, "poly_coefs.json"))

py <- Sys.getenv("PYTHON", ".venv/bin/python")
conv <- '
import sys, pathlib, pyarrow as pa, pyarrow.csv as pc, pyarrow.parquet as pq
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for f in sorted(src.glob("*.csv")):
    facs = [x for x in f.with_suffix(".factors").read_text().split() if x]
    t = pc.read_csv(f, convert_options=pc.ConvertOptions(
        column_types={c: pa.string() for c in facs}, null_values=["NA"],
        strings_can_be_null=True, quoted_strings_can_be_null=False))  # R: NA unquoted
    pq.write_table(t, dst / (f.stem + ".parquet"))
    print("wrote", f.stem, t.num_rows, "rows", t.schema.types)
'
stopifnot(system2("env", c("-u", "LD_LIBRARY_PATH", py, "-c", shQuote(conv), csvdir, out)) == 0)
