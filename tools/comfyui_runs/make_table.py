"""results*.jsonl -> the markdown table of docs/comfyui_results.md (stdout)."""
import glob, json, re, collections
TYPES = {"sd15": "STABLE_DIFFUSION_15", "sd15-inpaint": "STABLE_DIFFUSION_15_INPAINTING",
         "sdxl": "STABLE_DIFFUSION_XL_10_BASE", "sdxl-inpaint": "STABLE_DIFFUSION_XL_10_BASE_INPAINTING",
         "flux": "FLUX_DEV_1", "chroma": "CHROMA_1", "sd3": "STABLE_DIFFUSION_3", "sd35": "STABLE_DIFFUSION_35",
         "qwen": "QWEN", "z-image": "Z_IMAGE", "flux2": "FLUX_2"}
ORDER = list(TYPES)
FMT = ["KOHYA_LORA", "LEGACY_LORA", "COMFY_LORA", "DIFFUSERS_LORA", "ORIGINAL_SINGLE_FILE"]
AD = ["LORA", "LORA_BLOCKS", "LORA+EMB", "DORA", "LOHA", "LOKR", "FINE_TUNE"]
# a run on another layer preset than the family's other rows
SHOWN = {"LORA_BLOCKS": "LORA (blocks preset)"}
records = {}
import os
for path in sorted(glob.glob("/tmp/comfy_runs/results*.jsonl"), key=os.path.getmtime):
    for line in open(path):
        r = json.loads(line)
        records[(r["family"], r["format"], r["adapter"])] = r
# families whose partial rows name each dropped layer in full (their layer names say little
# in the two-word form of the older rows)
FULL_NAMES = {"qwen", "z-image", "flux2"}
def lost(keys, full_names=False):
    parts = collections.defaultdict(collections.Counter)
    for k in keys:
        part = "UNet" if k.startswith(("unet.", "lora_unet", "diffusion_model")) else (
            "transformer" if k.startswith("transformer.") else "text encoder")
        m = re.sub(r"\.(lora_[AB]|lora_down|lora_up|alpha|dora_scale|lora_magnitude_vector|hada_\w+|lokr_\w+)(\.weight)?$", "", k)
        leaf = re.split(r"[._]", m)
        leaf = [p for p in leaf if not p.isdigit()]
        if "lora_magnitude_vector" in k:
            part = part + " DoRA magnitudes"
        if full_names:
            name = ("every adapted layer's" if "lora_magnitude_vector" in k
                    else re.sub(r"\.\d+\.", ".N.", m.split(".", 1)[1]))
            parts[part][name] += 1
            continue
        parts[part]["_".join(leaf[-2:])] += 1
    return "; ".join(f"{part}: " + ", ".join(sorted(c)) + f" ({sum(c.values())} keys)"
                     for part, c in parts.items())
def err(x):
    return "–" if x is None else ("%.1e" % x)
rows = []
for key in sorted(records, key=lambda k: (ORDER.index(k[0]), FMT.index(k[1]), AD.index(k[2]))):
    r = records[key]; fam, fmt, ad = key
    mt = TYPES[fam]
    if "error" in r:
        rows.append(f"| {mt} | {fmt} | {ad} | – | – | – | – | check failed: {r['error'][-120:]!r} |"); continue
    if ad == "FINE_TUNE":
        cls = r["detected"] + (" (class assumed: tiny shapes)" if r["detection_assumed"] else "")
        if r["detected"] == "ZImage" and r["detection_assumed"]:
            cls = f"ZImage (class assumed: ComfyUI detects {r['detected_natively']} below width 3840)"
        if r.get("constants_read_from_file"): cls += " (sizes read from file)"
        te = "with its text encoders" if r["text_encoders_loaded"] else "diffusion model only (Load Diffusion Model)"
        if r.get("diffusion_keys_not_held") == [] and r.get("diffusion_keys_not_in_file") == []:
            te += ", every tensor of it held"
        if r.get("in_channels") == 9:
            te += ", an inpainting UNet (9 input channels)"
        rows.append(f"| {mt} | {fmt} | full model | {cls} | {r['file_keys']} tensors read | – | – | loads: {te} |"); continue
    cls = r["detected"] + (" (class assumed: tiny shapes)" if r["detection_assumed"] else "")
    if r["detected"] == "ZImage" and r["detection_assumed"]:
        cls = "ZImage (class assumed: ComfyUI takes a Z-Image narrower than 3840 for Lumina2)"
    if r.get("constants_read_from_file"): cls += " (sizes read from file)"
    full = r["keys_loaded"] == r["keys_total"]
    note = "complete" if full else "**partial**: drops " + lost(r["not_loaded"], fam in FULL_NAMES) if r["not_loaded"] else ""
    if r.get("embeddings_not_loaded"):
        emb = r.get("embedding_bundled", {}).get("encoders", {})
        exact = all(v.get("exact") for v in emb.values()) and emb
        note = ("LoRA complete; " if not r["not_loaded"] else note + "; ") + \
            "`bundle_emb` keys not read by the LoRA loader, read exactly as `embedding:<file name>`" + \
            (" (" + "/".join(emb) + ")" if exact else " (NOT exact)")
        sa = r.get("embedding_standalone") or []
        if sa and all(all(v.get("exact") for v in s["encoders"].values()) for s in sa):
            note += "; standalone file exact"
    skip = r.get("layers_not_comparable_tiny_shape") or []
    comp = f"{r['layers_compared']}/{r['modules_in_file']}" + (" (TE2 text_projection: tiny shape)" if skip else "")
    if r.get("unchanged_layers"):
        off = r['unchanged_max_error_of_weight']
        comp += f"; {r['unchanged_layers']} untrained, " + ("left exactly as they were" if not off else f"off by ≤ {off:.0e} of the weight")
    rows.append(f"| {mt} | {fmt} | {SHOWN.get(ad, ad)} | {cls} | {r['keys_loaded']}/{r['keys_total']} | {comp} | {err(r['max_relative_error'])} | {note} |")
import sys
if "--doc" in sys.argv:
    print(open("/tmp/comfy_runs/doc_header.md").read())
print("| Model type | Format | Adapter | ComfyUI model class | Keys loaded / in file | Layers compared | Max rel. error | Result |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
print("\n".join(rows))

