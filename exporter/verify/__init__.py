"""Verification and accounting of a build.

* :mod:`.parity`: the artifact against eager PyTorch (prefill + decode steps, tolerances, structure).
* :mod:`.report`: analytic KV-cache bytes, parameters and decode FLOPs (``effexport report``,
  ``report.json``).
* :mod:`.hf_report`: the same accounting for a Hugging Face config.
"""
