# Inference references for models with several grouping factors (tests/test_inference_multilevel.py):
# lmerTest Satterthwaite and Kenward-Roger (pbkrtest) df / t / p of the fixed effects of the REML
# fit, lme4's confint(method = "Wald") and confint(method = "profile") (95%).
#
# Usage (from the repository root):
#   Rscript tests/data/multilevel_inference/make_refs.R [OUTDIR]   # default tests/data/multilevel_inference
# Environment: PYTHON (default .venv/bin/python) converts the simulated data's CSV to Parquet.
#
# Cases:
#   pastes_nested      strength ~ 1 + (1|batch/cask)            lme4::Pastes (read from the CSV
#                      /work/shared/reference/data/pastes.csv, the data of tests/data/pastes.parquet)
#   penicillin_crossed diameter ~ 1 + (1|plate) + (1|sample)     lme4::Penicillin (penicillin.csv)
#   sim_nested_slope   y ~ x + w + (x | school) + (1 | school:class)
#                      simulated here (set.seed), written to sim_nested_slope.parquet: a fixed
#                      pupil-level covariate x with a correlated random slope at the school level,
#                      a class-level covariate w, classes nested in schools
#   sim_crossed_slope  y ~ x + (1 | rater) + (x || item)
#                      simulated here, sim_crossed_slope.parquet: crossed raters and items, an
#                      uncorrelated random slope at the item level (two terms on one factor)
#   sim_crossed_boundary y ~ x + (1 | a) + (1 | b)
#                      simulated here (sim_crossed_boundary.parquet) with no variance between
#                      the levels of b: the first seed from 1 whose REML fit has theta_b < 0.01
#                      (lme4 stops near, not at, 0; mlpipe snaps it to 0).  lme4's profile of
#                      sd_(Intercept)|b falls back to linear interpolation ("bad spline fit")
#   pixel_ties         pixel ~ day + I(day^2) + (day || Dog) + (1 | Dog:Side)
#                      nlme::Pixel (CT pixel intensities of 10 dogs, both sides, over time;
#                      Pinheiro & Bates 2000), written to pixel.parquet: lme4 reorders its terms
#                      with ties reversed (Dog:Side, Dog.day, Dog.(Intercept))
#
# JSON keys: case, data, formula, versions {lme4, lmerTest, pbkrtest}, and
#   reml {theta, sigma, reml_criterion, fixed {term, estimate, se}}, ml {theta, sigma, deviance},
#   satterthwaite {term, df, t, p}, kenward_roger {term, df, t, se, p} (se = sqrt(diag(vcovAdj))),
#   wald_ci {name, lower, upper} (null where lme4 gives NA: its Wald intervals cover the fixed
#   effects only), profile_ci {name, lower, upper, warnings}.  Names are lme4's oldNames = FALSE
#   names ("sd_(Intercept)|cask:batch", "cor_x.(Intercept)|school", "sigma"), in lme4's order.
# The REML fit is polished (bobyqa, rhoend 1e-12) so the reference optimum is tight.
suppressMessages({library(lme4); library(lmerTest); library(pbkrtest); library(jsonlite)
                  library(nlme)})
invisible(Sys.setlocale("LC_COLLATE", "C"))
args <- commandArgs(TRUE); out <- if (length(args)) args[1] else "tests/data/multilevel_inference"
dir.create(out, recursive = TRUE, showWarnings = FALSE)
refdata <- Sys.getenv("REFDATA", "/work/shared/reference/data")
csvdir <- file.path(tempdir(), "mli_csv"); dir.create(csvdir, showWarnings = FALSE)

read_factors <- function(f, facs) {
  d <- read.csv(f, colClasses = setNames(rep("character", length(facs)), facs))
  for (v in facs) d[[v]] <- factor(d[[v]], levels = sort(unique(d[[v]])))
  d
}

ctrl <- lmerControl(optimizer = "bobyqa", calc.derivs = FALSE, optCtrl = list(rhoend = 1e-12))

# lmerTest::lmer (an lmerModLmerTest: Satterthwaite and Kenward-Roger); as(., "lmerMod") for confint
fit_polished <- function(fo, data, reml) {
  m <- lme4::lmer(fo, data = data, REML = reml, control = lmerControl(calc.derivs = FALSE))
  lmerTest::lmer(fo, data = data, REML = reml, start = list(theta = getME(m, "theta")),
                 control = ctrl)
}

ddf_table <- function(mt, ddf) {
  co <- summary(mt, ddf = ddf)$coefficients
  list(term = rownames(co), df = unname(co[, "df"]), t = unname(co[, "t value"]),
       se = unname(co[, "Std. Error"]), p = unname(co[, "Pr(>|t|)"]))
}

new_names <- function(m, old) {
  nsig <- sum(grepl("^\\.sig[0-9]+$", old))
  long <- unname(lme4:::tnames(m, old = FALSE, prefix = c("sd", "cor")))
  new <- old; new[seq_len(nsig)] <- long; new[old == ".sigma"] <- "sigma"
  new
}

one_case <- function(case, dataname, data, formula) {
  fo <- as.formula(formula)
  m <- fit_polished(fo, data, TRUE)
  ml <- fit_polished(fo, data, FALSE)
  mt <- m; m <- as(mt, "lmerMod")
  fe <- summary(m)$coefficients
  satt <- ddf_table(mt, "Satterthwaite"); satt$se <- NULL
  kr <- ddf_table(mt, "Kenward-Roger")
  kr$se_vcovadj <- unname(sqrt(diag(as.matrix(pbkrtest::vcovAdj(m)))))
  wald <- confint(m, method = "Wald", level = 0.95)
  warns <- character()
  prof <- withCallingHandlers(
    suppressMessages(confint(m, method = "profile", level = 0.95)),
    warning = function(w) { warns <<- c(warns, conditionMessage(w)); invokeRestart("muffleWarning") })
  na2null <- function(x) lapply(unname(x), function(v) if (is.na(v)) NULL else v)
  res <- list(
    case = case, data = dataname, formula = formula,
    versions = list(lme4 = as.character(packageVersion("lme4")),
                    lmerTest = as.character(packageVersion("lmerTest")),
                    pbkrtest = as.character(packageVersion("pbkrtest"))),
    reml = list(theta = unname(getME(m, "theta")), theta_names = names(getME(m, "theta")),
                sigma = sigma(m), reml_criterion = REMLcrit(m),
                fixed = list(term = rownames(fe), estimate = unname(fe[, 1]), se = unname(fe[, 2]))),
    ml = list(theta = unname(getME(ml, "theta")), sigma = sigma(ml), deviance = deviance(ml)),
    satterthwaite = satt, kenward_roger = kr,
    wald_ci = list(name = new_names(m, rownames(wald)), lower = na2null(wald[, 1]),
                   upper = na2null(wald[, 2])),
    profile_ci = list(name = new_names(m, rownames(prof)), lower = unname(prof[, 1]),
                      upper = unname(prof[, 2]), warnings = I(unique(warns))))
  write(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE, null = "null"),
        file.path(out, paste0(case, ".json")))
  cat(sprintf("done %s: REML %.8f, %d profile warnings\n", case, REMLcrit(m), length(warns)))
}

# ---- data -----------------------------------------------------------------------------------
pastes <- read_factors(file.path(refdata, "pastes.csv"), c("batch", "cask", "sample"))
penicillin <- read_factors(file.path(refdata, "penicillin.csv"), c("plate", "sample"))

# simulated: 14 schools x 4 classes x 7 pupils; values rounded to 4 decimals so the CSV and the
# Parquet hold exactly the numbers R fits
set.seed(20240611)
ns <- 14; nc <- 4; np <- 7
school <- rep(sprintf("s%02d", seq_len(ns)), each = nc * np)
class <- rep(sprintf("c%d", rep(seq_len(nc), ns)), each = np)
x <- round(rnorm(ns * nc * np), 4)
w <- round(rep(rnorm(ns * nc), each = np), 4)
b0 <- rnorm(ns, sd = 1.5); b1 <- 0.4 * b0 / 1.5 * 0.8 + rnorm(ns, sd = 0.8 * sqrt(1 - 0.4^2))
cl <- rnorm(ns * nc, sd = 1.0)
si <- as.integer(factor(school)); ci <- (si - 1) * nc + rep(rep(seq_len(nc), ns), each = np)
y <- round(10 + 2 * x - 0.7 * w + b0[si] + b1[si] * x + cl[ci] + rnorm(length(x), sd = 2), 4)
sim1 <- data.frame(school = school, class = class, x = x, w = w, y = y)

# simulated crossed: 30 raters x 12 items, each rater rates 8 items
set.seed(7)
nr <- 30; ni <- 12
pairs <- do.call(rbind, lapply(seq_len(nr), function(r) data.frame(r = r, i = sort(sample(ni, 8)))))
x2 <- round(rnorm(nrow(pairs)), 4)
ra <- rnorm(nr, sd = 0.9); it0 <- rnorm(ni, sd = 1.4); it1 <- rnorm(ni, sd = 0.6)
y2 <- round(5 + 1.2 * x2 + ra[pairs$r] + it0[pairs$i] + it1[pairs$i] * x2 + rnorm(nrow(pairs), sd = 1), 4)
sim2 <- data.frame(rater = sprintf("r%02d", pairs$r), item = sprintf("i%02d", pairs$i), x = x2, y = y2)

write_sim <- function(d, name) {
  f <- file.path(csvdir, paste0(name, ".csv"))
  write.csv(d, f, row.names = FALSE)
  chars <- names(d)[sapply(d, is.character)]
  writeLines(chars, file.path(csvdir, paste0(name, ".factors")))
  back <- read_factors(f, chars)
  stopifnot(isTRUE(all.equal(back[names(d)[!names(d) %in% chars]], d[!names(d) %in% chars],
                             tolerance = 0)))
  back
}
sim1 <- write_sim(sim1, "sim_nested_slope")
sim2 <- write_sim(sim2, "sim_crossed_slope")
for (seed in 1:100) {
  set.seed(seed)
  n3 <- 200
  a3 <- sample(15, n3, replace = TRUE); b3 <- sample(6, n3, replace = TRUE)
  x3 <- round(rnorm(n3), 4)
  y3 <- round(1 + 0.5 * x3 + rnorm(15)[a3] + rnorm(n3), 4)
  sim3 <- data.frame(a = sprintf("a%02d", a3), b = sprintf("b%d", b3), x = x3, y = y3)
  m3 <- suppressMessages(lme4::lmer(y ~ x + (1 | a) + (1 | b), data = sim3))
  if (getME(m3, "theta")[[2]] < 0.01) break
}
cat(sprintf("sim_crossed_boundary: seed %d, theta %s\n", seed,
            paste(format(getME(m3, "theta")), collapse = " ")))
sim3 <- write_sim(sim3, "sim_crossed_boundary")
px <- as.data.frame(nlme::Pixel)[, c("Dog", "Side", "day", "pixel")]
px <- data.frame(Dog = as.character(px$Dog), Side = as.character(px$Side), day = px$day,
                 pixel = px$pixel)
px <- write_sim(px, "pixel")

one_case("pastes_nested", "pastes", pastes, "strength ~ 1 + (1|batch/cask)")
one_case("penicillin_crossed", "penicillin", penicillin, "diameter ~ 1 + (1|plate) + (1|sample)")
one_case("sim_nested_slope", "sim_nested_slope", sim1, "y ~ x + w + (x | school) + (1 | school:class)")
one_case("sim_crossed_slope", "sim_crossed_slope", sim2, "y ~ x + (1 | rater) + (x || item)")
one_case("sim_crossed_boundary", "sim_crossed_boundary", sim3, "y ~ x + (1 | a) + (1 | b)")
one_case("pixel_ties", "pixel", px, "pixel ~ day + I(day^2) + (day || Dog) + (1 | Dog:Side)")

# CSV -> Parquet (R's character columns as strings, e.g. Pixel's Dog "1".."10")
py <- Sys.getenv("PYTHON", ".venv/bin/python")
conv <- '
import sys, pathlib, pyarrow as pa, pyarrow.csv as pc, pyarrow.parquet as pq
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for f in sorted(src.glob("*.csv")):
    facs = [x for x in f.with_suffix(".factors").read_text().split() if x]
    t = pc.read_csv(f, convert_options=pc.ConvertOptions(
        column_types={c: pa.string() for c in facs}))
    pq.write_table(t, dst / (f.stem + ".parquet"))
    print("wrote", f.stem, t.num_rows, "rows", t.schema.types)
'
stopifnot(system2("env", c("-u", "LD_LIBRARY_PATH", py, "-c", shQuote(conv), csvdir, out)) == 0)
