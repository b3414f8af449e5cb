"""python -m bench [--cases NAME,...] [--json FILE] [--device cpu|cuda] [--quick]

Runs each case's runners (limit, naive, atelier) one after another, each in a fresh process,
prints the table and writes the rows as JSON (after every row, so a long run keeps what it
has measured). See bench/__init__.py for what the runners do.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.cases import CASES, DEFAULT_CASES, RUNNERS, estimate_peak_gb
from bench.report import add_utilisation, table

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache"


def available_gb(device: str) -> float:
    """Memory a runner may use: MemAvailable on the CPU, free VRAM on CUDA."""
    if device == "cuda":  # asked in a child process: a CUDA context here would hold VRAM
        code = "import torch; print(torch.cuda.mem_get_info()[0])"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=False)
        try:
            return float(done.stdout.strip().splitlines()[-1]) / 1e9
        except (ValueError, IndexError):
            return float("inf")
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return float("inf")


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _worker(args: list[str], log: Path, timeout: float | None) -> tuple[dict | None, str]:
    """Run bench.worker; returns (its JSON line, the tail of its log)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as stderr:
        try:
            done = subprocess.run(
                [sys.executable, "-m", "bench.worker", *args, "--spawned-at", repr(time.time())],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=timeout,
                check=False)
            stdout, code = done.stdout, done.returncode
        except subprocess.TimeoutExpired as expired:
            stdout, code = expired.stdout or "", f"timeout after {timeout:.0f} s"
    tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-12:]
    for line in (stdout or "").splitlines():
        for tag in ("BENCH_RESULT ", "BENCH_PREPARED "):
            if line.startswith(tag):
                return json.loads(line[len(tag):]), ""
    return None, f"exit {code}: " + " | ".join(tail)


def combine(rounds: list[dict]) -> dict:
    """One row from several rounds: the median of each timing, the largest of each peak; the
    rounds' own figures kept under "rounds"."""
    import statistics
    if len(rounds) == 1:
        return rounds[0]
    row = dict(rounds[0])
    for key, value in rounds[0].items():
        values = [r.get(key) for r in rounds]
        if not isinstance(value, float):  # counts, names, flags: as in the first round
            continue
        if any(v is None for v in values):
            continue
        row[key] = max(values) if "mb" in key else statistics.median(values)
    row["rounds"] = [{k: r.get(k) for k in ("step_s_median", "cpu_s_median", "first_step_s",
                                             "startup_s", "peak_mem_mb")} for r in rounds]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench",
                                     description="Atelier against the speed of the model.")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help=f"comma-separated; known: {', '.join(CASES)}")
    parser.add_argument("--runners", default=",".join(RUNNERS),
                        help="a subset of limit,naive,atelier")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when available")
    parser.add_argument("--quick", action="store_true",
                        help="2 warm-up + 3 measured steps: a smoke test of the bench itself")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE),
                        help="models, images and logs (bench/.cache, not committed)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per worker process (default: none)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="run each case's runners this many times, interleaved, and take "
                             "the median (steadier figures on a shared machine); default: the "
                             "case's own (3 for the tiny models, 1 for the big ones; 1 with "
                             "--quick)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads per worker (default: torch's own, as "
                             "`python -m trainer train` runs)")
    parser.add_argument("--no-memory-check", action="store_true",
                        help="run cases even when their estimated peak exceeds free memory")
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    wanted = [r.strip() for r in args.runners.split(",") if r.strip()]
    if set(wanted) - set(RUNNERS):
        parser.error(f"--runners: choose from {', '.join(RUNNERS)}")
    device = args.device or default_device()
    cache = Path(args.cache_dir).resolve()

    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")

    def skip(case_name: str, runners: list[str], reason: str) -> None:
        for runner in runners:
            add({"case": case_name, "runner": runner, "device": device, "skipped": reason,
                 "step_s_median": None, "first_step_s": None, "startup_s": None,
                 "peak_mem_mb": None})
        print(f"{case_name}: skipped ({reason})", file=sys.stderr, flush=True)

    common = ["--device", device, "--cache-dir", str(cache)] + (["--quick"] if args.quick else [])
    if args.threads:
        common += ["--threads", str(args.threads)]
    for name in names:
        case = CASES[name]
        runners = [r for r in case.runners if r in wanted]
        if not runners:
            continue
        if case.cuda_only and device != "cuda":
            skip(name, runners, "GPU-only case (peak VRAM with the memory levers on); "
                                "run with --device cuda")
            continue
        if not args.no_memory_check:
            free = available_gb(device)
            need = max(estimate_peak_gb(case, r, device) for r in runners)
            if need > 0.9 * free:
                where = "VRAM" if device == "cuda" else "RAM"
                skip(name, runners, f"needs ~{need:.0f} GB {where} (estimate), "
                                    f"{free:.0f} GB free")
                continue
        started = time.time()
        try:  # here, not in a worker: the models and images are built once, before timing
            from bench.worker import NotBuildable, prepare
            prepare(case, cache, args.quick)
        except NotBuildable as error:  # a known gap, said as such (not a failure)
            skip(name, runners, f"{name}: {error}")
            continue
        except Exception as error:  # noqa: BLE001 - reported in the row, the rest goes on
            skip(name, runners, f"could not prepare: {type(error).__name__}: {error}")
            continue
        measured: dict[str, list[dict]] = {r: [] for r in runners}
        failed: dict[str, str] = {}
        rounds = args.rounds or (1 if args.quick else case.rounds)
        for number in range(max(1, rounds)):
            for runner in runners:
                if runner in failed:
                    continue
                row, error = _worker(["--case", name, "--runner", runner, *common],
                                     cache / "logs" / f"{name}-{runner}.log", args.timeout)
                if row is None:
                    failed[runner] = error
                    print(f"{name} {runner}: FAILED {error}", file=sys.stderr, flush=True)
                    continue
                measured[runner].append(row)
                print(f"{name} {runner} (round {number + 1}): {row['step_s_median']:.4f} s/step, "
                      f"start-up {row['startup_s']:.1f} s, peak {row['peak_mem_mb']:,.0f} MB",
                      file=sys.stderr, flush=True)
        for runner in runners:
            if runner in failed:
                add({"case": name, "runner": runner, "device": device, "error": failed[runner],
                     "step_s_median": None, "first_step_s": None, "startup_s": None,
                     "peak_mem_mb": None})
            else:
                add(combine(measured[runner]))
        print(f"{name}: {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    add_utilisation(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(table(rows, device))
    return 0 if not any(r.get("error") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
