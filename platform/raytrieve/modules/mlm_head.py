"""A masked-LM head split in two at its vocabulary projection.

SPLADE needs, per text, the vocabulary-wide maximum (or sum) of the activated MLM logits over
its tokens. Projecting every position of a padded batch onto the vocabulary materialises a
[batch, sequence, vocab] tensor (30,522 wide for BERT): most of SPLADE's time and memory, and
the padding's share of it is thrown away by the mask. Split here, the transformer hands
SpladePooling the decoder's input and the decoder (transformers' ``get_output_embeddings()``),
and the pooling projects only real tokens, one text at a time (modules/splade_pooling.py).

Only heads whose forward is known to be ``decoder(transform(last_hidden_state))`` are split, by
class name: a head of another shape (MobileBERT concatenates a second matrix into its
projection) keeps the plain path, which computes the full logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

# Head classes whose forward is decoder(LayerNorm(act(dense(h)))) with the activation given.
_BERT_HEADS = {"BertLMPredictionHead"}  # cls.predictions; transform is its own module
_ROBERTA_HEADS = {"RobertaLMHead", "XLMRobertaLMHead", "CamembertLMHead"}  # lm_head; exact gelu
_DISTILBERT_MODELS = {"DistilBertForMaskedLM"}  # the head's layers sit on the model itself


def mlm_transform(model: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """What a transformers masked-LM model's head does before its decoder (the model's
    ``get_output_embeddings()``: ``decoder(transform(last_hidden_state))`` is its logits), or
    None for a head this table does not know (the caller then computes the full logits)."""
    # transformers' heads, looked up by attribute (typed loosely: each class has its own layout).
    m: Any = model
    predictions: Any = getattr(getattr(m, "cls", None), "predictions", None)
    lm_head: Any = getattr(m, "lm_head", None)
    if type(predictions).__name__ in _BERT_HEADS:
        return predictions.transform
    if type(lm_head).__name__ in _ROBERTA_HEADS:

        def roberta_transform(hidden: Tensor, h: Any = lm_head) -> Tensor:
            return h.layer_norm(F.gelu(h.dense(hidden)))

        return roberta_transform
    if type(model).__name__ in _DISTILBERT_MODELS:

        def distilbert_transform(hidden: Tensor, d: Any = m) -> Tensor:
            return d.vocab_layer_norm(d.activation(d.vocab_transform(hidden)))

        return distilbert_transform
    return None
