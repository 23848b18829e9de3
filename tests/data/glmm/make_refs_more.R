# More GLMM references, on real datasets the GLMM code was not developed on: crossed
# (VerbAgg), nested three levels deep (guImmun), nested implicitly (Arabidopsis), an offset
# (Owls), repeated counts (epil), a 0/1 outcome in a longitudinal trial (bacteria), and a
# factor with many levels in the fixed part (Salamanders).  Same JSON layout and the same
# glmmTMB + glmer pair as make_refs.R (`one`, in tmb_glmer_pair.R).
# Usage, from the repository root:
#   Rscript tests/data/glmm/make_refs_more.R [OUTDIR]      # OUTDIR defaults to tests/data/glmm
suppressMessages({library(glmmTMB); library(lme4); library(mlmRev); library(MASS)
                  library(jsonlite)})
invisible(Sys.setlocale("LC_COLLATE", "C"))
args <- commandArgs(TRUE)
out <- if (length(args)) args[1] else "tests/data/glmm"
py <- Sys.getenv("PYTHON", ".venv/bin/python")
source("tests/data/glmm/read_parquet.R")
dir.create(out, recursive = TRUE, showWarnings = FALSE)

# a data.frame to OUT/NAME.parquet: factors as strings (sorted levels when read back), NA as null
save <- function(d, name) {
  for (v in names(d)) if (is.factor(d[[v]]) || is.logical(d[[v]])) d[[v]] <- as.character(d[[v]])
  f <- file.path(out, paste0(name, ".csv"))
  write.csv(d, f, row.names = FALSE, na = "")
  strs <- names(d)[sapply(d, is.character)]
  system2("env", c("-u", "LD_LIBRARY_PATH", py, "-c", shQuote(sprintf(paste0(
    "import polars as pl; pl.read_csv('%s', schema_overrides={c: pl.Utf8 for c in %s})",
    ".write_parquet('%s')"), f,
    paste0("[", paste0("'", strs, "'", collapse = ", "), "]"), sub("csv$", "parquet", f)))))
  unlink(f)
}

source("tests/data/glmm/tmb_glmer_pair.R")  # one(): glmmTMB + glmer, one JSON

# lme4::VerbAgg: verbal aggression, 316 respondents x 24 items, a 0/1 answer (7584 rows)
data(VerbAgg)
save(data.frame(r2 = as.integer(VerbAgg$r2 == "Y"), Anger = VerbAgg$Anger,
                Gender = VerbAgg$Gender, btype = VerbAgg$btype, situ = VerbAgg$situ,
                id = VerbAgg$id, item = VerbAgg$item), "verbagg")
# mlmRev::guImmun: complete immunization of 2159 Guatemalan children of 1595 mothers in 161
# communities (Rodriguez & Goldman 1995)
data(guImmun)
save(data.frame(immun = as.integer(guImmun$immun == "Y"), kid2p = guImmun$kid2p,
                mom25p = guImmun$mom25p, ord = guImmun$ord, ethn = guImmun$ethn,
                momEd = guImmun$momEd, pcInd81 = guImmun$pcInd81, mom = guImmun$mom,
                comm = guImmun$comm), "guimmun")
# lme4::Arabidopsis: fruits of 625 plants, genotypes (integer labels) within populations
data(Arabidopsis)
save(data.frame(total_fruits = Arabidopsis$total.fruits, nutrient = Arabidopsis$nutrient,
                amd = Arabidopsis$amd, status = Arabidopsis$status, popu = Arabidopsis$popu,
                gen = Arabidopsis$gen), "arabidopsis")
# glmmTMB::Owls: begging calls of owl nestlings, 599 visits to 27 nests, brood size exposure
data(Owls, package = "glmmTMB")
save(data.frame(calls = Owls$SiblingNegotiation, FoodTreatment = Owls$FoodTreatment,
                SexParent = Owls$SexParent, logbrood = log(Owls$BroodSize), Nest = Owls$Nest),
     "owls")
# MASS::epil: seizure counts of 59 epileptics over 4 visits (Thall & Vail 1990)
save(data.frame(y = epil$y, trt = epil$trt, lbase = epil$lbase, lage = epil$lage,
                V4 = epil$V4, subject = as.character(epil$subject)), "epil")
# MASS::bacteria: H. influenzae in 50 children over 11 weeks, 220 tests
save(data.frame(y = as.integer(bacteria$y == "y"), trt = bacteria$trt,
                late = as.integer(bacteria$week > 2), ID = bacteria$ID), "bacteria")
# glmmTMB::Salamanders: counts of 7 species/stages in 23 streams, mined or not
data(Salamanders, package = "glmmTMB")
save(data.frame(count = Salamanders$count, spp = Salamanders$spp, mined = Salamanders$mined,
                site = Salamanders$site), "salamanders")

one("tmb_verbagg_crossed", "verbagg", "r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)",
    binomial(), "binomial", "logit")
one("tmb_guimmun_nested", "guimmun",
    "immun ~ kid2p + mom25p + ord + ethn + momEd + pcInd81 + (1 | mom) + (1 | comm)",
    binomial(), "binomial", "logit")
one("tmb_arabidopsis_nested", "arabidopsis",
    "total_fruits ~ nutrient + amd + status + (1 | popu) + (1 | gen)", poisson(), "poisson", "log")
one("tmb_owls_offset", "owls",
    "calls ~ FoodTreatment * SexParent + offset(logbrood) + (1 | Nest)", poisson(), "poisson", "log")
one("tmb_epil_slope", "epil", "y ~ lbase * trt + lage + V4 + (V4 | subject)", poisson(),
    "poisson", "log")
one("tmb_bacteria", "bacteria", "y ~ trt + late + (1 | ID)", binomial(), "binomial", "logit")
one("tmb_salamanders", "salamanders", "count ~ spp + mined + (1 | site)", poisson(), "poisson",
    "log")
