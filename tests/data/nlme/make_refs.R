# nlme reference fits for mlpipe's serially correlated residuals (--correlation
# "ar1(TIME | GROUP)" / "car1(TIME | GROUP)") and heterogeneous residual variances
# (--residual-variance-by COL), on real datasets from lme4 / nlme.
#
# Usage (from the repository root):
#   Rscript tests/data/nlme/make_refs.R [OUTDIR] [CASE ...]   # OUTDIR defaults to tests/data/nlme
# Environment: PYTHON (default .venv/bin/python) converts the exported CSVs to Parquet.
#
# Definitions (what mlpipe implements):
#   ar1(TIME | GROUP)  = corAR1(form = ~ 1 | GROUP) on data sorted by (GROUP, TIME): the
#                        correlation of the i-th and j-th observation of a series is phi^|i-j|.
#   car1(TIME | GROUP) = corCAR1(form = ~ TIME | GROUP): correlation phi^|t_i - t_j|.
#   --residual-variance-by COL = weights = varIdent(form = ~ 1 | COL): residual sd
#                        sigma * delta_level, delta = 1 for the first level in byte order.
#   GROUP a:b          = nlme's nested grouping ~ 1 | a/b (the series are the a:b cells).
#
# Data flow: each dataset is reduced to the columns the models use, sorted by (GROUP, TIME)
# (factor levels sorted in byte order), written to CSV (write.csv, 15 significant digits),
# read back, and the models are fitted on the read-back data, so the reference sees exactly
# the numbers in the CSV; the CSV is then converted to Parquet (factors as strings).
#
# Each fit is the best (highest logLik) of several nlme fits: optimizers nlminb and optim and
# two starting values of the correlation parameter (and of the variance ratios).  Every fit is
# then checked against an independent dense-matrix evaluation of the (RE)ML log-likelihood
# at nlme's estimates (built from the definitions above), and that likelihood is re-maximised
# with optim (BFGS) from nlme's optimum to confirm no higher value is nearby.  Independence
# fits (no correlation, no weights) are compared with lme4's lmer.
suppressMessages({library(nlme); library(lme4); library(jsonlite)})
invisible(Sys.setlocale("LC_COLLATE", "C"))
args <- commandArgs(TRUE)
out <- if (length(args)) args[1] else "tests/data/nlme"
only <- if (length(args) > 1) args[-1] else NULL
dir.create(out, recursive = TRUE, showWarnings = FALSE)
radix_levels <- function(x) sort(unique(as.character(x)), method = "radix")

# ---------------------------------------------------------------------------- data export
FACTORS <- list()
export <- function(d, name, sort_by) {
  d <- as.data.frame(d)
  attributes(d) <- attributes(d)[c("names", "row.names", "class")]   # drop groupedData extras
  class(d) <- "data.frame"
  for (v in names(d)) if (is.factor(d[[v]])) d[[v]] <- as.character(d[[v]])
  d <- d[do.call(order, c(unname(d[sort_by]), list(method = "radix"))), , drop = FALSE]
  rownames(d) <- NULL
  f <- file.path(out, paste0(name, ".csv"))
  write.csv(d, f, row.names = FALSE)
  facs <- names(d)[sapply(d, is.character)]
  FACTORS[[name]] <<- facs
  back <- read.csv(f, colClasses = setNames(rep("character", length(facs)), facs))
  for (v in facs) back[[v]] <- factor(back[[v]], levels = radix_levels(back[[v]]))
  stopifnot(!is.unsorted(do.call(order, c(unname(back[sort_by]), list(method = "radix")))))
  back
}

sleepstudy_d <- export(lme4::sleepstudy[, c("Subject", "Days", "Reaction")], "sleepstudy",
                       c("Subject", "Days"))
ox <- nlme::Oxboys[, c("Subject", "age", "height", "Occasion")]
ox$Occasion <- as.integer(as.character(ox$Occasion))                 # numeric time 1..9
oxboys_d <- export(ox, "oxboys", c("Subject", "Occasion"))
orthodont_d <- export(nlme::Orthodont[, c("Subject", "Sex", "age", "distance")], "orthodont",
                      c("Subject", "age"))
bodyweight_d <- export(nlme::BodyWeight[, c("Rat", "Diet", "Time", "weight")], "bodyweight",
                       c("Rat", "Time"))
ovary_d <- export(nlme::Ovary[, c("Mare", "Time", "follicles")], "ovary", c("Mare", "Time"))
pixel_d <- export(nlme::Pixel[, c("Dog", "Side", "day", "pixel")], "pixel",
                  c("Dog", "Side", "day"))
# stop 27's additions, datasets the residual code was not developed on:
# nlme::Milk: protein content of the milk of 79 cows over up to 19 weeks, 3 diets (Diggle
# 1990); series of different lengths (cows dropped out)
milk_d <- export(nlme::Milk[, c("Cow", "Diet", "Time", "protein")], "milk", c("Cow", "Time"))
# nlme::Dialyzer: ultrafiltration rates of 20 dialyzers at 7 pressures, two blood flows
dial_d <- export(nlme::Dialyzer[, c("Subject", "QB", "pressure", "index", "rate")],
                 "dialyzer", c("Subject", "index"))
# nlme::Cefamandole: plasma concentrations in 6 subjects at 14 times 10-360 min (8 gaps)
cef_d <- export(nlme::Cefamandole[, c("Subject", "Time", "conc")], "cefamandole",
                c("Subject", "Time"))
DATA <- list(sleepstudy = sleepstudy_d, oxboys = oxboys_d, orthodont = orthodont_d,
             bodyweight = bodyweight_d, ovary = ovary_d, pixel = pixel_d, milk = milk_d,
             dialyzer = dial_d, cefamandole = cef_d)

# ---------------------------------------------------------------------------- cases
# re: random-effect terms, outermost first: grp (lme4 name), cols (grouping columns), form
# (the term's model matrix).  cor: NULL or list(type, time, group = grouping columns).
RE <- function(grp, form, diag = FALSE) list(grp = grp, cols = strsplit(grp, ":")[[1]],
                                             form = form, diag = diag)
cases <- list(
  list(case = "sleep_ar1_ri", data = "sleepstudy",
       formula = "Reaction ~ Days + (1 | Subject)", fixed = Reaction ~ Days,
       random = ~ 1 | Subject, re = list(RE("Subject", ~ 1)),
       cor = list(type = "ar1", time = "Days", group = "Subject")),
  # (Days | Subject) with ar1 has no interior optimum in nlme (the random-effect correlation
  # goes to +-1 and nlminb stops with "singular convergence"); the diagonal version is used.
  list(case = "sleep_ar1_diag", data = "sleepstudy",
       formula = "Reaction ~ Days + (Days || Subject)", fixed = Reaction ~ Days,
       random = quote(list(Subject = pdDiag(~ Days))), re = list(RE("Subject", ~ Days, TRUE)),
       cor = list(type = "ar1", time = "Days", group = "Subject")),
  list(case = "sleep_indep_rs", data = "sleepstudy",
       formula = "Reaction ~ Days + (Days | Subject)", fixed = Reaction ~ Days,
       random = ~ Days | Subject, re = list(RE("Subject", ~ Days))),
  # Oxboys: a straight line in age leaves the growth spurt in the residuals (ar1 phi -> 0.98);
  # the quadratic growth curve of Pinheiro & Bates (2000, sec. 6.3) is used instead.
  list(case = "oxboys_ar1_quad", data = "oxboys",
       formula = "height ~ age + I(age^2) + (age + I(age^2) | Subject)",
       fixed = height ~ age + I(age^2), random = ~ age + I(age^2) | Subject,
       re = list(RE("Subject", ~ age + I(age^2))),
       cor = list(type = "ar1", time = "Occasion", group = "Subject")),
  list(case = "oxboys_car1_quad", data = "oxboys",
       formula = "height ~ age + I(age^2) + (age | Subject)",
       fixed = height ~ age + I(age^2), random = ~ age | Subject,
       re = list(RE("Subject", ~ age)),
       cor = list(type = "car1", time = "age", group = "Subject")),
  list(case = "orthodont_varident", data = "orthodont",
       formula = "distance ~ age * Sex + (age | Subject)", fixed = distance ~ age * Sex,
       random = ~ age | Subject, re = list(RE("Subject", ~ age)), varby = "Sex"),
  list(case = "orthodont_ar1_rs", data = "orthodont",                    # negative phi
       formula = "distance ~ age * Sex + (age | Subject)", fixed = distance ~ age * Sex,
       random = ~ age | Subject, re = list(RE("Subject", ~ age)),
       cor = list(type = "ar1", time = "age", group = "Subject")),
  list(case = "orthodont_ar1_varident", data = "orthodont",
       formula = "distance ~ age * Sex + (1 | Subject)", fixed = distance ~ age * Sex,
       random = ~ 1 | Subject, re = list(RE("Subject", ~ 1)), varby = "Sex",
       cor = list(type = "ar1", time = "age", group = "Subject")),
  list(case = "bodyweight_car1_ri", data = "bodyweight",
       formula = "weight ~ Time * Diet + (1 | Rat)", fixed = weight ~ Time * Diet,
       random = ~ 1 | Rat, re = list(RE("Rat", ~ 1)),
       cor = list(type = "car1", time = "Time", group = "Rat")),
  list(case = "bodyweight_car1_rs", data = "bodyweight",
       formula = "weight ~ Time * Diet + (Time | Rat)", fixed = weight ~ Time * Diet,
       random = ~ Time | Rat, re = list(RE("Rat", ~ Time)),
       cor = list(type = "car1", time = "Time", group = "Rat")),
  list(case = "bodyweight_ar1_varident", data = "bodyweight",
       formula = "weight ~ Time * Diet + (Time | Rat)", fixed = weight ~ Time * Diet,
       random = ~ Time | Rat, re = list(RE("Rat", ~ Time)), varby = "Diet",
       cor = list(type = "ar1", time = "Time", group = "Rat")),
  list(case = "bodyweight_indep_rs", data = "bodyweight",
       formula = "weight ~ Time * Diet + (Time | Rat)", fixed = weight ~ Time * Diet,
       random = ~ Time | Rat, re = list(RE("Rat", ~ Time))),
  list(case = "ovary_ar1_ri", data = "ovary",
       formula = "follicles ~ sin(2 * pi * Time) + cos(2 * pi * Time) + (1 | Mare)",
       fixed = follicles ~ sin(2 * pi * Time) + cos(2 * pi * Time),
       random = ~ 1 | Mare, re = list(RE("Mare", ~ 1)),
       cor = list(type = "ar1", time = "Time", group = "Mare")),
  list(case = "pixel_ar1_nested", data = "pixel",
       formula = "pixel ~ day + I(day^2) + (day | Dog) + (1 | Dog:Side)",
       fixed = pixel ~ day + I(day^2), random = list(Dog = ~ day, Side = ~ 1),
       re = list(RE("Dog", ~ day), RE("Dog:Side", ~ 1)),
       cor = list(type = "ar1", time = "day", group = c("Dog", "Side"))),
  list(case = "pixel_car1_nested", data = "pixel",
       formula = "pixel ~ day + I(day^2) + (day | Dog) + (1 | Dog:Side)",
       fixed = pixel ~ day + I(day^2), random = list(Dog = ~ day, Side = ~ 1),
       re = list(RE("Dog", ~ day), RE("Dog:Side", ~ 1)),
       cor = list(type = "car1", time = "day", group = c("Dog", "Side"))),
  list(case = "pixel_indep_nested", data = "pixel",
       formula = "pixel ~ day + I(day^2) + (day | Dog) + (1 | Dog:Side)",
       fixed = pixel ~ day + I(day^2), random = list(Dog = ~ day, Side = ~ 1),
       re = list(RE("Dog", ~ day), RE("Dog:Side", ~ 1))),
  # the series (Dog:Side) have no random effect of their own; they are nested in Dog
  list(case = "pixel_ar1_series_in_re", data = "pixel",
       formula = "pixel ~ day + I(day^2) + Side + (day | Dog)",
       fixed = pixel ~ day + I(day^2) + Side, random = ~ day | Dog,
       re = list(RE("Dog", ~ day)),
       cor = list(type = "ar1", time = "day", group = c("Dog", "Side"))),
  # stop 27's additions
  list(case = "milk_ar1_ri", data = "milk",
       formula = "protein ~ Diet * Time + (1 | Cow)", fixed = protein ~ Diet * Time,
       random = ~ 1 | Cow, re = list(RE("Cow", ~ 1)),
       cor = list(type = "ar1", time = "Time", group = "Cow")),
  list(case = "milk_ar1_varident", data = "milk",
       formula = "protein ~ Diet + Time + (1 | Cow)", fixed = protein ~ Diet + Time,
       random = ~ 1 | Cow, re = list(RE("Cow", ~ 1)), varby = "Diet",
       cor = list(type = "ar1", time = "Time", group = "Cow")),
  list(case = "dialyzer_ar1_varident", data = "dialyzer",
       formula = "rate ~ (pressure + I(pressure^2)) * QB + (pressure | Subject)",
       fixed = rate ~ (pressure + I(pressure^2)) * QB, random = ~ pressure | Subject,
       re = list(RE("Subject", ~ pressure)), varby = "QB",
       cor = list(type = "ar1", time = "index", group = "Subject")),
  list(case = "cefamandole_car1_ri", data = "cefamandole",
       formula = "log(conc) ~ log(Time) + (1 | Subject)", fixed = log(conc) ~ log(Time),
       random = ~ 1 | Subject, re = list(RE("Subject", ~ 1)),
       cor = list(type = "car1", time = "Time", group = "Subject"))
)

# ---------------------------------------------------------------------------- nlme calls
group_rhs <- function(cols) paste(cols, collapse = "/")
cor_call <- function(cor, value = NULL) {
  if (is.null(cor)) return(NULL)
  fn <- if (cor$type == "ar1") "corAR1" else "corCAR1"
  form <- as.formula(sprintf("~ %s | %s", if (cor$type == "ar1") "1" else cor$time,
                             group_rhs(cor$group)), env = globalenv())
  cl <- call(fn, form = form)
  if (!is.null(value)) cl <- as.call(c(as.list(cl)[1], list(value = value), as.list(cl)[-1]))
  cl
}
var_call <- function(varby, levels = NULL, value = NULL) {
  if (is.null(varby)) return(NULL)
  form <- as.formula(sprintf("~ 1 | %s", varby), env = globalenv())
  if (is.null(value)) return(call("varIdent", form = form))
  # named starting values for all but the first level make the first level the reference
  if (length(value) == 1) value <- rep(value, length(levels) - 1)
  call("varIdent", value = setNames(value, levels[-1]), form = form)
}
lme_call <- function(cs, method, cor = cor_call(cs$cor), wts = var_call(cs$varby),
                     control = NULL, random = cs$random) {
  cl <- call("lme", fixed = cs$fixed, data = as.name(cs$data), random = random)
  if (!is.null(cor)) cl$correlation <- cor
  if (!is.null(wts)) cl$weights <- wts
  cl$method <- method
  if (!is.null(control)) cl$control <- control
  cl
}
deparse1l <- function(x) paste(trimws(deparse(x, width.cutoff = 500L)), collapse = " ")

CONTROL <- function(opt) lmeControl(maxIter = 500, msMaxIter = 500, niterEM = 100,
                                    msMaxEval = 5000, tolerance = 1e-10, msTol = 1e-12,
                                    opt = opt, returnObject = FALSE)

# random-effects structure started at given covariance matrices (relative to sigma^2)
start_random <- function(cs, rel) {
  setNames(lapply(seq_along(cs$re), function(k) {
    r <- cs$re[[k]]
    if (r$diag) pdDiag(rel[[k]], form = r$form) else pdLogChol(rel[[k]], form = r$form)
  }), sapply(cs$re, function(r) tail(r$cols, 1)))
}

# nlme fits from several starts (or, given u, from the parameters u); the highest logLik wins
fit_starts <- function(cs, method, u = NULL) {
  d <- DATA[[cs$data]]
  env <- new.env(parent = globalenv()); assign(cs$data, d, envir = env)
  vlev <- if (is.null(cs$varby)) NULL else levels(d[[cs$varby]])
  if (is.null(u)) {
    cor_starts <- if (is.null(cs$cor)) list(NULL) else
      if (cs$cor$type == "ar1") list(NULL, 0.5) else list(NULL, 0.6)
    var_starts <- if (is.null(cs$varby)) list(NULL) else list(1, 2)
    rnd <- list(NULL)
  } else {
    cor_starts <- list(u$phi)
    var_starts <- list(if (is.null(u$ratios)) NULL else unname(u$ratios[-1]))
    rnd <- list(start_random(cs, lapply(u$Psi, function(P) P / u$sigma^2)))
  }
  fits <- list(); info <- list()
  for (opt in c("nlminb", "optim")) for (cv in cor_starts) for (vv in var_starts) {
    assign("ctrl", CONTROL(opt), envir = env)
    cl <- lme_call(cs, method, cor = cor_call(cs$cor, cv), wts = var_call(cs$varby, vlev, vv),
                   control = quote(ctrl), random = rnd[[1]] %||% cs$random)
    label <- if (!is.null(u)) sprintf("%s from the re-maximised parameters", opt) else
      sprintf("%s%s%s", opt, if (is.null(cv)) "" else sprintf(", phi start %g", cv),
              if (is.null(vv)) "" else sprintf(", ratio start %g", vv))
    f <- tryCatch(suppressWarnings(eval(cl, env)), error = function(e) conditionMessage(e))
    if (is.character(f)) {
      info[[length(info) + 1]] <- list(start = label, loglik = NULL, error = f)
      cat(sprintf("    %s %s [%s]: FAILED %s\n", cs$case, method, label,
                  gsub("\\s+", " ", f)))
    } else {
      fits[[label]] <- f
      info[[length(info) + 1]] <- list(start = label, loglik = as.numeric(logLik(f)))
    }
  }
  list(fits = fits, info = info)
}
pick <- function(fits) {
  if (!length(fits)) stop("no nlme fit converged")
  ll <- sapply(fits, function(f) as.numeric(logLik(f)))
  best <- names(which.max(ll))
  list(fit = fits[[best]], best = best, spread = max(ll) - min(ll))
}
`%||%` <- function(a, b) if (is.null(a)) b else a

# ---------------------------------------------------------------------------- manual loglik
# Dense evaluation of the marginal (RE)ML log-likelihood from the definitions in the header:
#   V = sum_k Z_k (I (x) Psi_k) Z_k' + S R S,  S = diag(sigma * delta_stratum),
#   R block diagonal over the series: ar1 phi^|i-j| (positions in the sorted data),
#   car1 phi^|t_i - t_j|; beta profiled by GLS;
#   ML   = -1/2 [N log 2pi + log|V| + r'V^-1 r]
#   REML = -1/2 [(N-p) log 2pi + log|V| + log|X'V^-1 X| + r'V^-1 r]
structures <- function(cs) {
  d <- DATA[[cs$data]]
  mf <- model.frame(cs$fixed, d)
  X <- model.matrix(cs$fixed, d); y <- model.response(mf)
  key <- function(cols) do.call(paste, c(unname(d[cols]), sep = "\r"))
  re <- lapply(cs$re, function(r) {
    Z <- model.matrix(r$form, d); g <- key(r$cols)
    list(Z = Z, idx = split(seq_len(nrow(d)), factor(g, levels = unique(g))))
  })
  ser <- NULL
  if (!is.null(cs$cor)) {
    g <- key(cs$cor$group)
    idx <- split(seq_len(nrow(d)), factor(g, levels = unique(g)))
    ser <- lapply(idx, function(i) {
      stopifnot(!is.unsorted(d[[cs$cor$time]][i], strictly = TRUE))   # sorted, unique times
      lag <- if (cs$cor$type == "ar1") outer(seq_along(i), seq_along(i), "-")
             else outer(d[[cs$cor$time]][i], d[[cs$cor$time]][i], "-")
      list(i = i, lag = abs(lag))
    })
  }
  strat <- if (is.null(cs$varby)) NULL else as.character(d[[cs$varby]])
  list(X = X, y = y, re = re, ser = ser, strat = strat, N = nrow(d))
}
manual_ll <- function(st, Psi, sigma, phi, ratios, reml) {
  N <- st$N; V <- matrix(0, N, N)
  for (k in seq_along(st$re)) {
    Z <- st$re[[k]]$Z
    for (i in st$re[[k]]$idx) {
      Zi <- Z[i, , drop = FALSE]
      V[i, i] <- V[i, i] + Zi %*% Psi[[k]] %*% t(Zi)
    }
  }
  s <- rep(sigma, N); if (!is.null(st$strat)) s <- sigma * ratios[st$strat]
  if (is.null(st$ser)) diag(V) <- diag(V) + s^2 else
    for (b in st$ser) V[b$i, b$i] <- V[b$i, b$i] + outer(s[b$i], s[b$i]) * phi^b$lag
  L <- tryCatch(chol(V), error = function(e) NULL)
  if (is.null(L)) return(-Inf)
  Xs <- backsolve(L, st$X, transpose = TRUE); ys <- backsolve(L, st$y, transpose = TRUE)
  qx <- qr(Xs); r <- qr.resid(qx, ys)
  p <- ncol(st$X)
  ll <- -0.5 * ((N - if (reml) p else 0) * log(2 * pi) + 2 * sum(log(diag(L))) + sum(r^2))
  if (reml) ll <- ll - sum(log(abs(diag(qr.R(qx)))))
  ll
}
# unconstrained parametrisation for the re-maximisation check (log-Cholesky, or log sd for
# a diagonal block; log sigma; atanh(phi) for ar1, logit(phi) for car1; log ratios)
pack <- function(Psi, sigma, phi, ratios, type, diags) {
  c(unlist(mapply(function(P, dg) {
      if (dg) return(log(sqrt(diag(P))))
      L <- t(chol(P)); diag(L) <- log(diag(L)); L[lower.tri(L, diag = TRUE)] },
      Psi, diags, SIMPLIFY = FALSE)),
    log(sigma),
    if (!is.null(phi)) (if (type == "ar1") atanh(phi) else qlogis(phi)),
    if (!is.null(ratios)) log(ratios[-1]))
}
unpack <- function(x, dims, diags, type, has_phi, rnames) {
  pos <- 0; Psi <- list()
  for (k in seq_along(dims)) {
    q <- dims[k]
    if (diags[k]) {
      Psi[[k]] <- diag(exp(2 * x[pos + seq_len(q)]), q); pos <- pos + q
    } else {
      n <- q * (q + 1) / 2; L <- matrix(0, q, q)
      L[lower.tri(L, diag = TRUE)] <- x[pos + seq_len(n)]; diag(L) <- exp(diag(L))
      Psi[[k]] <- L %*% t(L); pos <- pos + n
    }
  }
  sigma <- exp(x[pos + 1]); pos <- pos + 1
  phi <- NULL
  if (has_phi) { phi <- if (type == "ar1") tanh(x[pos + 1]) else plogis(x[pos + 1]); pos <- pos + 1 }
  ratios <- NULL
  if (!is.null(rnames)) ratios <- setNames(c(1, exp(x[pos + seq_len(length(rnames) - 1)])), rnames)
  list(Psi = Psi, sigma = sigma, phi = phi, ratios = ratios)
}

# ---------------------------------------------------------------------------- results
nlme_parts <- function(fit, cs) {
  sig <- fit$sigma
  rs <- fit$modelStruct$reStruct                          # innermost level first
  nl <- rev(names(rs))                                    # outermost first, as cs$re
  Psi <- lapply(nl, function(k) as.matrix(rs[[k]]) * sig^2)
  phi <- if (is.null(cs$cor)) NULL else
    unname(coef(fit$modelStruct$corStruct, unconstrained = FALSE))
  ratios <- if (is.null(cs$varby)) NULL else
    coef(fit$modelStruct$varStruct, unconstrained = FALSE, allCoef = TRUE)
  list(Psi = Psi, sigma = sig, phi = phi, ratios = ratios)
}

varcorr_rows <- function(parts, cs) {
  d <- DATA[[cs$data]]
  nlev <- sapply(cs$re, function(r) length(unique(do.call(paste, unname(d[r$cols])))))
  ord <- order(-nlev)                                      # lme4: more levels first
  rows <- list()
  for (k in ord) {
    P <- parts$Psi[[k]]; nm <- colnames(model.matrix(cs$re[[k]]$form, d))
    # (x || g): lme4 names the separate terms g, g.1, g.2, ...
    gname <- function(i) if (cs$re[[k]]$diag && i > 1) sprintf("%s.%d", cs$re[[k]]$grp, i - 1)
                         else cs$re[[k]]$grp
    for (i in seq_along(nm)) rows[[length(rows) + 1]] <- list(grp = gname(i),
      var1 = nm[i], var2 = NULL, vcov = P[i, i], sdcor = sqrt(P[i, i]))
    if (length(nm) > 1 && !cs$re[[k]]$diag) for (i in 1:(length(nm) - 1)) for (j in (i + 1):length(nm))
      rows[[length(rows) + 1]] <- list(grp = cs$re[[k]]$grp, var1 = nm[i], var2 = nm[j],
        vcov = P[i, j], sdcor = P[i, j] / sqrt(P[i, i] * P[j, j]))
  }
  rows[[length(rows) + 1]] <- list(grp = "Residual", var1 = NULL, var2 = NULL,
                                   vcov = parts$sigma^2, sdcor = parts$sigma)
  rows
}

vc_lme4 <- function(m) {
  vc <- as.data.frame(VarCorr(m))
  lapply(seq_len(nrow(vc)), function(i) list(grp = vc$grp[i],
    var1 = if (is.na(vc$var1[i])) NULL else vc$var1[i],
    var2 = if (is.na(vc$var2[i])) NULL else vc$var2[i], vcov = vc$vcov[i]))
}
lme4_check <- function(cs, fits, vcs) {
  d <- DATA[[cs$data]]
  res <- list()
  for (reml in c(TRUE, FALSE)) {
    one <- function(opt, start = NULL) suppressMessages(suppressWarnings(lmer(
      as.formula(cs$formula), data = d, REML = reml, start = start,
      control = lmerControl(optimizer = opt, calc.derivs = FALSE,
                            optCtrl = if (opt == "bobyqa") list(rhoend = 1e-12, maxfun = 1e5)
                                      else list()))))
    m1 <- one("bobyqa"); m2 <- one("Nelder_Mead")
    m <- if (logLik(m2) > logLik(m1) + 1e-9) m2 else m1
    m <- one("bobyqa", list(theta = getME(m, "theta")))
    f <- fits[[if (reml) "reml" else "ml"]]
    key <- if (reml) "reml" else "ml"
    res[[key]] <- list(loglik = as.numeric(logLik(m)),
                       loglik_diff = as.numeric(logLik(f)) - as.numeric(logLik(m)),
                       fixed_max_abs_diff = max(abs(fixef(m) - fixef(f))),
                       se_max_rel_diff = max(abs(sqrt(diag(as.matrix(vcov(m)))) /
                                                 sqrt(diag(vcov(f))) - 1)),
                       sigma_rel_diff = sigma(m) / f$sigma - 1,
                       varcorr_same_layout = identical(
                         lapply(vc_lme4(m), function(r) r[c("grp", "var1", "var2")]),
                         lapply(vcs[[key]], function(r) r[c("grp", "var1", "var2")])),
                       varcorr_max_rel_diff = max(abs(sapply(vc_lme4(m), `[[`, "vcov") /
                                                  sapply(vcs[[key]], `[[`, "vcov") - 1)))
  }
  res
}

fit_case <- function(cs) {
  cat("case", cs$case, "\n")
  d <- DATA[[cs$data]]
  st <- structures(cs)
  ctype <- if (is.null(cs$cor)) "" else cs$cor$type
  res <- list(case = cs$case, data = paste0(cs$data, ".csv"), formula = cs$formula,
              correlation = if (is.null(cs$cor)) NULL else
                sprintf("%s(%s | %s)", cs$cor$type, cs$cor$time, paste(cs$cor$group, collapse = ":")),
              residual_variance_by = cs$varby %||% NULL,
              nlme_call = deparse1l(lme_call(cs, "REML")),
              nlme_call_ml = deparse1l(lme_call(cs, "ML")),
              nlme_control = "lmeControl(maxIter = 500, msMaxIter = 500, niterEM = 100, msMaxEval = 5000, tolerance = 1e-10, msTol = 1e-12, opt = <best of nlminb/optim>)",
              nlme_version = as.character(packageVersion("nlme")),
              r_version = R.version.string)
  if (is.null(res$residual_variance_by)) res["residual_variance_by"] <- list(NULL)
  if (is.null(res$correlation)) res["correlation"] <- list(NULL)
  fits <- list()
  for (method in c("REML", "ML")) {
    reml <- method == "REML"; key <- tolower(method)
    # independent likelihood at nlme's estimates, and re-maximisation from there
    diags <- sapply(cs$re, `[[`, "diag")
    remax <- function(fit) {
      parts <- nlme_parts(fit, cs)
      man <- manual_ll(st, parts$Psi, parts$sigma, parts$phi, parts$ratios, reml)
      dims <- sapply(parts$Psi, nrow)
      x0 <- pack(parts$Psi, parts$sigma, parts$phi, parts$ratios, ctype, diags)
      up <- function(x) unpack(x, dims, diags, ctype, !is.null(parts$phi), names(parts$ratios))
      obj <- function(x) { u <- up(x); -manual_ll(st, u$Psi, u$sigma, u$phi, u$ratios, reml) }
      op <- optim(x0, obj, method = "BFGS", control = list(reltol = 1e-15, maxit = 2000))
      list(parts = parts, man = man, gain = -op$value - man, u = up(op$par),
           step = max(abs(op$par - x0)))
    }
    s1 <- fit_starts(cs, method); fits_all <- s1$fits; info <- s1$info
    pk <- pick(fits_all); rm <- remax(pk$fit)
    if (rm$gain > 1e-7) {         # nlme stopped short: restart nlme where the check got to
      cat(sprintf("    %s %s: re-maximisation gains %.3g; refitting from there\n",
                  cs$case, method, rm$gain))
      s2 <- fit_starts(cs, method, rm$u)
      fits_all <- c(fits_all, s2$fits); info <- c(info, s2$info)
      pk <- pick(fits_all); rm <- remax(pk$fit)
    }
    fit <- pk$fit; fits[[key]] <- fit; fs <- list(best = pk$best, info = info, spread = pk$spread)
    ll <- logLik(fit)
    parts <- rm$parts; man <- rm$man; remax_gain <- rm$gain; remax_step <- rm$step
    fe <- fixef(fit); se <- sqrt(diag(vcov(fit)))
    fe_rows <- lapply(seq_along(fe), function(i) list(term = names(fe)[i],
                                                      estimate = unname(fe[i]), se = unname(se[i])))
    Q <- length(cs$re)
    re1 <- if (Q == 1) ranef(fit) else ranef(fit, level = 1)
    lev <- head(radix_levels(d[[cs$re[[1]]$cols]]), 5)
    rh <- lapply(lev, function(l) list(level = l, values = I(unname(as.numeric(re1[l, ])))))
    ratios <- if (is.null(parts$ratios)) NULL else as.list(parts$ratios)
    if (!is.null(ratios)) {
      stopifnot(names(ratios)[1] == levels(d[[cs$varby]])[1], ratios[[1]] == 1)
      ratios <- ratios[levels(d[[cs$varby]])]
    }
    r <- list(loglik = as.numeric(ll), aic = AIC(fit), bic = BIC(fit),
              df = attr(ll, "df"), nobs = fit$dims$N, bic_nobs = attr(ll, "nobs"),
              fixed = fe_rows, sigma = fit$sigma, phi = parts$phi,
              variance_ratios = ratios, varcorr = varcorr_rows(parts, cs),
              fitted_head = unname(head(fitted(fit, level = Q), 20)),
              ranef_head = rh,
              ngroups = as.list(setNames(sapply(cs$re, function(r)
                length(unique(do.call(paste, unname(d[r$cols]))))), sapply(cs$re, `[[`, "grp"))),
              optimizer = fs$best, start_fits = fs$info, start_loglik_spread = fs$spread,
              manual_loglik = man, manual_loglik_diff = man - as.numeric(ll),
              remax_gain = remax_gain, remax_max_param_change = remax_step)
    for (k in c("phi", "variance_ratios")) if (is.null(r[[k]])) r[k] <- list(NULL)
    res[[key]] <- r
    cat(sprintf("  %-4s logLik %.8f  phi %s  ratios %s  [%s; spread %.2g; manual diff %.2g; remax gain %.2g, step %.2g]\n",
                method, as.numeric(ll), if (is.null(parts$phi)) "-" else sprintf("%.6f", parts$phi),
                if (is.null(parts$ratios)) "-" else paste(sprintf("%.5f", parts$ratios), collapse = ","),
                fs$best, fs$spread, man - as.numeric(ll), remax_gain, remax_step))
  }
  if (is.null(cs$cor) && is.null(cs$varby)) {
    res$lme4_check <- lme4_check(cs, fits, list(reml = res$reml$varcorr, ml = res$ml$varcorr))
    cat(sprintf("  lme4 logLik diff REML %.3g ML %.3g; fixed max abs diff %.3g %.3g; varcorr layout %s %s, max rel diff %.3g %.3g\n",
                res$lme4_check$reml$loglik_diff, res$lme4_check$ml$loglik_diff,
                res$lme4_check$reml$fixed_max_abs_diff, res$lme4_check$ml$fixed_max_abs_diff,
                res$lme4_check$reml$varcorr_same_layout, res$lme4_check$ml$varcorr_same_layout,
                res$lme4_check$reml$varcorr_max_rel_diff, res$lme4_check$ml$varcorr_max_rel_diff))
  }
  write_json(res, file.path(out, paste0(cs$case, ".json")), auto_unbox = TRUE, digits = NA,
             pretty = TRUE, null = "null")
  res
}

summary_rows <- list()
for (cs in cases) if (is.null(only) || cs$case %in% only) {
  r <- tryCatch(fit_case(cs), error = function(e) { cat("FAIL", cs$case, conditionMessage(e), "\n"); NULL })
  if (!is.null(r)) summary_rows[[cs$case]] <- r
}

cat("\nSummary\n")
for (r in summary_rows) cat(sprintf("%-26s REML %.6f ML %.6f phi %s / %s\n", r$case,
  r$reml$loglik, r$ml$loglik, format(r$reml$phi %||% NA, digits = 6), format(r$ml$phi %||% NA, digits = 6)))

# ---------------------------------------------------------------------------- parquet
# CSV -> Parquet: factor columns as strings, everything else inferred.
py <- Sys.getenv("PYTHON", ".venv/bin/python")
conv <- '
import sys, json, pathlib, pyarrow as pa, pyarrow.csv as pc, pyarrow.parquet as pq
out = pathlib.Path(sys.argv[1]); facs = json.loads(sys.argv[2])
for name, cols in sorted(facs.items()):
    f = out / (name + ".csv")
    t = pc.read_csv(f, convert_options=pc.ConvertOptions(
        column_types={c: pa.string() for c in cols}, null_values=["NA"],
        strings_can_be_null=True, quoted_strings_can_be_null=False))  # R: NA unquoted
    pq.write_table(t, out / (name + ".parquet"))
    print("wrote", name, t.num_rows, "rows", dict(zip(t.schema.names, map(str, t.schema.types))))
'
facjson <- as.character(toJSON(lapply(FACTORS, I)))
# R prepends its own library dirs to LD_LIBRARY_PATH, which can shadow the libpython of a
# non-system Python; run the converter without them.
stopifnot(system2("env", c("-u", "LD_LIBRARY_PATH", py, "-c", shQuote(conv), out,
                           shQuote(facjson))) == 0)

# the Parquet numbers must be bit-identical to the numbers R fitted on
chk <- '
import sys, json, pathlib, pyarrow.parquet as pq
out = pathlib.Path(sys.argv[1]); ref = json.load(open(sys.argv[2]))
bad = 0
for name, cols in ref.items():
    t = pq.read_table(out / (name + ".parquet")).to_pydict()
    for c, hexes in cols.items():
        got = t[c]
        if isinstance(hexes, list) and hexes and isinstance(hexes[0], str) and hexes[0].startswith(("0x", "-0x")):
            exp = [float.fromhex(h) for h in hexes]
            bad += sum(float(a) != b for a, b in zip(got, exp)) + (len(got) != len(exp))
        else:
            bad += sum(a != b for a, b in zip(got, hexes)) + (len(got) != len(hexes))
print("parquet round-trip mismatches:", bad); sys.exit(1 if bad else 0)
'
hexref <- lapply(DATA, function(d) lapply(d, function(x)
  if (is.numeric(x)) sprintf("%a", as.numeric(x)) else as.character(x)))
hf <- tempfile(fileext = ".json"); write_json(hexref, hf)
stopifnot(system2("env", c("-u", "LD_LIBRARY_PATH", py, "-c", shQuote(chk), out, hf)) == 0)
