"""Turn pytest-benchmark JSON files into one markdown table per benchmark group.

    python benchmarks/to_markdown.py results/*.json --title "..."

Each row shows the median time and the ratio to the fastest row of its group (ratios measured in
one run are what this project reports; absolute times on a shared machine are noisy).
"""
import argparse
import json
from collections import defaultdict


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("files", nargs="+")
    parser.add_argument("--title", default="Benchmarks")
    args = parser.parse_args()
    groups = defaultdict(list)
    machine = None
    for path in args.files:
        with open(path) as f:
            data = json.load(f)
        machine = machine or data.get("machine_info", {})
        for b in data["benchmarks"]:
            groups[b.get("group") or b["name"].split("[")[0]].append(b)
    print(f"## {args.title}\n")
    if machine:
        print(f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, python {machine.get('python_version', '?')}\n")
    for group, rows in groups.items():
        rows.sort(key=lambda b: b["stats"]["median"])
        fastest = rows[0]["stats"]["median"]
        print(f"### {group}\n")
        print("| benchmark | median (ms) | ratio to fastest | extra |")
        print("|---|---:|---:|---|")
        for b in rows:
            extra = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in b.get("extra_info", {}).items())
            print(f"| {b['name']} | {b['stats']['median'] * 1e3:.2f} | {b['stats']['median'] / fastest:.2f} | {extra} |")
        print()


if __name__ == "__main__":
    main()
