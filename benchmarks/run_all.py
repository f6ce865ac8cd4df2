"""Run every `benchmarks/bench_*.py` and print one table of the ratios they measure.

    python benchmarks/run_all.py [--quick] [--only loader compile] [--device cpu|cuda] [--timeout 900] [--logs DIR]

Each script runs in its own subprocess (a fresh interpreter: one benchmark's threads, compiled graphs or
allocator state cannot skew the next). `--quick` is passed to the scripts whose `--help` offers it,
`--device` to those that take it. The full output of each goes to `<logs>/<name>.log`; the table collects
every line that reports a ratio or a speedup ("ratio ... = 1.02", "speedup ... = 1.31x", "... 0.95x"),
so a script adds a row by printing such a line — there is nothing to register here.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# A ratio: "... = 1.234" / "... = 1.23x" on a line that names a ratio or speedup, or a "1.23x" column value.
_NAMED = re.compile(r"(ratio|speedup)[^=\n]*=\s*([0-9]*\.?[0-9]+)\s*x?", re.IGNORECASE)
_COLUMN = re.compile(r"(?<![\w.])([0-9]*\.[0-9]+)x\b")


def extract_ratios(output: str) -> list[tuple[str, float]]:
    """(label, value) for every ratio reported in a benchmark's stdout, in order of appearance."""
    rows = []
    for line in output.splitlines():
        text = line.strip()
        m = _NAMED.search(text)
        if m:
            rows.append((text[: m.start(2)].rstrip(" =:"), float(m.group(2))))
            continue
        cols = _COLUMN.findall(text)
        if cols:
            label = _COLUMN.split(text)[0].strip()
            rows.append((re.sub(r"\s{2,}", " ", label), float(cols[-1])))
    return rows


def _help(script: Path) -> str:
    try:
        return subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                              timeout=120).stdout
    except subprocess.TimeoutExpired:
        return ""


def run_one(script: Path, quick: bool, device: str | None, timeout: float, logs: Path) -> dict:
    help_text = _help(script)
    cmd = [sys.executable, str(script)]
    if quick and "--quick" in help_text:
        cmd.append("--quick")
    if device and "--device" in help_text:
        cmd += ["--device", device]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
        rc, out = proc.returncode, proc.stdout + ("\n" + proc.stderr if proc.returncode else "")
    except subprocess.TimeoutExpired as e:
        rc, out = "timeout", (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    seconds = time.perf_counter() - t0
    (logs / f"{script.stem}.log").write_text(f"$ {' '.join(cmd)}\n{out}")
    return {"name": script.stem.removeprefix("bench_"), "rc": rc, "seconds": seconds, "ratios": extract_ratios(out),
            "command": " ".join(cmd)}


def format_table(results: list[dict]) -> str:
    lines = [f"{'benchmark':<16}{'ratio':>9}  what", "-" * 78]
    for r in results:
        status = "" if r["rc"] == 0 else f"  [FAILED rc={r['rc']}, see log]"
        if not r["ratios"]:
            lines.append(f"{r['name']:<16}{'-':>9}  (no ratio printed){status}")
        for i, (label, value) in enumerate(r["ratios"]):
            lines.append(f"{r['name'] if i == 0 else '':<16}{value:>8.3f}x  {label}{status if i == 0 else ''}")
    lines.append("-" * 78)
    lines.append("  ".join(f"{r['name']} {r['seconds']:.0f}s" for r in results))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="pass --quick to the benchmarks that have it")
    p.add_argument("--only", nargs="*", default=None, help="benchmark names (e.g. loader compile); default all")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="passed to benchmarks taking --device")
    p.add_argument("--timeout", type=float, default=900, help="seconds per benchmark (default 900)")
    p.add_argument("--logs", type=Path, default=Path("outputs/benchmarks"), help="where each full log goes")
    p.add_argument("--dir", type=Path, default=HERE, help=argparse.SUPPRESS)  # tests point this elsewhere
    a = p.parse_args(argv)
    scripts = sorted(a.dir.glob("bench_*.py"))
    if a.only:
        unknown = set(a.only) - {s.stem.removeprefix("bench_") for s in scripts}
        if unknown:
            p.error(f"--only: no benchmark named {sorted(unknown)}; have "
                    f"{[s.stem.removeprefix('bench_') for s in scripts]}")
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in a.only]
    a.logs.mkdir(parents=True, exist_ok=True)
    results = []
    for s in scripts:
        print(f"running {s.name} ...", flush=True)
        results.append(run_one(s, a.quick, a.device, a.timeout, a.logs))
    print("\n" + format_table(results))
    print(f"\nfull logs: {a.logs}/")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
