"""Write the README's benchmark table from a bench run, so figures and targets never drift apart.

``python bench/readme_table.py`` runs every bench with ``--json`` and rewrites the block between
``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->`` in README.md. ``--from-json FILE`` (repeatable;
a file holds one bench's JSON object, named by ``bench`` = its path) reuses saved runs instead. Exits non-zero
when a bench failed to run; a missed target is shown in the table, not hidden. Every bench's full JSON is saved in
``.fedge/bench/last/<bench>.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._targets import BENCHES  # noqa: E402

START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 1 else f"{value:,.1f}"
    return str(value)


def render(runs: dict[str, dict[str, Any]]) -> str:
    lines = ["| benchmark | figure | what | latest | target | met |", "|---|---|---|---|---|---|"]
    for bench, targets in BENCHES.items():
        figures = runs.get(bench, {})
        for i, t in enumerate(targets):
            value = figures.get(t.figure)
            met = "—" if value is None else ("yes" if t.met(float(value)) else "**no**")
            lines.append(f"| {f'`{bench}`' if i == 0 else ''} | `{t.figure}` | {t.what} | "
                         f"{'not run' if value is None else _fmt(value)} | {t.text()} | {met} |")
    lines.append("")
    for bench in BENCHES:
        m = runs.get(bench, {}).get("measured")
        if m:
            lines.append(f"`{bench}`: {m['date']}, commit {m['commit']}, {m['machine']}, {m['cpus']} cores, "
                         f"Python {m['python']}; no accelerator. ")
    lines.append("Ratios against microsecond-scale baselines move by tens of percent between runs on a shared VM.")
    return "\n".join(lines)


def run_bench(bench: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(ROOT / bench), "--json"], capture_output=True, text=True, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise SystemExit(f"{bench} printed nothing (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def rewrite(readme: Path, table: str) -> None:
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table}\n{END}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--from-json", action="append", default=[], metavar="FILE",
                   help="a saved bench result (JSON object with a 'bench' key) instead of running that bench")
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    args = p.parse_args(argv)
    runs: dict[str, dict[str, Any]] = {}
    for file in args.from_json:
        obj = json.loads(Path(file).read_text())
        runs[obj["bench"]] = obj
    for bench in BENCHES:
        if bench not in runs:
            print(f"running {bench} ...", file=sys.stderr, flush=True)
            runs[bench] = run_bench(bench)
    saved = ROOT / ".fedge" / "bench" / "last"  # every figure of the run, not only the table's
    saved.mkdir(parents=True, exist_ok=True)
    for bench, run in runs.items():
        (saved / f"{Path(bench).stem}.json").write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
    rewrite(Path(args.readme), render(runs))
    missed = [f for r in runs.values() for f in r.get("missed", [])]
    print(f"README table written; missed targets: {', '.join(missed) or 'none'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
