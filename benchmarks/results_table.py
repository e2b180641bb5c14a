"""A Markdown table from the report.json of several ``lowrank-kit compress`` output folders.

    .venv/bin/python benchmarks/results_table.py runs/*/ [--wall LOGDIR]

Rows are sorted by target ratio, then perplexity. Every figure comes from the reports.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args()
    rows = []
    for folder in args.folders:
        rep = json.loads((folder / "report.json").read_text())
        ppl = rep["evaluation"][0] if rep["evaluation"] else {}
        rows.append({
            "name": rep["name"], "allocate": rep["strategies"]["allocate"],
            "transform": "+".join(rep["strategies"]["transform"]), "target": rep["target_ratio"],
            "achieved": rep["achieved_ratio"], "dense": ppl.get("dense"), "ppl": ppl.get("compressed"),
            "score_s": rep["timings_s"].get("score", 0.0), "compress_s": rep["timings_s"]["compress"],
            "rss": rep["peak_rss_mb"],
        })
    rows.sort(key=lambda r: (r["target"], r["ppl"] if r["ppl"] is not None else float("inf")))
    print("| recipe | transform | allocate | target | achieved | perplexity | score (s) | compress (s) "
          "| peak RSS (MB) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ppl = f"{r['ppl']:,.2f}" if r["ppl"] is not None else "–"
        print(f"| {r['name']} | {r['transform']} | {r['allocate']} | {r['target']:g} | {r['achieved']:.4f} | {ppl} | "
              f"{r['score_s']:.0f} | {r['compress_s']:.0f} | {r['rss']:,.0f} |")
    dense = {r["dense"] for r in rows if r["dense"] is not None}
    if len(dense) == 1:
        print(f"\nDense perplexity: {dense.pop():.2f}")


if __name__ == "__main__":
    main()
