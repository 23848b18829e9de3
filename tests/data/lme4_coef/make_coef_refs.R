# lme4 references for mlpipe's per-level and named outputs (tests/test_results_api.py):
# coef() per factor, fixef(), vcov() with its names, and the "Correlation of Fixed Effects"
# block of print(summary(m), correlation = TRUE), for REML fits converged tightly.
#
# Usage (from the repository root):  Rscript tests/data/lme4_coef/make_coef_refs.R
# Writes tests/data/lme4_coef/coef_refs.json: a list of cases, each
#   {case, data, formula, lme4_version, fixef {term: value}, vcov {names, values (rows)},
#    coef [{group, levels, columns, values (levels x columns)}], correlation_text [lines]}.
# Data: lme4's sleepstudy, Pastes and Penicillin (the sources of tests/data/*.parquet) and
# tests/data/hsb82.csv (the rows of data/hsb82.parquet).
suppressMessages({library(lme4); library(jsonlite)})
invisible(Sys.setlocale("LC_COLLATE", "C"))
hsb <- read.csv("tests/data/hsb82.csv", colClasses = c(school = "character"))
hsb$sector <- factor(hsb$sector)

cases <- list(
  list("sleepstudy_rs", "sleepstudy", sleepstudy, "Reaction ~ Days + (Days | Subject)"),
  list("sleepstudy_diag", "sleepstudy", sleepstudy, "Reaction ~ Days + (Days || Subject)"),
  list("sleepstudy_slope_only", "sleepstudy", sleepstudy, "Reaction ~ 1 + (0 + Days | Subject)"),
  list("hsb_full", "hsb82", hsb, "mAch ~ meanses*cses + sector*cses + (cses | school)"),
  list("pastes_nested", "pastes", Pastes, "strength ~ 1 + (1 | batch/cask)"),
  list("penicillin_crossed", "penicillin", Penicillin, "diameter ~ 1 + (1 | plate) + (1 | sample)")
)

out <- lapply(cases, function(cs) {
  # converged tightly (lme4's default tolerances stop ~1e-5 short of the optimum on hsb_full)
  m <- lmer(as.formula(cs[[4]]), data = cs[[3]], REML = TRUE,
            control = lmerControl(optimizer = "nloptwrap",
                                  optCtrl = list(xtol_abs = 1e-12, ftol_abs = 1e-14,
                                                 xtol_rel = 1e-12, ftol_rel = 1e-15,
                                                 maxeval = 1e5)))
  cat(cs[[1]], sprintf("%.8f", REMLcrit(m)), "\n")
  cf <- coef(m)
  v <- as.matrix(vcov(m))
  txt <- capture.output(print(summary(m), correlation = TRUE))
  at <- grep("^Correlation of Fixed Effects:", txt)
  corr <- if (length(at)) {
    rest <- txt[at:length(txt)]
    end <- which(rest == "")[1]
    if (is.na(end)) rest else rest[seq_len(end - 1)]
  } else character(0)
  list(case = cs[[1]], data = cs[[2]], formula = cs[[4]],
       lme4_version = as.character(packageVersion("lme4")), reml_criterion = REMLcrit(m),
       fixef = as.list(fixef(m)),
       vcov = list(names = colnames(v), values = unname(v)),
       coef = lapply(names(cf), function(g) list(
         group = g, levels = rownames(cf[[g]]), columns = colnames(cf[[g]]),
         values = unname(as.matrix(cf[[g]])))),
       correlation_text = corr)
})
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE),
           "tests/data/lme4_coef/coef_refs.json")

# R's abbreviate() as lme4 uses it for the correlation block's names (minlength 6 and 11)
nm <- c("(Intercept)", "meanses", "cses", "sectorPublic", "meanses:cses", "cses:sectorPublic",
        "I(age^2)", "log(x)", "Days", "factor(Days)1", "factor(Days)2", "sexFemale:age",
        "poly(x, 2)1", "poly(x, 2)2", "xAAAAAAAAAAAA", "aeiouaeiouae", "center(cses, by = school)",
        "group_mean(ses, by = school)", "x", "ab", "abcdefghijklmnop", "abcdefghijklmnoq")
writeLines(toJSON(list(names = nm, min6 = unname(abbreviate(nm, 6)),
                       min11 = unname(abbreviate(nm, 11))), digits = NA, pretty = TRUE),
           "tests/data/lme4_coef/abbreviate_refs.json")
