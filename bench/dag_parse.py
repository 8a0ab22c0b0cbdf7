"""Parse time of each DAG file against a plain six-task TaskFlow DAG (bench/fixtures/plain_dag.py).

What the dag-processor pays per file: Airflow itself is already imported, so every sample is a
fresh interpreter that imports ``airflow.sdk`` first (plugins/ and dags/ on sys.path, as Airflow
puts them there) and then times executing the DAG file as a module, the way the DagBag loads it.
Samples are interleaved across the files (the order rotates every round) so machine noise hits
all of them alike; one warm-up round is discarded. Reports the wall-clock median (the target),
its interquartile range and ratio to the plain DAG's, the same for CPU time (less sensitive to a
busy machine), and which modules each file imports that the plain DAG does not. Needs no
running stack.

Two modes, because the bytecode cache changes what an import costs:
  cached   - .pyc files are written and reused (a normal install; the warm-up round fills a
             private cache under the temp dir, PYTHONPYCACHEPREFIX, so neither the tree nor
             .venv is written to). This is what the target is about.
  compile  - no .pyc at all: every module is compiled from source on every parse, as happens
             with PYTHONDONTWRITEBYTECODE=1 and no cache on disk (this machine's .venv).

    python bench/dag_parse.py                  # both modes + bench/results/dag_parse.json
    python bench/dag_parse.py --modes cached   # one mode
    python bench/dag_parse.py --as-before      # same, stored under "before" in the json
    python bench/dag_parse.py --importtime dags/train_model.py   # the slowest imports of one file
    python bench/dag_parse.py --what-if-no-params   # also: cached, with Airflow's Params work off

--what-if-no-params measures what is left once Airflow's own handling of DAG Params is taken out
(ParamsDict.validate, which a scheduled DAG runs at parse: a jsonschema check of every Param;
and the deep copy of the DAG's Params at every operator __init__ level): what the target would
look like if that cost, which no DAG file can avoid without dropping Params, were not there.

Target (issue tracker): every DAG file's median <= 1.5x the plain DAG's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLAIN = REPO / "bench" / "fixtures" / "plain_dag.py"
FILES = [PLAIN, *sorted(p for p in (REPO / "dags").glob("*.py") if not p.name.startswith("_"))]
TARGET = 1.5
MARK = "--slurmflow-bench-sdk-imported--"
MODES = ("cached", "compile")
PYCACHE = Path(tempfile.gettempdir()) / "slurmflow-dag-parse-pycache"

#: --what-if-no-params: no jsonschema validation at parse, a shallow copy per operator
NO_PARAMS_WORK = """\
from airflow.sdk.definitions.param import ParamsDict
ParamsDict.validate = lambda self: {}
ParamsDict.__deepcopy__ = lambda self, memo: ParamsDict.__copy__(self)
"""

PROBE = """\
import importlib.util, json, sys, time
sys.path[:0] = {paths!r}
import airflow.sdk
{prelude}
sys.stderr.write({mark!r} + "\\n"); sys.stderr.flush()
before = set(sys.modules)
spec = importlib.util.spec_from_file_location("unusual_prefix_bench_" + {stem!r}, {path!r})
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
t, c = time.perf_counter(), time.process_time()
spec.loader.exec_module(module)
dt, dc = time.perf_counter() - t, time.process_time() - c
new = sorted(set(sys.modules) - before - {{spec.name}})
print(json.dumps({{"seconds": dt, "cpu_seconds": dc, "modules": new}}))
"""


def probe_env(mode: str) -> dict[str, str]:
    env = dict(os.environ)
    if mode == "cached":
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(PYCACHE / "cached")
    else:  # an empty prefix that is never written: any __pycache__ on disk is not found either
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["PYTHONPYCACHEPREFIX"] = str(PYCACHE / "none")
    return env


def probe(path: Path, mode: str, importtime: bool = False, prelude: str = "") -> subprocess.CompletedProcess:
    code = PROBE.format(paths=[str(REPO / "plugins"), str(REPO / "dags")], mark=MARK, prelude=prelude,
                        stem=path.stem, path=str(path))
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-c", code]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=probe_env(mode))
    if out.returncode != 0:
        raise RuntimeError(f"{path.name}: probe failed\n{out.stderr[-3000:]}")
    return out


def sample(path: Path, mode: str, prelude: str = "") -> dict:
    return json.loads(probe(path, mode, prelude=prelude).stdout.strip().splitlines()[-1])


def importtime_report(path: Path, mode: str, top: int) -> None:
    """The imports one file triggers after airflow.sdk, slowest (cumulative) first."""
    if mode == "cached":
        probe(path, mode)  # fill the cache first
    lines = probe(path, mode, importtime=True).stderr.splitlines()
    lines = lines[lines.index(MARK) + 1:]
    rows = []
    for line in lines:
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            self_us, cum_us, name = line.removeprefix("import time:").split("|", 2)
            rows.append((int(cum_us), int(self_us), name.rstrip()))
    total_self = sum(r[1] for r in rows)
    print(f"{path.relative_to(REPO)} ({mode}): {len(rows)} modules imported after airflow.sdk, "
          f"{total_self / 1000:.0f} ms of import time (sum of self)")
    print(f"{'cumulative':>11}{'self':>9}  module  (ms)")
    for cum, self_us, name in sorted(rows, reverse=True)[:top]:
        print(f"{cum / 1000:>11.1f}{self_us / 1000:>9.1f}  {name}")


def measure(samples: int, mode: str, prelude: str = "") -> dict:
    wall: dict[str, list[float]] = {p.name: [] for p in FILES}
    cpu: dict[str, list[float]] = {p.name: [] for p in FILES}
    modules: dict[str, list[str]] = {}
    for p in FILES:  # warm-up: bytecode cache (cached mode), page cache; discarded
        modules[p.name] = sample(p, mode, prelude)["modules"]
    for i in range(samples):
        order = FILES[i % len(FILES):] + FILES[:i % len(FILES)]
        for p in order:
            s = sample(p, mode, prelude)
            wall[p.name].append(s["seconds"] * 1000)
            cpu[p.name].append(s["cpu_seconds"] * 1000)
    plain, plain_cpu = statistics.median(wall[PLAIN.name]), statistics.median(cpu[PLAIN.name])
    files = {}
    for p in FILES:
        ms = wall[p.name]
        q = statistics.quantiles(ms, n=4)
        med, med_cpu = statistics.median(ms), statistics.median(cpu[p.name])
        extra = sorted(set(modules[p.name]) - set(modules[PLAIN.name]))
        files[p.name] = {
            "path": str(p.relative_to(REPO)), "median_ms": round(med, 1), "p25_ms": round(q[0], 1),
            "p75_ms": round(q[2], 1), "ratio_to_plain": round(med / plain, 2),
            "cpu_median_ms": round(med_cpu, 1), "cpu_ratio_to_plain": round(med_cpu / plain_cpu, 2),
            "modules_imported": len(modules[p.name]),
            "slurmflow_modules": [m for m in extra if m.split(".")[0] == "slurmflow"],
            "other_extra_modules": [m for m in extra if m.split(".")[0] != "slurmflow"],
            "samples_ms": [round(x, 1) for x in ms],
        }
    return {"files": files, "meets_target": all(f["ratio_to_plain"] <= TARGET for f in files.values())}


def print_table(mode: str, result: dict, samples: int) -> None:
    print(f"Parse time after `import airflow.sdk`, fresh process, {mode}, {samples} samples each:")
    print(f"{'file':<22}{'median':>9}{'p25':>8}{'p75':>8}{'ratio':>7}{'cpu':>8}{'ratio':>7}{'modules':>9}"
          f"{'ours':>6}  other modules the plain DAG does not import")
    for name, f in result["files"].items():
        extra = ", ".join(f["other_extra_modules"]) or "-"
        print(f"{name:<22}{f['median_ms']:>9.1f}{f['p25_ms']:>8.1f}{f['p75_ms']:>8.1f}{f['ratio_to_plain']:>6.2f}x"
              f"{f['cpu_median_ms']:>8.1f}{f['cpu_ratio_to_plain']:>6.2f}x{f['modules_imported']:>9}"
              f"{len(f['slurmflow_modules']):>6}  {extra}")
    print(f"(ms, wall and CPU medians; ratio = median / plain_dag.py's; modules = imported by the file, ours ="
          f" slurmflow.*; target <= {TARGET}x wall: {'met' if result['meets_target'] else 'NOT met'})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=15, help="samples per file (default 15)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated: cached, compile (default both)")
    ap.add_argument("--as-before", action="store_true", help='store the figures under "before" in the json')
    ap.add_argument("--what-if-no-params", action="store_true",
                    help="also measure (cached) with Airflow's Params validation and deep copies off")
    ap.add_argument("--importtime", type=Path, metavar="DAG_FILE", help="show the slowest imports of one file")
    ap.add_argument("--top", type=int, default=30, help="rows of --importtime output")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.samples < 2 or not modes or set(modes) - set(MODES):
        ap.error("--samples must be at least 2 and --modes a list of cached, compile")
    if args.importtime:
        importtime_report(args.importtime.resolve(), modes[0], args.top)
        return 0
    result = {"samples_per_file": args.samples, "target_ratio": TARGET, "python": platform.python_version(),
              "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(), "modes": {}}
    for mode in modes:
        result["modes"][mode] = measure(args.samples, mode)
        print_table(f"{mode} bytecode", result["modes"][mode], args.samples)
        print()
    result["meets_target"] = all(m["meets_target"] for m in result["modes"].values())
    result["load_average_at_end"] = os.getloadavg()
    if args.what_if_no_params:
        result["what_if_no_params"] = measure(args.samples, "cached", NO_PARAMS_WORK)
        print_table("cached bytecode, WHAT IF Airflow did no Params work", result["what_if_no_params"],
                    args.samples)
        print()
    out = REPO / "bench" / "results" / "dag_parse.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    if args.as_before:
        data = {**previous, "before": result}
    else:
        data = {**result, **({"before": previous["before"]} if "before" in previous else {})}
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")
    return 0 if result["meets_target"] or args.as_before else 1


if __name__ == "__main__":
    sys.exit(main())
