#!/usr/bin/env python
"""Entry point: ``deepspeed launch/train.py --config ds_configs/zero3.json [--recipe R.yaml] [overrides]``.

Also works under ``srun`` with one process per rank (SLURM variables are mapped to torch's) and
as a plain ``python launch/train.py ...`` single process. See ``--help``.
"""

import sys

from mlot_ds.engine.signals import install_stop_handlers

# Before the slow imports below: a SIGUSR1/SIGTERM that arrives while torch loads must not kill us.
install_stop_handlers()

from mlot_ds.engine.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
