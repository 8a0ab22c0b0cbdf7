"""Benchmark of the content-addressed training image, on the local stack (``make up``).

    .venv/bin/python bench/image_build.py [--repeat 5] [--cold-push] [--skip-cold]

Measures, with the real dockerd and registry:

* unchanged content: ``ensure_image`` when the registry already has the tag (hash + HEAD, no
  build); a fresh hook each time in a warm interpreter (an Airflow task's situation), plus one
  cold process (interpreter start and imports included). Target: < 2 s.
* code-only change: a private copy of the context with one training file edited: build (cached
  layers up to the code) and push (only the new layers travel).
* cold build: the same, ignoring the layer cache (``nocache``); pushed only with ``--cold-push``
  (it adds ~1.4 GB of blobs to the registry each run).

Prints a table and writes bench/results/image.json (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

from slurmflow.hooks.image import ImageBuildHook  # noqa: E402
from slurmflow.images import DEFAULT_EXCLUDES, BuildContext  # noqa: E402

CONN_ID = "registry_bench"
REPOSITORY = "slurmflow/training"
BENCH_REPOSITORY = "slurmflow/training-bench"  # code-change and cold images: kept off the real repo


def stack_env() -> dict[str, str]:
    path = Path(os.environ.get("SLURMFLOW_STACK_DIR", REPO / ".stack")) / "stack.env"
    if not path.exists():
        sys.exit(f"{path} not found: start the local stack with `make up` first")
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and line[0] != "#")
    return {k.strip(): v.strip() for k, v in pairs}


def copy_context(dst: Path) -> BuildContext:
    ignore = shutil.ignore_patterns(*DEFAULT_EXCLUDES)
    shutil.copytree(REPO / "training", dst / "training", ignore=ignore)
    (dst / "docker").mkdir()
    for name in ("training.Dockerfile", "requirements.lock"):
        shutil.copy2(REPO / "docker" / name, dst / "docker" / name)
    shutil.copytree(REPO / "wheelhouse", dst / "wheelhouse", copy_function=os.link)
    return BuildContext(dst)


def edit_code(context: BuildContext, marker: str) -> None:
    init = context.root / "training" / "src" / "hpctrain" / "__init__.py"
    init.write_text(init.read_text() + f"\n# bench {marker} {time.time_ns()}\n")


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - started, value


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5, help="runs of the unchanged-content path")
    parser.add_argument("--cold-push", action="store_true", help="also push the cold build")
    parser.add_argument("--skip-cold", action="store_true", help="skip the cold build")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    env = stack_env()
    os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = json.dumps(
        {"conn_type": "docker", "host": env["REGISTRY"], "login": env["REGISTRY_USER"],
         "password": env["REGISTRY_PASSWORD"]}
    )  # fmt: skip
    if not any((REPO / "wheelhouse").glob("torch-*.whl")):
        subprocess.run([str(REPO / "scripts" / "wheelhouse.sh")], check=True)
    base = env["BASE_IMAGE"]
    results: dict[str, object] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "note": "cores shared"},
    }

    # Make sure the working tree's image is in the registry, so the next calls take the skip path.
    baseline = ImageBuildHook(CONN_ID).ensure_image(BuildContext(REPO), REPOSITORY, base)
    results["baseline"] = {"built": baseline.built, "seconds": baseline.seconds, "image": baseline.image}

    # 1. unchanged content
    runs = []
    for _ in range(args.repeat):
        seconds, result = timed(ImageBuildHook(CONN_ID).ensure_image, BuildContext(REPO), REPOSITORY, base)
        assert not result.built and not result.pushed and result.digest == baseline.digest
        runs.append(seconds)
    code = (
        "import sys, time; sys.path.insert(0, 'plugins');"
        "from slurmflow.hooks.image import ImageBuildHook; from slurmflow.images import BuildContext;"
        "t = time.perf_counter();"
        f"r = ImageBuildHook({CONN_ID!r}).ensure_image(BuildContext('.'), {REPOSITORY!r}, {base!r});"
        "assert not r.built; print(time.perf_counter() - t)"
    )
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    cold_process = time.perf_counter() - started
    results["unchanged"] = {
        "runs_s": [round(r, 3) for r in runs],
        "median_s": round(statistics.median(runs), 3),
        "max_s": round(max(runs), 3),
        "cold_process_s": round(cold_process, 3),
        "cold_process_after_imports_s": round(float(proc.stdout.strip().splitlines()[-1]), 3),
        "target_s": 2.0,
    }

    with tempfile.TemporaryDirectory(prefix="slurmflow-bench-") as tmp:
        context = copy_context(Path(tmp))
        hook = ImageBuildHook(CONN_ID)

        # 2. code-only change: build on the cached layers, push the new ones
        edit_code(context, "code-change")
        plan = hook.plan(context, BENCH_REPOSITORY, base)
        build_s, _ = timed(hook.build, context, plan)
        push_s, digest = timed(hook.push, plan.ref)
        results["code_change"] = {
            "build_s": round(build_s, 1),
            "push_s": round(push_s, 1),
            "total_s": round(build_s + push_s, 1),
            "tag": plan.ref.tag,
            "digest": digest,
        }
        subprocess.run(["docker", "rmi", str(plan.ref)], capture_output=True, check=False)

        # 3. cold build: no layer cache
        if not args.skip_cold:
            edit_code(context, "cold")
            plan = hook.plan(context, BENCH_REPOSITORY, base)
            build_s, _ = timed(hook.build, context, plan, no_cache=True)
            cold: dict[str, object] = {"build_s": round(build_s, 1), "pushed": args.cold_push}
            if args.cold_push:
                push_s, digest = timed(hook.push, plan.ref)
                cold.update(push_s=round(push_s, 1), total_s=round(build_s + push_s, 1), digest=digest)
            results["cold"] = cold
            subprocess.run(["docker", "rmi", str(plan.ref)], capture_output=True, check=False)

    out = REPO / "bench" / "results" / "image.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    u, c = results["unchanged"], results["code_change"]
    print(
        f"unchanged content (skip, warm): median {u['median_s']:.3f} s, max {u['max_s']:.3f} s "
        f"(target < 2 s) over {args.repeat} runs"
    )
    print(
        f"unchanged content (new process): {u['cold_process_s']:.2f} s total, "
        f"{u['cold_process_after_imports_s']:.2f} s after imports"
    )
    print(f"code-only change: build {c['build_s']} s + push {c['push_s']} s = {c['total_s']} s")
    if "cold" in results:
        cold = results["cold"]
        extra = f" + push {cold['push_s']} s" if cold.get("pushed") else " (not pushed; --cold-push)"
        print(f"cold build: {cold['build_s']} s{extra}")
    print(f"written: {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
