"""Test-only models written independently of ``effexport.samples``.

The passes must recognise attention, masks and KV sharing from graph structure alone, so these
models use other module names, other ways to build masks and GQA, and other cache keys than the
reference samples:

``alt_gemma``  a Gemma-4-style decoder (sliding + full layers, cross-layer KV sharing, softcap,
               consumers with dead K/V projections) -- what the pipeline must rewrite.
``negatives``  small models the pipeline must *not* rewrite the careless way (plain causal, a
               length-dependent window, equal but independent K/V, bidirectional, chunked, padding,
               ALiBi, K/V look-alikes of another layer's).
``compressor_lookalike``  the DeepSeek V4 sample with compressors that pool in blocks the wrong way
               (built on the sample, not independent of it: what the compressed pass must refuse).
"""
