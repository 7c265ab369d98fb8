"""effexport: export LLMs that use KV sharing, sliding windows, compressed attention and
hyper-connections to deployable engines without losing the memory and compute savings.

Sub-packages: ``effexport.samples`` (reference architectures), ``effexport.custom_ops`` (the operator
set), ``effexport.passes`` (FX rewrites), ``effexport.exporter`` (capture, backends, CLI, report).
"""
__version__ = "0.1.0"
