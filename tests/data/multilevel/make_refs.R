# lme4 reference fits with random effects on several grouping factors (nested to three levels,
# crossed, nested and crossed together, several terms on one factor) for mlpipe's multilevel
# tests.  Modelled on tests/data/extra/make_refs.R (same export / best-fit / JSON approach) and
# on the layout of /work/shared/reference/lme4/pastes_nested.json and penicillin_crossed.json.
#
# Usage (from the repository root):
#   Rscript tests/data/multilevel/make_refs.R [OUTDIR [CASE ...]]   # OUTDIR: tests/data/multilevel
# Environment: PYTHON (default .venv/bin/python) converts the exported CSVs to Parquet;
# CSVDIR keeps the intermediate CSVs.  egsingle.parquet is also copied to data/ (demo config).
#
# Data flow: each dataset is reduced to the columns its models use, written to CSV by R
# (write.csv, 15 significant digits, NA for missing), read back, and the models are fitted on
# the read-back data, so the reference sees exactly the numbers in the CSV.  The CSV is then
# converted to Parquet (factors as strings, "NA" as null).  Factor levels are sorted in byte
# order (LC_COLLATE=C) so the first sorted level is the reference level, as mlpipe does.
# Grouping columns that are deliberately numeric (oxide, scotssec_int) stay integer: lme4 then
# orders their levels numerically (1, 2, ..., 10, ...).
#
# JSON keys (per case): case, data, formula, lme4_version, and for each of reml / ml:
#   fixed {term, estimate, se}; varcorr rows {grp, var1, var2, vcov, sdcor} exactly as
#   as.data.frame(VarCorr(m)) gives them -- note lme4 applies make.unique/make.names to the
#   group names when a factor carries several terms, so (1|Dog:Side) + (day||Dog) gives grp
#   "Dog.Side", "Dog", "Dog.1"; reterms [{group, terms}] is the unmangled list of random-effect
#   terms in lme4's order (getME(m, "cnms")), which is also the order of theta;
#   sigma, loglik, deviance_or_reml, aic, bic, nobs, ngroups {factor: levels}, singular,
#   theta, theta_names, seconds (all fits of best_fit), seconds_bobyqa (one default fit),
#   optimizer, bobyqa_criterion; ranef [{group, levels, terms, values (levels x terms),
#   cond_sd}] with lme4's level labels (e.g. "a:A" for an interaction factor); fitted_head
#   (first 20 fitted values).
# For the REML fit, where computed: satterthwaite {term, df, t, p} (lmerTest),
#   kenward_roger {term, df, t, p} (lmerTest via pbkrtest; small cases only -- KR builds dense
#   n x n matrices, 250 s on ScotsSec's 3435 rows), profile_ci {parameter (lme4's .sig01,
#   ..., .sigma names), name (oldNames = FALSE names, e.g. "sd_(Intercept)|batch"), lower,
#   upper, warnings} (confint(m, method = "profile"), 95%; small cases only; warnings are
#   lme4's, e.g. "bad spline fit for .sig03: falling back to linear interpolation").
suppressMessages({library(lme4); library(mlmRev); library(nlme); library(lmerTest)
                  library(pbkrtest); library(jsonlite)})
invisible(Sys.setlocale("LC_COLLATE", "C"))
args <- commandArgs(TRUE); out <- if (length(args)) args[1] else "tests/data/multilevel"
only <- if (length(args) > 1) args[-1] else NULL
csvdir <- Sys.getenv("CSVDIR", file.path(tempdir(), "multilevel_csv"))
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

# The reference is lme4 at the best optimum it finds: bobyqa, unless Nelder_Mead, or (for ML)
# bobyqa started from the REML optimum, lowers the criterion by more than 1e-6; then polished
# by bobyqa from that optimum with a tight final trust radius.  As in tests/data/extra.
best_fit <- function(formula, data, reml, start_theta) {
  secs <- list()
  one <- function(opt, start = NULL, rhoend = NULL) {
    t0 <- proc.time()[["elapsed"]]
    m <- suppressMessages(suppressWarnings(
      lmer(as.formula(formula), data = data, REML = reml, start = start,
           control = lmerControl(optimizer = opt, calc.derivs = FALSE,
                                 optCtrl = if (is.null(rhoend)) list() else
                                   list(rhoend = rhoend)))))
    secs[[length(secs) + 1]] <<- proc.time()[["elapsed"]] - t0
    m
  }
  fits <- list(bobyqa = one("bobyqa"), Nelder_Mead = one("Nelder_Mead"))
  sec_bobyqa <- secs[[1]]
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
  list(fit = fits[[k]], optimizer = k, bobyqa_criterion = crits[["bobyqa"]],
       seconds_bobyqa = sec_bobyqa)
}

ddf_table <- function(mt, ddf) {
  co <- summary(mt, ddf = ddf)$coefficients
  list(term = rownames(co), df = unname(co[, "df"]), t = unname(co[, "t value"]),
       p = unname(co[, "Pr(>|t|)"]))
}

# REML inference at the chosen optimum: lmerTest refit started from its theta (tight rhoend),
# checked to reproduce the criterion.
inference <- function(formula, data, theta, target, kr, prof) {
  fo <- as.formula(formula)
  dat <- data
  th <- theta
  mt <- suppressMessages(suppressWarnings(lmerTest::lmer(fo, data = dat, REML = TRUE,
          start = list(theta = th),
          control = lmerControl(optimizer = "bobyqa", calc.derivs = FALSE,
                                optCtrl = list(rhoend = 1e-12)))))
  d <- REMLcrit(mt) - target
  cat(sprintf("  inference refit: REML criterion %+.2e from the reference\n", d))
  if (abs(d) > 1e-6) { cat("  inference skipped: refit not at the reference optimum\n"); return(NULL) }
  res <- list()
  t0 <- proc.time()[["elapsed"]]
  res$satterthwaite <- tryCatch(ddf_table(mt, "Satterthwaite"), error = function(e) {
    cat("  Satterthwaite failed:", conditionMessage(e), "\n"); NULL })
  cat(sprintf("  Satterthwaite %.1f s\n", proc.time()[["elapsed"]] - t0))
  if (kr) {
    t0 <- proc.time()[["elapsed"]]
    res$kenward_roger <- tryCatch(ddf_table(mt, "Kenward-Roger"), error = function(e) {
      cat("  Kenward-Roger failed:", conditionMessage(e), "\n"); NULL })
    cat(sprintf("  Kenward-Roger %.1f s\n", proc.time()[["elapsed"]] - t0))
  }
  if (prof) {
    t0 <- proc.time()[["elapsed"]]
    m <- as(mt, "lmerMod")
    warns <- character()
    ci <- tryCatch(withCallingHandlers(
                     suppressMessages(confint(m, method = "profile", level = 0.95)),
                     warning = function(w) { warns <<- c(warns, conditionMessage(w))
                                             invokeRestart("muffleWarning") }),
                   error = function(e) { cat("  profile failed:", conditionMessage(e), "\n"); NULL })
    if (!is.null(ci)) {
      old <- rownames(ci)
      nsig <- sum(grepl("^\\.sig[0-9]+$", old))
      long <- unname(lme4:::tnames(m, old = FALSE, prefix = c("sd", "cor")))
      stopifnot(nsig == length(long), all(old[seq_len(nsig)] == sprintf(".sig%02d", seq_len(nsig))))
      new <- old; new[seq_len(nsig)] <- long; new[old == ".sigma"] <- "sigma"
      res$profile_ci <- list(parameter = old, name = new, lower = unname(ci[, 1]),
                             upper = unname(ci[, 2]), warnings = I(unique(warns)))
    }
    cat(sprintf("  profile %.1f s\n", proc.time()[["elapsed"]] - t0))
  }
  res
}

fit_one <- function(case, data, formula, dataname, kr = FALSE, prof = FALSE, satt = TRUE) {
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
    cn <- getME(m, "cnms")
    reterms <- lapply(seq_along(cn), function(i) list(group = names(cn)[i], terms = I(cn[[i]])))
    key <- if (reml) "reml" else "ml"
    res[[key]] <- list(
      fixed = list(term = rownames(fe), estimate = unname(fe[, 1]), se = unname(fe[, 2])),
      varcorr = vc_list(m), reterms = reterms, sigma = sigma(m),
      loglik = as.numeric(logLik(m)),
      deviance_or_reml = as.numeric(if (reml) REMLcrit(m) else deviance(m)),
      aic = AIC(m), bic = BIC(m), nobs = nobs(m), ngroups = as.list(ngrps(m)),
      singular = isSingular(m), theta = unname(getME(m, "theta")),
      theta_names = names(getME(m, "theta")), seconds = el,
      seconds_bobyqa = best$seconds_bobyqa, optimizer = best$optimizer,
      bobyqa_criterion = best$bobyqa_criterion,
      ranef = ranefs, fitted_head = unname(head(fitted(m), 20)))
    if (reml && satt) {
      inf <- inference(formula, data, reml_theta, crit(m), kr, prof)
      for (k in names(inf)) res$reml[[k]] <- inf[[k]]
    }
  }
  write(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE),
        file.path(out, paste0(case, ".json")))
  cat(sprintf("done %s (REML %.6f, ML %.6f)\n", case, res$reml$deviance_or_reml,
              res$ml$deviance_or_reml))
}

# ---- data ---------------------------------------------------------------------------------
data(egsingle); data(Socatt); data(ScotsSec); data(InstEval); data(sleepstudy); data(TVbo)
# mlmRev::egsingle: US Sustaining Effects Study, math scores of 1721 pupils in 60 schools,
# grades 1-6 (Bryk & Raudenbush, HLM); 7230 rows.  All its columns (the demo ships it).
egs <- export(egsingle[, c("schoolid", "childid", "year", "grade", "math", "retained",
                           "female", "black", "hispanic", "size", "lowinc", "mobility")],
              "egsingle")
# nlme::Oats: split-plot oats experiment (Yates 1935), 6 blocks x 3 varieties x 4 nitrogen
oats <- export(Oats[, c("Block", "Variety", "nitro", "yield")], "oats")
# mlmRev::Socatt: British Social Attitudes survey panel 1983-86, 264 respondents in 54
# districts; numpos (number of positive answers to 7 abortion items, 0-7) as a number
soc <- Socatt[, c("district", "respond", "year", "numpos", "gender", "age")]
soc$numpos <- as.numeric(as.character(soc$numpos))
soc <- export(soc, "socatt")
# nlme::Pixel: CT pixel intensities of the lymph nodes of 10 dogs, both sides, over 21 days
pixel <- export(Pixel[, c("Dog", "Side", "day", "pixel")], "pixel")
# nlme::Oxide: oxide layer thickness, 2 sources > 8 lots > 3 wafers > 3 sites (Littell et al.
# 1996).  Lot, Wafer labels repeat within their parent (Wafer is 1-3 in every lot).
# Integer grouping columns, kept numeric.
ox <- as.data.frame(Oxide)[, c("Source", "Lot", "Wafer", "Site", "Thickness")]
for (v in c("Source", "Lot", "Wafer", "Site")) ox[[v]] <- as.integer(as.character(ox[[v]]))
ox <- export(ox, "oxide")
# mlmRev::ScotsSec: attainment of 3435 Scottish pupils, 148 primary x 19 secondary schools
# (crossed; Paterson 1991).  primary and second share the labels "1".."19".
scots <- export(ScotsSec[, c("primary", "second", "attain", "verbal", "sex", "social")],
                "scotssec")
scots_i <- ScotsSec[, c("primary", "second", "attain", "verbal", "sex")]
for (v in c("primary", "second")) scots_i[[v]] <- as.integer(as.character(scots_i[[v]]))
scots_i <- export(scots_i, "scotssec_int")   # integer grouping columns, same labels
# lme4::InstEval: ETH Zurich lecture evaluations, 73421 ratings, 2972 students x 1128
# lecturers, 14 departments.  s and d share labels.
inst <- export(InstEval[, c("s", "d", "studage", "lectage", "service", "dept", "y")],
               "insteval")
# lmerTest::TVbo: 8 assessors rate 3 TV sets x 4 pictures twice (Bang & Olufsen sensory data)
tvbo <- export(TVbo[, c("Assessor", "TVset", "Picture", "Repeat", "Coloursaturation")], "tvbo")
# lme4::sleepstudy: reaction times of 18 subjects over 10 days (Belenky et al. 2003)
sleep <- export(sleepstudy, "sleepstudy")
# nlme::Assay: a bioassay on a 2-block design, 6 samples x 5 dilutions within each block
# (Pinheiro & Bates 2000, sec. 4.2): block, and block x sample crossed with block x dilution
assay <- export(Assay[, c("Block", "sample", "dilut", "logDens")], "assay")
# nlme::Alfalfa: split-plot, 6 blocks > 3 varieties (plots) > 4 dates of cutting (subplots)
alfalfa <- export(Alfalfa[, c("Block", "Variety", "Date", "Yield")], "alfalfa")
# nlme::Wafer: current of 10 wafers x 8 sites x 5 voltages; Site labels 1-8 repeat in
# every wafer (only Wafer:Site is a site)
wafer <- export(Wafer[, c("Wafer", "Site", "voltage", "current")], "wafer")
# mlmRev::star: Tennessee's STAR class-size experiment, 26796 rows (2183 without math) of
# 11598 pupils in grades K-3, taught by 1387 teachers in 80 schools; a pupil meets a new
# teacher every year (crossed), teachers are in one school (nested), pupils may move school.
# The ordered factor gr is kept as text, so it gets treatment contrasts (R's default for an
# ordered factor is contr.poly, which mlpipe does not do).
star_d <- export(star[, c("id", "sch", "tch", "gr", "cltype", "sx", "eth", "yrs", "math")],
                 "star")
# lme4::Arabidopsis: fruit set of 625 plants, 24 genotypes (integer labels) within 9
# populations within 3 regions, nesting implicit in unique labels (Banta et al. 2010)
arab <- export(Arabidopsis[, c("reg", "popu", "gen", "rack", "nutrient", "amd", "status",
                               "total.fruits")], "arabidopsis")
# lme4::grouseticks: ticks on 403 red grouse chicks in 118 broods at 63 locations (broods
# labelled uniquely: nested in locations without a location:brood term)
grouse <- export(grouseticks[, c("LOCATION", "BROOD", "YEAR", "cHEIGHT", "TICKS")],
                 "grouseticks")

S <- list(kr = TRUE, prof = TRUE)      # small: Kenward-Roger and profile CIs as well
cases <- list(
  # three levels (occasions in pupils in schools), correlated random slopes at two of them
  list("egsingle_growth", egs, "math ~ year + (year | schoolid/childid)", "egsingle"),
  list("egsingle_ri_cov", egs,
       "math ~ year + female + black + hispanic + lowinc + mobility + (1 | schoolid/childid)",
       "egsingle"),
  # nested random intercepts
  c(list("oats_nested", oats, "yield ~ nitro + (1 | Block/Variety)", "oats"), S),
  c(list("socatt_nested", soc, "numpos ~ year + gender + (1 | district/respond)", "socatt"), S),
  # nested, uncorrelated intercept and slope (||) at the upper level
  c(list("pixel_nested_diag", pixel, "pixel ~ day + I(day^2) + (day || Dog) + (1 | Dog:Side)",
         "pixel"), S),
  # three nested factors, integer columns, child labels repeating within parents
  c(list("oxide_3level", ox, "Thickness ~ 1 + (1 | Source/Lot/Wafer)", "oxide"), S),
  # crossed
  list("scotssec_crossed", scots, "attain ~ verbal + sex + (1 | primary) + (1 | second)",
       "scotssec"),
  list("scotssec_crossed_slope", scots,
       "attain ~ verbal + sex + (1 | primary) + (verbal | second)", "scotssec"),
  list("scotssec_int_crossed", scots_i, "attain ~ verbal + sex + (1 | primary) + (1 | second)",
       "scotssec_int"),
  # nested and crossed together: assessor, assessor x TV set, assessor x picture
  c(list("tvbo_nested_crossed", tvbo, paste("Coloursaturation ~ TVset * Picture + (1 | Assessor)",
         "+ (1 | Assessor:TVset) + (1 | Assessor:Picture)"), "tvbo"), S),
  # several terms on one factor
  c(list("sleep_two_terms", sleep, "Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)",
         "sleepstudy"), S),
  # large crossed (lme4 ~20 s a fit)
  list("insteval_crossed", inst, "y ~ service + (1 | s) + (1 | d) + (1 | dept)", "insteval"),
  list("insteval_nested_crossed", inst, "y ~ service + (1 | s) + (1 | d) + (1 | dept:service)",
       "insteval"),
  # stop 27's additions: real designs the structure code had not met
  # nested in blocks and crossed within them (P&B's Assay model)
  c(list("assay_nested_crossed", assay,
         "logDens ~ sample * dilut + (1 | Block) + (1 | Block:sample) + (1 | Block:dilut)",
         "assay"), S),
  # a split plot: (1 | Block/Variety), factor x factor fixed effects
  c(list("alfalfa_split_plot", alfalfa, "Yield ~ Date * Variety + (1 | Block/Variety)",
         "alfalfa"), S),
  # correlated random slopes at two nested levels whose labels repeat within the parent
  c(list("wafer_slopes_two_levels", wafer,
         "current ~ voltage + I(voltage^2) + (voltage | Wafer/Site)", "wafer"), S),
  # pupils crossed with teachers, 11598 x 1387 levels, NA responses
  list("star_crossed", star_d, "math ~ gr + cltype + sx + eth + (1 | id) + (1 | tch)", "star"),
  # pupils crossed with teachers nested in schools (the schools of a pupil may differ)
  list("star_nested_crossed", star_d, "math ~ gr + cltype + (1 | id) + (1 | tch) + (1 | sch)",
       "star"),
  # a correlated random slope on a factor crossed with another
  list("star_crossed_slope", star_d, "math ~ yrs + cltype + (1 | id) + (yrs | sch)", "star"),
  # three implicitly nested factors, one of them integer, 3 regions: near the boundary
  c(list("arabidopsis_nested3", arab,
         "log(total.fruits + 1) ~ nutrient * amd + status + (1 | reg) + (1 | popu) + (1 | gen)",
         "arabidopsis"), S),
  # implicit nesting (brood labels unique across locations)
  c(list("grouseticks_implicit", grouse,
         "log(TICKS + 1) ~ YEAR + cHEIGHT + (1 | LOCATION) + (1 | BROOD)", "grouseticks"), S)
)
for (c in cases) if (is.null(only) || c[[1]] %in% only) {
  cat("case", c[[1]], "\n")
  tryCatch(fit_one(c[[1]], c[[2]], c[[3]], c[[4]], kr = isTRUE(c$kr), prof = isTRUE(c$prof)),
           error = function(e) cat("FAIL", c[[1]], conditionMessage(e), "\n"))
}

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
if (normalizePath(out) == normalizePath("tests/data/multilevel", mustWork = FALSE))
  stopifnot(file.copy(file.path(out, "egsingle.parquet"), "data/egsingle.parquet",
                      overwrite = TRUE))
