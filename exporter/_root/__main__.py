"""``python -m effexport`` runs the CLI (same as the ``effexport`` console script and
``python -m effexport.exporter``)."""
from effexport.exporter.cli import entry_point

entry_point()
