"""LoRA tools: look into a LoRA file, merge LoRAs, bake them into their base model, cut their
rank, or extract one from a fine-tune (issue 28). One module per tool; `layers.py` reads any
LoRA file (kohya / ComfyUI / diffusers layouts; LoRA, LoHa, LoKr, DoRA) into per-layer factors
and weight deltas, and writes plain LoRA layers back; `svd.py` is the low-rank arithmetic the
resize, merge and extract tools share. The CLI (`python -m trainer lora ...`) and the page's
Tools section call these functions; neither does tensor math of its own.
"""
