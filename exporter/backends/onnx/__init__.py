"""ONNX backend: lowering of the effexport ops and export of the rewritten step graph.

* :mod:`.translations`: profiles (``ort``, ``standard``), opsets, IR versions, the translation
  table per profile and the documented refusals.
* :mod:`.attention`: the attention ops (GroupQueryAttention / Attention-23 / MatMul-Softmax).
* :mod:`._local`: ``effexport``-domain nodes whose bodies are model-local ONNX functions.
* :mod:`.functions`: mHC ops, function bodies of standard ops (Sinkhorn unrolled, no control flow).
* :mod:`.cca`: ``effexport::cca`` (a body with two grouped ``Conv``).
* :mod:`.compressed`: DeepSeek ``kv_compress(_step)``, ``indexer_topk``, ``sparse_attention(_ring)``.
* :mod:`.export`: :func:`~.export.export_step` (step GraphModule -> ONNX file) and
  :func:`~.export.lower` (any module with effexport ops -> ModelProto).

Importing this package imports neither onnxruntime nor the lowering modules; they load on use.
"""
