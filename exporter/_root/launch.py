"""``python -m effexport.launch DIR --prompt-ids FILE [--steps N]``: ``effexport run`` for torchrun,
which starts a module per rank: ``torchrun --nproc-per-node N -m effexport.launch DIR ...``."""
import sys

from effexport.exporter.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
