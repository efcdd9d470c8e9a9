"""Gather finished cells into the layout of the paper's Table N, the paper's numbers beside ours.

    python scripts/make_tables.py --table 1                 # results/tables/table1.md + .csv
    python scripts/make_tables.py --table 2 --plot          # + table2.png (avg score vs TFLOPs)
    python scripts/make_tables.py --table all --results-dir /path/to/results --out /tmp/tables

Rows are the cells of configs/sweep/tableN.yaml; cells without results are marked, not dropped.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sharp.harness import tables as T  # noqa: E402
from sharp.harness.io import atomic_write_text  # noqa: E402
from sharp.harness.resources import HarnessError  # noqa: E402
from sharp.figures import curves, tables as table_figures  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", required=True, help="1..5 or all")
    ap.add_argument("--results-dir", default="results", help="results root (default: results)")
    ap.add_argument("--out", default=None, help="output folder (default: <results-dir>/tables)")
    ap.add_argument("--plot", action="store_true", help="also write tableN.png: average score vs TFLOPs per method")
    ap.add_argument("--quiet", action="store_true", help="do not print the Markdown")
    args = ap.parse_args(argv)
    try:
        tables = list(T.LAYOUTS) if args.table == "all" else [int(args.table)]
    except ValueError:
        print(f"error: --table {args.table!r}: accepted values: 1..5, all", file=sys.stderr)
        return 2
    if not os.path.isdir(args.results_dir):
        print(f"error: --results-dir {args.results_dir!r} is not a folder; accepted values: an existing results "
              "folder (the results_dir of run.py / sweep.py, default: results)", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.results_dir, "tables")
    for n in tables:
        try:
            sweep, rows = T.build(n, args.results_dir)
        except HarnessError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        md = T.to_markdown(n, sweep, rows, args.results_dir)
        atomic_write_text(os.path.join(out, f"table{n}.md"), md)
        atomic_write_text(os.path.join(out, f"table{n}.csv"), T.to_csv(n, rows))
        written = [f"table{n}.md", f"table{n}.csv"]
        if args.plot:
            table_figures.plot_table(n, rows, os.path.join(out, f"table{n}.png"))
            written.append(f"table{n}.png")
        if not args.quiet:
            print(md)
        print(f"wrote {', '.join(os.path.join(out, w) for w in written)}", file=sys.stderr)
    if args.plot:  # the toy retention curves (results/retention_curve/<backbone>/), every method
        print(f"wrote {', '.join(map(str, curves.plot_retention_curves(args.results_dir, out)))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
