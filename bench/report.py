"""The bench's table: one row per (case, runner), the ratios on the atelier row, then the
memory levers against their base cases."""
from __future__ import annotations

from bench.cases import CASES

ROW_KEYS = ("case", "runner", "step_s_median", "first_step_s", "startup_s", "peak_mem_mb")


# Dense bfloat16 peak of a GPU by its datasheet (FLOP/s), matched on its name: the ceiling the
# utilisation estimate divides by. H100/H200 SXM: 989 TFLOP/s (PCIe H100: 756).
BF16_PEAK_FLOPS = [("H100 PCIe", 756e12), ("H200", 989e12), ("H100", 989e12),
                   ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12),
                   ("RTX 4090", 165e12), ("RTX 3090", 71e12)]


def bf16_peak(device_name: str | None) -> float | None:
    for name, peak in BF16_PEAK_FLOPS:
        if device_name and name in device_name:
            return peak
    return None


def add_utilisation(rows: list[dict]) -> None:
    """Each CUDA row's share of the GPU's bfloat16 peak: the case's FLOPs per step (counted by
    its limit runner with FlopCounterMode, eager; a -compile case does the same arithmetic as
    its eager twin) over the step time and the datasheet peak."""
    flops = {r["case"]: r["flops_per_step"] for r in rows if r.get("flops_per_step")}
    for row in rows:
        case = CASES.get(row["case"])
        count = flops.get(row["case"]) or (flops.get(case.base) if case and case.compile
                                           else None)
        peak = bf16_peak(row.get("device_name"))
        if count and peak and row.get("step_s_median"):
            row["flops_per_step"] = count
            row["bf16_peak_share"] = count / row["step_s_median"] / peak


def _f(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}f}"


def _mb(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _by_key(rows: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["case"], r["runner"]): r for r in rows}


def ratio(a, b):
    return a / b if a is not None and b else None


def table(rows: list[dict], device: str) -> str:
    index = _by_key(rows)
    memory = "max allocated (CUDA)" if device == "cuda" else "peak RSS"
    header = ["case", "runner", "step s", "cpu s", "first s", "start-up s", "peak MB",
              "train peak MB", "atelier/limit", "(cpu)", "naive/atelier", "img/s",
              "GPU bf16 %"]
    lines = []
    for row in rows:
        case, runner = row["case"], row["runner"]
        if row.get("skipped") or row.get("error"):
            why = row.get("skipped") or f"FAILED: {row['error']}"
            lines.append([case, runner, why])
            continue
        cells = [case, runner, _f(row.get("step_s_median"), 4), _f(row.get("cpu_s_median"), 4),
                 _f(row.get("first_step_s")), _f(row.get("startup_s"), 1),
                 _mb(row.get("peak_mem_mb")), _mb(row.get("train_peak_mem_mb")), "", "", "",
                 _f(row.get("images_per_s"), 2),
                 _f(100 * row["bf16_peak_share"], 1) if row.get("bf16_peak_share") else "-"]
        if runner == "atelier":
            step, cpu = row.get("step_s_median"), row.get("cpu_s_median")
            limit = index.get((case, "limit"), {})
            naive = index.get((case, "naive"), {}).get("step_s_median")
            if limit.get("step_s_median"):
                cells[8] = _f(ratio(step, limit["step_s_median"]), 2)
            if limit.get("cpu_s_median") and cpu and device == "cpu":
                cells[9] = _f(ratio(cpu, limit["cpu_s_median"]), 2)
            cells[10] = _f(ratio(naive, step), 2) if naive else ""
        lines.append(cells)
    widths = [max([len(header[i])] + [len(c[i]) for c in lines if len(c) > 3])
              for i in range(len(header))]
    widths[0] = max([widths[0]] + [len(c[0]) for c in lines])
    widths[1] = max([widths[1]] + [len(c[1]) for c in lines])
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out.append("  ".join("-" * w for w in widths))
    previous = None
    for cells in lines:
        shown = list(cells)
        if shown[0] == previous:
            shown[0] = ""
        previous = cells[0]
        if len(shown) == 3:  # skipped / failed
            out.append(f"{shown[0].ljust(widths[0])}  {shown[1].ljust(widths[1])}  {shown[2]}")
        else:
            out.append("  ".join(c.rjust(w) if i >= 2 else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(shown, widths))))
    done = [r for r in rows if r.get("step_s_median") is not None]
    measured = sorted({(r.get("warmup_steps"), r.get("steps_measured")) for r in done})
    counts = ", ".join(f"{m} after {w} warm-up" for w, m in measured) or "-"
    out.append("")
    out.append(f"step s: median seconds per optimizer step ({counts} steps); cpu s: the same in "
               "CPU seconds of the process (all threads); first s: the first step alone.")
    out.append("start-up s: from the process spawn (interpreter, imports, model load, setup) to "
               "the start of the first optimizer step.")
    out.append(f"peak MB: {memory} of the whole process; train peak MB: the same from the first "
               "step on.")
    threads = sorted({r.get("threads") for r in done if r.get("threads")})
    if device == "cpu" and threads:
        out.append("CPU threads: " + ", ".join(str(t) for t in threads) + ".")
    out.append("atelier/limit: step time ratio (target <= 1.10), (cpu): the same in CPU "
               "seconds; naive/atelier: how much faster Atelier is than the simple way.")
    if device == "cuda":
        out.append("CUDA: step times are host times with no per-step synchronisation (steady "
                   "state = GPU pace); peak_reserved_mb and steady_peak_mem_mb (after the "
                   "warm-up) are in the JSON. GPU bf16 %: the step's FLOPs (FlopCounterMode, "
                   "the limit's eager step) / step time / the datasheet's dense bf16 peak.")
    lever_lines = levers(rows)
    if lever_lines:
        out += ["", *lever_lines]
    return "\n".join(out)


def levers(rows: list[dict]) -> list[str]:
    """Each lever case against its base case, runner by runner: time factor and memory saved."""
    index = _by_key(rows)
    found = []
    for row in rows:
        case = CASES.get(row["case"])
        if case is None or not case.base or row.get("step_s_median") is None:
            continue
        base = index.get((case.base, row["runner"]))
        if not base or base.get("step_s_median") is None:
            continue
        found.append([
            f"{case.name} vs {case.base}", row["runner"],
            _f(ratio(row["step_s_median"], base["step_s_median"]), 2),
            _mb(_diff(base.get("peak_mem_mb"), row.get("peak_mem_mb"))),
            _mb(_diff(base.get("train_peak_mem_mb"), row.get("train_peak_mem_mb"))),
            case.note])
    if not found:
        return []
    header = ["memory lever", "runner", "time x", "peak MB saved", "train peak MB saved",
              "what"]
    widths = [max(len(header[i]), *(len(f[i]) for f in found)) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
           "  ".join("-" * w for w in widths)]
    for cells in found:
        out.append("  ".join(c.rjust(w) if 2 <= i <= 4 else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))))
    return out


def _diff(base, value):
    return None if base is None or value is None else base - value
