"""Vocabulary guards of ``FederatedLoRAModule``: the data's token ids must be the ones the model
embeds, at setup and when a checkpoint is resumed (Lightning-free)."""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor, nn

from modules.hf_models import SPECIAL_TOKEN_KEYS, is_pretrained_name, own_tokenizer_dir


def _input_embedding_key(net: nn.Module) -> str | None:
    """The state-dict key of the input embedding weight under ``net.`` (Llama
    ``model.embed_tokens``, GPT-2 ``transformer.wte``, ...)."""
    weight = net.get_input_embeddings().weight
    return next((f"net.{name}" for name, p in net.named_parameters() if p is weight), None)


def check_data_vocabulary(model: Any, net: nn.Module, vocab: Any) -> None:
    """Refuse data ids from another vocabulary than the model's (they would train silently on
    the wrong embedding rows, or index past them only when decoding canaries at the end).

    A pretrained model that ships a tokenizer needs the data's tokenizer to have the same
    vocabulary. Otherwise the data's ids must fit the embedding; a pretrained model with more
    rows than the data's vocabulary is warned about (padded embeddings are legitimate).
    """
    own = own_tokenizer_dir(model)
    data_tokenizer = getattr(vocab, "tok", None)  # None: the character vocabulary
    if own is not None:
        from datamodules.text import load_tokenizer

        same = data_tokenizer is not None and (
            data_tokenizer.get_vocab() == load_tokenizer(str(own)).get_vocab()
        )
        if not same:
            raise ValueError(
                f"model={model!r} ships its own tokenizer ({own}), but the data's vocabulary "
                f"({len(vocab)} tokens, {_vocab_name(vocab)}) is another: set data.tokenizer "
                f"to {str(own)!r}"
            )
        return
    rows = net.get_input_embeddings().weight.shape[0]
    if len(vocab) > rows:  # ids past the embedding: every such token would fail or alias
        raise ValueError(
            f"model={model!r} embeds {rows} tokens, but the data's vocabulary has {len(vocab)} "
            f"({_vocab_name(vocab)}): set data.tokenizer to the model's tokenizer"
            + (
                ""
                if is_pretrained_name(model)
                else f", or model.init_args.vocab_size >= {len(vocab)}"
            )
        )
    if not is_pretrained_name(model):
        _check_special_tokens(model, net, vocab)
    if len(vocab) < rows and is_pretrained_name(model):
        # Embeddings padded past the tokenizer (to a multiple of 64, say) are common; a model
        # trained on another vocabulary of its size cannot be told apart without its tokenizer.
        warnings.warn(
            f"model={model!r} embeds {rows} tokens and the data's vocabulary has {len(vocab)} "
            f"({_vocab_name(vocab)}): fine for embeddings padded past the tokenizer, wrong if the "
            "model was trained on another vocabulary",
            stacklevel=2,
        )


def _check_special_tokens(model: Any, net: nn.Module, vocab: Any) -> None:
    """Warn when a model built before the data was known (``vocab_size`` set) names other EOS/PAD
    ids than the data: its padding row would be a real token of the data (zero, never trained
    as an input) and exported configs would stop generating on the wrong token."""
    model_ids = {key: getattr(net.config, key, None) for key in ("eos_token_id", "pad_token_id")}
    data_ids = {key: getattr(vocab, key, None) for key in model_ids}
    if model_ids != data_ids:
        warnings.warn(
            f"model={model!r} was built with {model_ids}, but the data's vocabulary "
            f"({_vocab_name(vocab)}) has {data_ids}: set model.init_args.vocab_size: null (the "
            "model is then built with the data's ids) or put the ids in the model config",
            stacklevel=3,
        )


def _vocab_name(vocab: Any) -> str:
    tokenizer = getattr(vocab, "tok", None)
    if tokenizer is None:
        return "the character vocabulary, data.tokenizer: null"
    return f"data.tokenizer={tokenizer.name_or_path!r}"


def check_checkpoint_vocabulary(saved: dict[str, Tensor], net: nn.Module | None) -> None:
    """Refuse resuming with another vocabulary, naming the data setting (Lightning's
    state-dict size mismatch names neither): it comes from the datamodule's tokenizer, not from
    a model setting the CLI could compare."""
    if net is None:
        return
    key = _input_embedding_key(net)
    embedding = saved.get(key) if key is not None else None
    if embedding is None:
        return
    current = net.get_input_embeddings().weight.shape[0]
    if embedding.shape[0] != current:
        raise ValueError(
            f"the checkpoint's model has a vocabulary of {embedding.shape[0]} tokens, this run's "
            f"data gives {current}: resume with the data.tokenizer (and model) of the "
            "checkpoint's run"
        )


def network_record(net: nn.Module) -> dict[str, Any]:
    """What a checkpoint needs to rebuild the network without the data: its vocabulary size
    and special token ids."""
    return {
        "vocab_size": net.get_input_embeddings().weight.shape[0],
        "special_token_ids": {key: getattr(net.config, key, None) for key in SPECIAL_TOKEN_KEYS},
    }


def restore_network(module: Any, record: dict[str, Any] | None) -> None:
    """Build the network of a checkpoint loaded outside a fit (``load_from_checkpoint``: the
    network is sized from the data in ``setup``, which has not run, so every weight was an
    unexpected key) and give it the checkpoint's special token ids (a network built from a
    preset had the preset's: its export named the wrong EOS)."""
    if record is None:
        return
    ids = record["special_token_ids"]
    if module.net is None:
        module.build_model(record["vocab_size"], {k: v for k, v in ids.items() if v is not None})
        return
    for config in (module.net.config, getattr(module.net, "generation_config", None)):
        if config is not None:
            for key, value in ids.items():
                setattr(config, key, value)
