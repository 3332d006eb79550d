"""Guards and helpers of ``modules.layer_parallel_model`` the exactness tests do not reach:
refused models and settings, ``sequential_layers(keep=...)``, Block Influence over several
batches, and the training refusal of a partly frozen fused pair."""

from __future__ import annotations

import pytest
import torch

from modules.layer_parallel_model import (
    apply_layer_parallelism,
    layer_block_influence,
    num_sequential_layers,
    sequential_layers,
)
from ops.layer_parallel import block_influence
from tests.modules.test_layer_parallel_model import _ids, _lp, _tiny


def test_a_layer_whose_attention_has_another_index_is_refused():
    """Keys/values are cached under ``self_attn.layer_idx``: a member that would write under
    another layer's index must be refused before any surgery."""
    model = _tiny()
    model.model.layers[3].self_attn.layer_idx = 5
    with pytest.raises(ValueError, match=r"layer 3 has self_attn.layer_idx=5; expected 3"):
        apply_layer_parallelism(model, [[2, 3]], mode="reference")


def test_a_decoder_shorter_than_its_config_is_refused():
    """The cache allocates ``num_hidden_layers`` entries; a pruned stack would misalign them."""
    model = _tiny()
    del model.model.layers[7]
    with pytest.raises(ValueError, match="decoder has 7 layers, config says 8"):
        apply_layer_parallelism(model, [[2, 3]])


def test_an_unknown_post_norm_mode_is_refused_even_with_an_empty_plan():
    """The setting is checked up front, not only when a pair is built."""
    with pytest.raises(ValueError, match="post_norm_mode='mixed'"):
        apply_layer_parallelism(_tiny(), None, post_norm_mode="mixed")


def test_sequential_layers_keeps_only_the_requested_original_layers():
    """The drop-layer baselines run a subset of the original layers, in the given order; the
    LP stack comes back afterwards."""
    lp = _lp(_tiny(), [[2, 3]], mode="reference")
    pair = lp.model.layers[2]
    members = list(pair.members)
    with sequential_layers(lp, keep=[0, 2, 3]):
        kept = list(lp.model.layers)
        assert num_sequential_layers(lp) == 3
    assert kept[1] is members[0] and kept[2] is members[1]
    assert num_sequential_layers(lp) == 7 and lp.model.layers[2] is pair


@torch.no_grad()
def test_block_influence_is_averaged_over_batches():
    """Two batches: each layer's value is the mean of its Block Influence on either batch,
    computed here from the hidden states of the sequential model."""
    model = _lp(_tiny(), [[2, 3]])
    batches = [_ids(seed=1), _ids(seed=2)]
    influence = layer_block_influence(model, batches)
    per_batch = []
    with sequential_layers(model):
        for ids in batches:
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
            per_batch.append([block_influence(hidden[k], hidden[k + 1]).item() for k in range(7)])
    for layer in range(7):
        expected = (per_batch[0][layer] + per_batch[1][layer]) / 2
        assert influence[layer] == pytest.approx(expected, abs=1e-6)


def test_training_through_a_partly_frozen_fused_pair_is_refused():
    """One trainable member is enough for gradients to be lost in a fused pair."""
    lp, ids = _lp(_tiny(), [[2, 3]], mode="fused"), _ids()
    for p in lp.model.layers[2].members[0].parameters():
        p.requires_grad_(False)
    lp.train()
    with pytest.raises(RuntimeError, match=r"\(2, 3\) is fused"):
        lp(ids, labels=ids).loss.backward()
