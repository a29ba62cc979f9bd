#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Plots the CSV of examples/02_moe_balance (MaxVio_batch per step, with and without the
auxiliary-loss-free bias update) into docs/img/moe_balance.png.

    build/release/example_moe_balance moe_balance.csv 1000
    python3 scripts/plot_moe_balance.py moe_balance.csv docs/img/moe_balance.png

Needs Debian's python3-matplotlib.
"""

import argparse
import csv

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", nargs="?", default="moe_balance.csv")
    parser.add_argument("png", nargs="?", default="docs/img/moe_balance.png")
    args = parser.parse_args()

    steps, with_update, without, bias_min, bias_max = [], [], [], [], []
    with open(args.csv, encoding="utf-8") as source:
        for row in csv.DictReader(source):
            steps.append(int(row["step"]))
            with_update.append(float(row["maxvio_batch_with_update"]))
            without.append(float(row["maxvio_batch_without_update"]))
            bias_min.append(float(row["bias_min"]))
            bias_max.append(float(row["bias_max"]))

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
    top.plot(steps, without, color="tab:red", linewidth=1, label="no bias update")
    top.plot(steps, with_update, color="tab:blue", linewidth=1,
             label="sign rule, $\\gamma$ = 0.001")
    top.axhline(0.1, color="gray", linestyle="--", linewidth=0.8, label="MaxVio = 0.1")
    top.set_yscale("log")
    top.set_ylabel("MaxVio (batch)")
    top.set_title("Auxiliary-loss-free balancing of a skewed router\n"
                  "32 experts, 4 groups / 2, top-4, 8,192 tokens a step")
    top.legend(loc="center right")
    top.grid(True, which="both", linewidth=0.3)

    bottom.fill_between(steps, bias_min, bias_max, color="tab:blue", alpha=0.3)
    bottom.set_ylabel("selection bias\n(min to max)")
    bottom.set_xlabel("step")
    bottom.grid(True, linewidth=0.3)

    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
