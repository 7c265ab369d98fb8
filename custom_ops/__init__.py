"""The effexport operator set (namespace ``effexport``), declared once.

Each file declares its ops with ``torch.library.custom_op``: the eager reference (the oracle for
every kernel and backend), ``register_fake`` for symbolic shapes, and a docstring with shapes and
semantics. Importing this package registers every op and imports only torch (never Triton,
onnxruntime or tensorrt). :data:`ALL_OPS` lists every ``OpOverload``; backends assert they lower
all of them (or refuse explicitly).
:func:`enable_triton` opts in to the Triton CUDA kernels (``custom_ops/_triton``).

    attention        attention, attention_cache, attention_ring, attention_read, attention_buffer
                     (and attention_buffer_inplace, the in-place form no pass emits: INPLACE_OPS)
    cca              cca (compressed convolutional attention q/k/v with conv and value-shift state)
    kv_compress      kv_compress, kv_compress_step (CSA/HCA compressor)
    indexer_topk     indexer_topk (lightning indexer + top-k over visible entries)
    sparse_attention sparse_attention, sparse_attention_ring (window + compressed entries + sink)
    mhc              sinkhorn, mhc_pre, mhc_post, mhc_head (hyper-connection mixing)
"""
from effexport.custom_ops import attention, cca, indexer_topk, kv_compress, mhc, sparse_attention

MODULES = (attention, cca, kv_compress, indexer_topk, sparse_attention, mhc)
ALL_OPS = tuple(op for module in MODULES for op in module.OPS)

__all__ = ["ALL_OPS", "MODULES", "enable_triton"]


def enable_triton() -> None:
    """Register the Triton CUDA kernels (``custom_ops/_triton``): on CUDA tensors the decode
    (one-token) calls of ``attention_cache``, ``attention_ring``, ``attention_read``,
    ``attention_buffer`` / ``attention_buffer_inplace``, ``sparse_attention_ring`` and ``cca``, and
    every call of the mHC ops ``sinkhorn`` and ``mhc_pre``, then run Triton, and so do the multi-token (prefill) calls of ``attention``, ``attention_cache``,
    ``attention_ring``, ``attention_read`` (full cache) and the buffer ops;
    everything else keeps the eager reference. Idempotent; imports Triton only here (RuntimeError
    naming the fix without it)."""
    from effexport.custom_ops._triton import register
    register()
