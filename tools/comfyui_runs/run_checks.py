"""Run tools/comfyui_check.py on every output in /tmp/comfy_runs/out; one JSON line each."""
import json, subprocess, sys, pathlib
ROOT = pathlib.Path("/tmp/comfy_runs")
TOOL = "/work/main/tools/comfyui_check.py"
PY = "/work/comfy-venv/bin/python"
ENCODERS = {"flux": ["clip_l=%s/models/flux-clip_l.safetensors" % ROOT],
            "sd35": ["clip_l=%s/models/sd35-clip_l.safetensors" % ROOT,
                     "clip_g=%s/models/sd35-clip_g.safetensors" % ROOT],
            "sd3": ["clip_l=%s/models/sd3-clip_l.safetensors" % ROOT,
                    "clip_g=%s/models/sd3-clip_g.safetensors" % ROOT]}
def run(args):
    r = subprocess.run([PY, TOOL, "--comfyui", "/work/comfyui", "--json", *args],
                       capture_output=True, text=True, timeout=900, cwd="/tmp")
    try:
        return json.loads(r.stdout)
    except ValueError:
        return {"error": (r.stderr or r.stdout)[-800:]}
only = sys.argv[1] if len(sys.argv) > 1 else ""
out = open(ROOT / ("results%s.jsonl" % ("-" + only if only else "")), "a")
for path in sorted((ROOT / "out").glob("*.safetensors")):
    name = path.stem
    if name.count("__") != 2 or (only and only not in name):
        continue
    fam, fmt, adapter = name.split("__")
    if "-" in adapter:  # a standalone embedding file
        continue
    base = ROOT / "models" / (fam + ".safetensors")
    if adapter == "FINE_TUNE":
        record = run(["--checkpoint", str(path), "--family", fam, "--fp32-text-enc"])
    else:
        enc = [a for e in ENCODERS.get(fam, []) for a in ("--text-encoder", e)]
        record = run(["--base", str(base), "--lora", str(path), "--family", fam,
                      "--fp32-text-enc", *enc])
        if adapter.endswith("+EMB"):
            record["embedding_bundled"] = run(["--embedding", str(path)])
            standalone = sorted((ROOT / "out").glob(name + "-*.safetensors"))
            record["embedding_standalone"] = [run(["--embedding", str(p)]) for p in standalone]
    record.update(family=fam, format=fmt, adapter=adapter)
    out.write(json.dumps(record, default=str) + "\n"); out.flush()
    print(name, record.get("keys_loaded"), record.get("keys_total"), record.get("max_relative_error"), record.get("error", "")[-300:], flush=True)
