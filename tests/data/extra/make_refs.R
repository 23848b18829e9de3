# Extra lme4 reference fits for tests/test_accuracy_extra.py: real datasets mlpipe was never
# tuned on, one grouping factor each.  Same JSON layout as tests/data/lme4/*.json (made by
# /work/shared/reference/make_refs_visible.R).
#
# Usage (from the repository root):
#   Rscript tests/data/extra/make_refs.R [OUTDIR]        # OUTDIR defaults to tests/data/extra
# Environment: PYTHON (default .venv/bin/python) converts the exported CSVs to Parquet.
#
# Data flow: each dataset is reduced to the columns its models use, written to CSV by R
# (write.csv, 15 significant digits, NA for missing), read back, and the models are fitted on
# the read-back data, so the reference sees exactly the numbers in the CSV.  The CSV is then
# converted to Parquet (factors as strings, "NA" as null).  Factor levels are sorted in byte
# order (LC_COLLATE=C) so the first sorted level is the reference level, as mlpipe does.
# Grouping columns that are deliberately numeric (cake$replicate) stay numeric: lme4 then
# orders their levels numerically (1, 2, ..., 10, ...).
suppressMessages({library(lme4); library(mlmRev); library(nlme); library(jsonlite)})
invisible(Sys.setlocale("LC_COLLATE", "C"))
args <- commandArgs(TRUE); out <- if (length(args)) args[1] else "tests/data/extra"
only <- if (length(args) > 1) args[-1] else NULL
csvdir <- Sys.getenv("CSVDIR", file.path(tempdir(), "extra_csv"))   # set CSVDIR to keep the CSVs
dir.create(csvdir, recursive = TRUE, showWarnings = FALSE)
dir.create(out, recursive = TRUE, showWarnings = FALSE)

export <- function(d, name) {
  d <- as.data.frame(d)
  attributes(d) <- attributes(d)[c("names", "row.names", "class")]   # drop groupedData extras
  class(d) <- "data.frame"
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

# The reference is lme4 at the best optimum it finds: bobyqa (as make_refs_visible.R), unless
# Nelder_Mead, or (for ML) bobyqa started from the REML optimum, lowers the criterion by more
# than 1e-6.  On a few of these problems lme4's bobyqa stops early (cake, (temp | replicate),
# REML) or in a worse local optimum (Orange, ML); the JSON records which fit was used.
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
  # polish: bobyqa again from the chosen optimum with a tight final trust radius; on flat
  # likelihoods (e.g. 3x3 random effects) lme4's defaults stop where the fixed effects are
  # still off by ~1e-3 SE
  pol <- one("bobyqa", list(theta = getME(fits[[k]], "theta")), rhoend = 1e-12)
  if (crit(pol) < crits[[k]] - 1e-9) {
    cat(sprintf("  %s %s: polished %.10f < %.10f\n", formula, if (reml) "REML" else "ML",
                crit(pol), crits[[k]]))
    fits[["polished"]] <- pol
    k <- "polished"
  }
  list(fit = fits[[k]], optimizer = k, bobyqa_criterion = crits[["bobyqa"]])
}

fit_one <- function(case, data, formula, dataname) {
  reml_theta <- NULL
  res <- list(case = case, data = dataname, formula = formula,
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
      if (is.list(pv)) {  # several terms on one factor, e.g. (x||g)
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
    key <- if (reml) "reml" else "ml"
    res[[key]] <- list(
      fixed = list(term = rownames(fe), estimate = unname(fe[, 1]), se = unname(fe[, 2])),
      varcorr = vc_list(m), sigma = sigma(m), loglik = as.numeric(logLik(m)),
      deviance_or_reml = as.numeric(if (reml) REMLcrit(m) else deviance(m)),
      aic = AIC(m), bic = BIC(m), nobs = nobs(m), ngroups = ng,
      singular = isSingular(m), theta = unname(getME(m, "theta")), seconds = el,
      optimizer = best$optimizer, bobyqa_criterion = best$bobyqa_criterion,
      ranef = ranefs, fitted_head = unname(head(fitted(m), 20)))
  }
  write(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE),
        file.path(out, paste0(case, ".json")))
  cat("done", case, "\n")
}

data(Exam); data(Gcsemv); data(Chem97); data(cake); data(Dyestuff2); data(sleepstudy)
exam    <- export(Exam[, c("school", "normexam", "standLRT", "sex", "schavg")], "exam")
gcsemv  <- export(Gcsemv[, c("school", "gender", "written")], "gcsemv")     # written has NAs
chem97  <- export(Chem97[, c("school", "score", "gcsecnt", "gender")], "chem97")
ortho   <- export(Orthodont[, c("Subject", "distance", "age", "Sex")], "orthodont")
mach    <- export(Machines[, c("Worker", "Machine", "score")], "machines")
ergo    <- export(ergoStool[, c("Subject", "Type", "effort")], "ergostool")
cake2   <- cake[, c("replicate", "recipe", "temperature", "temp", "angle")]
cake2$replicate <- as.integer(as.character(cake2$replicate))               # numeric grouping
cake2   <- export(cake2, "cake")
rail    <- export(Rail[, c("Rail", "travel")], "rail")
dye2    <- export(Dyestuff2, "dyestuff2")
sleep   <- export(sleepstudy, "sleepstudy")
bodyw   <- export(BodyWeight[, c("Rat", "Time", "Diet", "weight")], "bodyweight")
orange  <- export(Orange[, c("Tree", "age", "circumference")], "orange")
oats    <- export(Oats[, c("Block", "Variety", "nitro", "yield")], "oats")
gcsemv2 <- export(Gcsemv[, c("school", "gender", "written", "course")], "gcsemv2")
data(ScotsSec)
scots   <- export(ScotsSec[, c("primary", "attain", "verbal", "sex", "social")], "scotssec")
quin    <- export(Quinidine[, c("Subject", "conc", "Age", "Weight", "Race", "Heart",
                                "Creatinine", "glyco")], "quinidine")   # conc: 1110 NAs

cases <- list(
  list("exam_rs", exam, "normexam ~ standLRT + sex + schavg + (standLRT | school)", "exam"),
  list("exam_sex_singular", exam, "normexam ~ standLRT + sex + (sex | school)", "exam"),
  list("gcsemv_na", gcsemv, "written ~ gender + (1 | school)", "gcsemv"),
  list("chem97_ri", chem97, "score ~ gcsecnt + gender + (1 | school)", "chem97"),
  list("orthodont_int", ortho, "distance ~ age * Sex + (age | Subject)", "orthodont"),
  list("machines_nointslopes", mach, "score ~ Machine + (0 + Machine | Worker)", "machines"),
  list("ergostool_noint", ergo, "effort ~ 0 + Type + (1 | Subject)", "ergostool"),
  list("cake_facnum", cake2, "angle ~ recipe * temp + (1 | replicate)", "cake"),
  list("cake_facfac", cake2, "angle ~ recipe * temperature + (1 | replicate)", "cake"),
  list("rail_null", rail, "travel ~ 1 + (1 | Rail)", "rail"),
  list("dyestuff2_singular", dye2, "Yield ~ 1 + (1 | Batch)", "dyestuff2"),
  list("sleep_diag3", sleep, "Reaction ~ Days + I(Days^2) + (Days + I(Days^2) || Subject)",
       "sleepstudy"),
  list("sleep_log_slope", sleep, "log(Reaction) ~ Days + (0 + Days | Subject)", "sleepstudy"),
  list("bodyweight_rs", bodyw, "weight ~ Time * Diet + (Time | Rat)", "bodyweight"),
  list("orange_quad", orange, "circumference ~ age + I(age^2) + (1 | Tree)", "orange"),
  list("oats_noint_space", oats, "yield ~ 0 + Variety + nitro + (1 | Block)", "oats"),
  list("gcsemv_na_pred", gcsemv2, "course ~ written + gender + (1 | school)", "gcsemv2"),
  list("scotssec_numfac", scots, "attain ~ verbal * sex + social + (1 | primary)", "scotssec"),
  list("quinidine_factors", quin,
       "conc ~ Age + Weight + Race + Heart + Creatinine + glyco + (1 | Subject)", "quinidine"),
  # correlated random slopes whose optimizer paths cross a zero intercept variance
  list("gcsemv_rs3", gcsemv2, "course ~ written * gender + (written + gender | school)",
       "gcsemv2"),
  list("quinidine_rs", quin, "conc ~ Age + glyco + (glyco | Subject)", "quinidine"),
  list("orange_rs", orange, "circumference ~ I(age/365) + (I(age/365) | Tree)", "orange"),
  list("cake_rs_boundary", cake2, "angle ~ temp + recipe + (temp | replicate)", "cake"),
  # R's names for arithmetic inside a function: log(age/365), no spaces around "/"
  list("orange_log_ratio", orange, "log(circumference) ~ log(age/365) + (1 | Tree)", "orange")
)
for (c in cases) if (is.null(only) || c[[1]] %in% only)
  tryCatch(fit_one(c[[1]], c[[2]], c[[3]], c[[4]]),
           error = function(e) cat("FAIL", c[[1]], conditionMessage(e), "\n"))

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
