"""Atelier's benchmark suite: the engine against the speed of the model.

    python -m bench [--cases NAME,...] [--json FILE] [--device cpu|cuda] [--quick]

For each case (model, resolution, batch, training method and memory settings) three runners
train the same thing, each in a fresh process (bench/worker.py):

- limit:   a bare loop of denoiser (UNet or transformer) forward + backward + optimizer
           step on latents and text embeddings encoded once before the loop: the speed of
           the model itself;
- naive:   the way most training scripts do it: a plain DataLoader over the image files, the
           VAE and the text encoder run every step, the loss read back every step;
- atelier: the real engine, `trainer.loop.train(config, control)` as the CLI calls it, with
           its default settings for the case (latent and text caches on).

The parent (bench/__main__.py) prepares the models and images, runs the workers, prints the
table (bench/report.py) and writes the JSON rows. Cases are in bench/cases.py, the runners in
bench/runners.py. `bench/data_pipeline.py` is the older, data-side benchmark (caching on/off,
loader workers) and stands alone.
"""
