# lme4 reference fits for tests/test_boundary_optima.py: 2x2 random-effects covariances whose
# optimum is INTERIOR but close to the boundary of the Cholesky parameterization (correlation
# near +-1, i.e. a small second diagonal theta, or a small slope variance).  An optimizer that
# stops at a false boundary optimum (theta_22 = 0, correlation +-1) ends above lme4's criterion
# on these.  Random intercept-and-slope (x | g) and two-random-slope (0 + z1 + z2 | g) models
# on real data (mlmRev::bdf, datasets::ChickWeight, nlme::Milk) and on data simulated here
# (100 groups of 1-4 rows, correlated random effects).  Candidates whose best lme4 optimum
# turned out singular (nlme::Orthodont, mlmRev::Early, some simulations) stay in the list and
# are reported as SKIP, so the filter is visible.
#
# Same JSON layout as tests/data/extra/*.json (made by tests/data/extra/make_refs.R, whose
# export()/best_fit()/fit_one() this script copies), plus, per method block:
#   correlation     the random-effect correlation(s) of VarCorr()
#   min_diag_theta  the smallest diagonal entry of getME(m, "theta") (lower bound 0)
# and at the top level a "note" saying what the case is.
#
# Usage (from the repository root):
#   Rscript tests/data/boundary/make_refs.R [OUTDIR [CASE ...]]   # OUTDIR: tests/data/boundary
# Environment: PYTHON (default .venv/bin/python) converts the exported CSVs to Parquet;
# CSVDIR keeps the intermediate CSVs.
#
# A case is written only when lme4's best optimum is interior (isSingular() FALSE under REML
# and ML); the others are printed as SKIP.  Cases marked keep_singular = TRUE are written
# anyway (their names say which method is singular).  Data sets no written case uses are not
# converted to Parquet.
#
# Data flow as in tests/data/extra/make_refs.R: each data set is reduced to the columns its
# models use and to complete rows, written to CSV by R (15 significant digits), read back,
# and the models are fitted on the read-back data; the CSV is then converted to Parquet
# (factors as strings).  Factor levels are sorted in byte order (LC_COLLATE=C), as mlpipe does.
suppressMessages({library(lme4); library(mlmRev); library(nlme); library(jsonlite)})
invisible(Sys.setlocale("LC_COLLATE", "C"))
args <- commandArgs(TRUE); out <- if (length(args)) args[1] else "tests/data/boundary"
only <- if (length(args) > 1) args[-1] else NULL
csvdir <- Sys.getenv("CSVDIR", file.path(tempdir(), "boundary_csv"))
dir.create(csvdir, recursive = TRUE, showWarnings = FALSE)
unlink(Sys.glob(file.path(csvdir, c("*.csv", "*.factors"))))
dir.create(out, recursive = TRUE, showWarnings = FALSE)

export <- function(d, name) {
  d <- as.data.frame(d)
  attributes(d) <- attributes(d)[c("names", "row.names", "class")]   # drop groupedData extras
  class(d) <- "data.frame"
  d <- d[complete.cases(d), , drop = FALSE]
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

# The reference is lme4 at the best optimum it finds (as tests/data/extra/make_refs.R):
# bobyqa, unless Nelder_Mead or (for ML) bobyqa from the REML optimum lowers the criterion by
# more than 1e-6; then polished by bobyqa from that optimum with rhoend = 1e-12.
best_fit <- function(formula, data, reml, start_theta) {
  one <- function(opt, start = NULL, rhoend = NULL) suppressMessages(suppressWarnings(
    lmer(as.formula(formula), data = data, REML = reml, start = start,
         control = lmerControl(optimizer = opt, calc.derivs = FALSE,
                               optCtrl = if (is.null(rhoend)) list() else
                                 list(rhoend = rhoend)))))
  fits <- list(bobyqa = one("bobyqa"), Nelder_Mead = one("Nelder_Mead"))
  if (!is.null(start_theta)) fits[["bobyqa from the REML theta"]] <- one("bobyqa", start_theta)
  crits <- sapply(fits, crit)
  k <- if (min(crits) < crits[["bobyqa"]] - 1e-6) names(which.min(crits)) else "bobyqa"
  if (k != "bobyqa") cat(sprintf("  %s %s: %s %.8f < bobyqa %.8f\n", formula,
                                 if (reml) "REML" else "ML", k, crits[[k]], crits[["bobyqa"]]))
  pol <- one("bobyqa", list(theta = getME(fits[[k]], "theta")), rhoend = 1e-12)
  if (crit(pol) < crits[[k]] - 1e-9) {
    cat(sprintf("  %s %s: polished %.10f < %.10f\n", formula, if (reml) "REML" else "ML",
                crit(pol), crits[[k]]))
    fits[["polished"]] <- pol
    k <- "polished"
  }
  list(fit = fits[[k]], optimizer = k, bobyqa_criterion = crits[["bobyqa"]])
}

summary_rows <- list()

fit_one <- function(case, data, formula, dataname, note, keep_singular = FALSE) {
  reml_theta <- NULL
  res <- list(case = case, data = dataname, formula = formula, note = note,
              lme4_version = as.character(packageVersion("lme4")))
  for (reml in c(TRUE, FALSE)) {
    t0 <- proc.time()[["elapsed"]]
    best <- best_fit(formula, data, reml, if (reml) NULL else reml_theta)
    m <- best$fit
    if (reml) reml_theta <- unname(getME(m, "theta"))
    el <- proc.time()[["elapsed"]] - t0
    fe <- summary(m)$coefficients
    re <- ranef(m, condVar = TRUE)
    ranefs <- lapply(names(re), function(g) {
      r <- re[[g]]; pv <- attr(r, "postVar")
      if (is.list(pv)) {
        sds <- do.call(cbind, lapply(pv, function(a) t(apply(a, 3, function(M) sqrt(diag(M))))))
        if (nrow(sds) != nrow(r)) sds <- t(sds)
      } else {
        sds <- t(apply(pv, 3, function(M) sqrt(diag(M))))
        if (ncol(r) == 1) sds <- t(sds)
      }
      list(group = g, levels = rownames(r), terms = colnames(r),
           values = unname(as.matrix(r)), cond_sd = unname(matrix(sds, nrow = nrow(r))))
    })
    ng <- as.list(ngrps(m))
    vc <- as.data.frame(VarCorr(m))
    th <- unname(getME(m, "theta"))
    key <- if (reml) "reml" else "ml"
    res[[key]] <- list(
      fixed = list(term = rownames(fe), estimate = unname(fe[, 1]), se = unname(fe[, 2])),
      varcorr = vc_list(m), sigma = sigma(m), loglik = as.numeric(logLik(m)),
      deviance_or_reml = as.numeric(if (reml) REMLcrit(m) else deviance(m)),
      aic = AIC(m), bic = BIC(m), nobs = nobs(m), ngroups = ng,
      singular = isSingular(m), theta = th,
      correlation = I(vc$sdcor[!is.na(vc$var2)]),
      min_diag_theta = min(th[getME(m, "lower") == 0]),
      seconds = el, optimizer = best$optimizer, bobyqa_criterion = best$bobyqa_criterion,
      ranef = ranefs, fitted_head = unname(head(fitted(m), 20)))
  }
  sing <- c(res$reml$singular, res$ml$singular)
  line <- sprintf("%-26s cor %s / %s  min theta %.3g / %.3g  crit %.6f / %.6f  singular %s/%s",
                  case, paste(sprintf("%.4f", res$reml$correlation), collapse = ","),
                  paste(sprintf("%.4f", res$ml$correlation), collapse = ","),
                  res$reml$min_diag_theta, res$ml$min_diag_theta, res$reml$deviance_or_reml,
                  res$ml$deviance_or_reml, sing[1], sing[2])
  if (any(sing) && !keep_singular) {
    cat("SKIP (singular)", line, "\n")
    return(invisible(NULL))
  }
  write(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE),
        file.path(out, paste0(case, ".json")))
  cat("done", line, "\n")
  dataname
}

# ---- real data ----------------------------------------------------------------------------
data(bdf); data(Early)
bdf_d  <- export(bdf[, c("schoolNR", "langPOST", "aritPOST", "IQ.verb", "IQ.perf", "ses",
                         "sex", "Minority")], "bdf")
chick  <- export(ChickWeight[, c("Chick", "Time", "Diet", "weight")], "chickweight")
milk   <- export(Milk[, c("Cow", "Diet", "Time", "protein")], "milk")
ortho  <- export(Orthodont[, c("Subject", "distance", "age")], "orthodont")
early  <- export(Early[, c("id", "cog", "age", "trt")], "early")

# ---- simulated data -----------------------------------------------------------------------
# ng groups of 1-4 rows; (u1, u2) normal with SDs sds and correlation rho; z1, z2 ~ N(0, 1).
# design "rs":     y = b0 + b1 z1 + u1 + u2 z1 + e             (column x = z1)
# design "slopes": y = b0 + b1 z1 + b2 z2 + u1 z1 + u2 z2 + e
simulate <- function(seed, design, rho, sds, beta, sigma = 1, ng = 100) {
  set.seed(seed)
  n <- sample(1:4, ng, replace = TRUE); g <- rep(seq_len(ng), n); N <- sum(n)
  S <- diag(sds) %*% matrix(c(1, rho, rho, 1), 2) %*% diag(sds)
  u <- matrix(rnorm(2 * ng), ng) %*% chol(S)
  z1 <- rnorm(N); z2 <- rnorm(N); e <- rnorm(N, sd = sigma)
  grp <- sprintf("g%03d", g)
  if (design == "rs")
    data.frame(g = grp, x = z1, y = beta[1] + beta[2] * z1 + u[g, 1] + u[g, 2] * z1 + e)
  else
    data.frame(g = grp, z1 = z1, z2 = z2,
               y = beta[1] + beta[2] * z1 + beta[3] * z2 + u[g, 1] * z1 + u[g, 2] * z2 + e)
}
sims <- list(
  sim_rs17     = list(seed = 17, design = "rs", rho = 0.9, sds = c(1, 0.5), beta = c(1, 0.5)),
  sim_rs31     = list(seed = 31, design = "rs", rho = 0.9, sds = c(1, 0.5), beta = c(1, 0.5)),
  sim_rs3      = list(seed = 3, design = "rs", rho = 0.9, sds = c(1, 0.5), beta = c(1, 0.5)),
  sim_rs5      = list(seed = 5, design = "rs", rho = 0.9, sds = c(1, 0.5), beta = c(1, 0.5)),
  sim_rs_small5 = list(seed = 5, design = "rs", rho = 0.5, sds = c(1, 0.25), beta = c(1, 0.5),
                       sigma = 0.5),
  sim_sl6      = list(seed = 6, design = "slopes", rho = 0.8, sds = c(1, 0.7),
                      beta = c(0, 0.5, -0.3)),
  sim_sl7      = list(seed = 7, design = "slopes", rho = 0.8, sds = c(1, 0.7),
                      beta = c(0, 0.5, -0.3)),
  sim_sli34    = list(seed = 34, design = "slopes", rho = 0.9, sds = c(1, 0.7),
                      beta = c(2, 1, 0.5)),
  sim_sli6     = list(seed = 6, design = "slopes", rho = 0.9, sds = c(1, 0.7),
                      beta = c(2, 1, 0.5))
)
simdata <- lapply(names(sims), function(nm) export(do.call(simulate, sims[[nm]]), nm))
names(simdata) <- names(sims)
simnote <- function(nm) {
  s <- sims[[nm]]
  sprintf(paste("simulated (seed %d, %s design): 100 groups of 1-4 rows, random-effect SDs",
                "%s, rho %g, residual SD %g"),
          s$seed, s$design, paste(s$sds, collapse = "/"), s$rho,
          if (is.null(s$sigma)) 1 else s$sigma)
}

cases <- list(
  list("bdf_iq", bdf_d, "langPOST ~ IQ.verb + (IQ.verb | schoolNR)", "bdf",
       paste("mlmRev::bdf, raw verbal IQ (intercept far from the data): correlation -0.975;",
             "lme4's default (nloptwrap) stops near the boundary under REML (correlation",
             "-0.9998, criterion 2.0 higher)")),
  list("bdf_ses", bdf_d, "langPOST ~ IQ.verb + ses + (IQ.verb | schoolNR)", "bdf",
       "mlmRev::bdf with a second fixed predictor"),
  list("bdf_factors", bdf_d, "langPOST ~ IQ.verb + sex + Minority + (IQ.verb | schoolNR)",
       "bdf", "mlmRev::bdf, categorical fixed predictors (sex 0/1, Minority N/Y)"),
  list("bdf_noint_slopes", bdf_d,
       "langPOST ~ 0 + IQ.verb + aritPOST + (0 + IQ.verb + aritPOST | schoolNR)", "bdf",
       "mlmRev::bdf, no intercept, two correlated random slopes"),
  list("bdf_noint_perf_ml_singular", bdf_d,
       "langPOST ~ 0 + IQ.verb + IQ.perf + (0 + IQ.verb + IQ.perf | schoolNR)", "bdf",
       paste("mlmRev::bdf, no intercept, two random slopes: REML interior on a flat",
             "likelihood (lme4's default nloptwrap stops at correlation -0.977, criterion",
             "7e-4 higher, instead of -0.617), ML singular"), TRUE),
  list("bdf_arit_singular", bdf_d, "aritPOST ~ IQ.verb + ses + (IQ.verb | schoolNR)",
       "bdf", "mlmRev::bdf arithmetic score: expected to be singular (skipped)"),
  list("chick_diet", chick, "weight ~ Time * Diet + (Time | Chick)", "chickweight",
       "datasets::ChickWeight, factor x numeric fixed effects (Diet 1-4)"),
  list("milk_noint_diet", milk, "protein ~ 0 + Diet + Time + (Time | Cow)", "milk",
       "nlme::Milk, 0 + factor fixed part (one column per Diet level), random slope"),
  list("ortho_noint_quad", ortho,
       "distance ~ 0 + age + I(age^2) + (0 + age + I(age^2) | Subject)", "orthodont",
       paste("nlme::Orthodont, no intercept, random slopes of age and age^2: expected to be",
             "singular (skipped)")),
  list("early_rs", early, "cog ~ age + trt + (age | id)", "early",
       "mlmRev::Early: expected to be singular (skipped)"),
  list("sim_rs", simdata$sim_rs17, "y ~ x + (x | g)", "sim_rs17", simnote("sim_rs17")),
  list("sim_rs_b", simdata$sim_rs31, "y ~ x + (x | g)", "sim_rs31", simnote("sim_rs31")),
  list("sim_rs_ml_singular", simdata$sim_rs3, "y ~ x + (x | g)", "sim_rs3",
       paste(simnote("sim_rs3"), "- interior under REML, singular under ML"), TRUE),
  list("sim_rs_singular", simdata$sim_rs5, "y ~ x + (x | g)", "sim_rs5",
       paste(simnote("sim_rs5"), "- expected to be singular (skipped)")),
  list("sim_rs_small_slope", simdata$sim_rs_small5, "y ~ x + (x | g)", "sim_rs_small5",
       simnote("sim_rs_small5")),
  list("sim_slopes_noint", simdata$sim_sl6, "y ~ 0 + z1 + z2 + (0 + z1 + z2 | g)", "sim_sl6",
       simnote("sim_sl6")),
  list("sim_slopes_noint_b", simdata$sim_sl7, "y ~ 0 + z1 + z2 + (0 + z1 + z2 | g)",
       "sim_sl7", simnote("sim_sl7")),
  list("sim_slopes_int", simdata$sim_sli34, "y ~ z1 + z2 + (0 + z1 + z2 | g)", "sim_sli34",
       simnote("sim_sli34")),
  list("sim_slopes_int_singular", simdata$sim_sli6, "y ~ z1 + z2 + (0 + z1 + z2 | g)",
       "sim_sli6", paste(simnote("sim_sli6"), "- expected to be singular (skipped)"))
)
used <- character(0)
for (c in cases) if (is.null(only) || c[[1]] %in% only) {
  d <- tryCatch(fit_one(c[[1]], c[[2]], c[[3]], c[[4]], c[[5]],
                        if (length(c) > 5) c[[6]] else FALSE),
                error = function(e) { cat("FAIL", c[[1]], conditionMessage(e), "\n"); NULL })
  used <- union(used, d)
}
# only the data sets of written cases become Parquet files
for (f in Sys.glob(file.path(csvdir, "*.csv")))
  if (!(sub("\\.csv$", "", basename(f)) %in% used)) unlink(f)

# CSV -> Parquet: factor columns as strings, everything else inferred; an unquoted NA is null
# (write.csv quotes every string and leaves NA unquoted, also in a factor column).
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
# R prepends its own library dirs to LD_LIBRARY_PATH, which can shadow the libpython of a
# non-system Python; run the converter without them.
stopifnot(system2("env", c("-u", "LD_LIBRARY_PATH", py, "-c", shQuote(conv), csvdir, out)) == 0)
