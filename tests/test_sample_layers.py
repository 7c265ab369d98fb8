"""``Sample.with_layers``: a preset cut to its first n layers (benchmarks at real widths that fit one GPU)."""
import pytest
import torch

from effexport.samples import get_sample


@pytest.mark.parametrize("name,n", [("gemma4-e2b:tiny", 7), ("laguna-xs2:tiny", 3), ("zaya1-8b:tiny", 2),
                                    ("deepseek-v4-flash:tiny", 3)])
def test_cut_model_is_the_full_models_first_layers(name, n):
    """The cut model's layers are the full model's first n (same weights given the same seed order
    up to the cut), its per-layer config lists are cut, and its cache holds n layers' entries."""
    full, cut = get_sample(name), get_sample(name).with_layers(n)
    assert cut.name == f"{name}@{n}L"
    specs = cut.config.layer_specs()
    assert len(specs) == n
    # the same layers; a KV producer whose consumers were cut away becomes independent
    drop_role = [dict(vars(s), role=None) for s in specs]
    assert drop_role == [dict(vars(s), role=None) for s in full.config.layer_specs()[:n]]
    model = cut.build()
    logits, present = model(torch.zeros(1, 5, dtype=torch.long))
    assert logits.shape[:2] == (1, 5)
    assert {int(k.split(".")[0]) for k in present} <= set(range(n))
    assert len(model.state_dict()) < len(full.build("meta").state_dict())


def test_gemma4_keeps_kv_producers_and_refuses_bad_counts():
    cut = get_sample("gemma4-e2b").with_layers(20)  # 35 layers, 20 sharing: the first 15 produce
    assert (cut.config.num_hidden_layers, cut.config.num_kv_shared_layers) == (20, 5)
    assert get_sample("gemma4-e2b").with_layers(10).config.num_kv_shared_layers == 0
    for bad in (0, 36):
        with pytest.raises(ValueError, match="layers asked"):
            get_sample("gemma4-e2b").with_layers(bad)
