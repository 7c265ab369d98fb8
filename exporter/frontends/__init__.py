"""Frontends: what a build starts from, resolved into a ``LoadedModel`` (model, example prompt, source).

* :mod:`.loading`: ``MODEL`` -> a built-in sample, a Hugging Face directory or a ``torch.save`` file.
* :mod:`.hf`: the Hugging Face adapter (a causal LM driven through the samples' step contract).
* :mod:`.inputs`: validation of untrusted input files (JSON, safetensors headers, configs).
"""
