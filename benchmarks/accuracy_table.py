"""Every lme4 reference in tests/data against mlpipe: the criterion (REML criterion or ML
deviance) of both, REML and ML, and their relative difference (negative: mlpipe lower).

    .venv/bin/python benchmarks/accuracy_table.py [--skip-slow]     (markdown on stdout)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
SLOW = {"insteval_crossed", "insteval_nested_crossed"}


def cases():
    core = {"dyestuff": "dyestuff", "sleepstudy": "sleepstudy", "hsb82": "hsb82",
            "oxboys": "oxboys", "pastes": "pastes", "penicillin": "penicillin"}
    for p in sorted((DATA / "lme4").glob("*.json")):
        ref = json.loads(p.read_text())
        if "reml" in ref and "formula" in ref:
            yield "lme4", p.stem, DATA / f"{core.get(ref['data'], ref['data'])}.parquet", ref
    for suite in ("extra", "boundary", "multilevel"):
        for p in sorted((DATA / suite).glob("*.json")):
            ref = json.loads(p.read_text())
            yield suite, p.stem, DATA / suite / f"{ref['data']}.parquet", ref


def main() -> None:
    sys.path.insert(0, str(ROOT))
    import mlpipe

    skip = "--skip-slow" in sys.argv
    print("| suite | case | method | lme4 | mlpipe | relative difference |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for suite, case, data, ref in cases():
        if skip and case in SLOW:
            continue
        for method in ("REML", "ML"):
            res = mlpipe.fit(data, ref["formula"], method=method, ddf=None)
            want = ref[method.lower()]["deviance_or_reml"]
            rel = (res.deviance - want) / abs(want)
            worst = max(worst, rel)
            print(f"| {suite} | {case} | {method} | {want:.6f} | {res.deviance:.6f} | "
                  f"{rel:.1e} |", flush=True)
    print(f"\nlargest (mlpipe − lme4)/lme4: {worst:.1e}")


if __name__ == "__main__":
    main()
