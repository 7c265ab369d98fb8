"""``python -m effexport.exporter`` runs the CLI (same as the ``effexport`` console script)."""
from effexport.exporter.cli import entry_point

entry_point()
