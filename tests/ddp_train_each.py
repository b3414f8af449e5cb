"""Run under `accelerate launch` by tests/test_ddp_families.py: `python -m trainer train
--config FILE` for each FILE given, one after another, in the same processes (the process
group and the imports are paid once; the engine starts each run from a clean accelerator state,
as a server's job queue does). Exits with the first failing run's status."""
import sys

from trainer.cli import main

for config in sys.argv[1:]:
    status = main(["train", "--config", config])
    if status:
        sys.exit(status)
