"""Losses for training without labelled pairs: ContrastiveTension (two copies of the model
must agree on identical sentences and disagree on different ones), its in-batch-negatives
form, and MegaBatchMargin (hardest in-batch negative against a margin)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raytrieve.encoders.similarity import cosine
from raytrieve.losses.base import Features, Loss, LossContract, embed_columns, register
from raytrieve.losses.cached import CachedLoss, _chunked, _lazy

if TYPE_CHECKING:
    from raytrieve.encoders.base import Encoder


@register("dense")
class ContrastiveTensionLoss(Loss):
    """Columns: two views of sentences (identical or different). A frozen-at-start copy
    (model1) and the trained model (model2) score each pair by dot product; BCE against
    "is the same sentence" (derived from the token ids when no label is given)."""

    columns = (2, 2)
    column_names = "sentence1, sentence2"
    reads_labels = True  # 1 = the same sentence, where given

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.model2 = model
        self.model1 = copy.deepcopy(model)
        self.criterion = nn.BCEWithLogitsLoss(reduction="sum")

    def forward(self, features: Sequence[Features], labels: Tensor | None = None) -> Tensor:
        f1, f2 = list(features)
        r1 = self.model1(f1)["sentence_embedding"]
        r2 = self.model2(f2)["sentence_embedding"]
        scores = (r1 * r2).sum(dim=-1)
        if labels is None:
            labels = torch.tensor(
                [
                    torch.equal(a[m.bool()], b[n.bool()])
                    for a, m, b, n in zip(f1["input_ids"], f1["attention_mask"], f2["input_ids"], f2["attention_mask"])
                ],
                dtype=scores.dtype,
                device=scores.device,
            )
        return self.criterion(scores, labels.view(-1).type_as(scores))


@register("dense")
class ContrastiveTensionLossInBatchNegatives(Loss):
    """One column of sentences: model1's and model2's embeddings of the same sentence are the
    positive pair, every other sentence a negative; symmetric cross-entropy with a learned scale."""

    columns = (1, 1)
    in_batch_negatives = True
    column_names = "sentences"

    def __init__(self, model: nn.Module, scale: float = 20.0, similarity_fct: Callable = cosine) -> None:
        super().__init__(model)
        self.model2 = model
        self.model1 = copy.deepcopy(model)
        self.similarity_fct = similarity_fct
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(scale))

    def forward(self, features: Sequence[Features], labels: Tensor | None = None) -> Tensor:
        f = next(iter(features))
        scores = self.similarity_fct(self.model1(f)["sentence_embedding"], self.model2(f)["sentence_embedding"])
        scores = scores * self.logit_scale.exp()
        target = torch.arange(len(scores), device=scores.device)
        return (F.cross_entropy(scores, target) + F.cross_entropy(scores.T, target)) / 2


def _mega_batch_margin(
    reps: list[list[Tensor]], positive_margin: float, negative_margin: float, chunk: int, with_backward: bool
) -> Tensor:
    anchors, positives = torch.cat(reps[0]), torch.cat(reps[1])
    rows = len(anchors)

    def part(b: int, e: int) -> Tensor:
        idx = torch.arange(e - b, device=anchors.device)
        cs = cosine(anchors[b:e], positives)
        pos = cs[idx, idx + b]
        hardest = cs.clone()
        hardest[idx, idx + b] = float("-inf")
        hardest = hardest.max(dim=1).values
        return (F.relu(positive_margin - pos) + F.relu(hardest - negative_margin)).sum() / rows

    return _chunked(_lazy(part, rows, chunk), with_backward)


@register("dense")
class MegaBatchMarginLoss(CachedLoss):
    """relu(pos_margin - cos(a, p)) + relu(max_neg cos(a, n) - neg_margin), the hardest
    negative taken from the whole (mega) batch. With ``use_mini_batched_version`` (default)
    the batch runs through GradCache in mini-batches, so it can be very large."""

    columns = (2, 2)
    in_batch_negatives = True
    column_names = "anchor, positive"

    def __init__(
        self,
        model: nn.Module,
        positive_margin: float = 0.8,
        negative_margin: float = 0.3,
        use_mini_batched_version: bool = True,
        mini_batch_size: int = 50,
    ) -> None:
        super().__init__(model, mini_batch_size)
        self.positive_margin, self.negative_margin = positive_margin, negative_margin
        self.use_mini_batched_version = use_mini_batched_version
        self.uses_gradient_cache = use_mini_batched_version

    def calculate_loss(self, reps, labels=None, with_backward: bool = False, **extra: Any) -> Tensor:
        rows = sum(len(r) for r in reps[0])
        chunk = self.mini_batch_size if (with_backward or not torch.is_grad_enabled()) else rows
        return _mega_batch_margin(reps, self.positive_margin, self.negative_margin, chunk, with_backward)

    def forward(self, features: Sequence[Features], labels: Tensor | None = None) -> Tensor:
        if self.use_mini_batched_version:
            return super().forward(features, labels)
        features = list(features)
        self.check_columns(len(features))
        reps = embed_columns(self.model, features)
        return self.calculate_loss([[r] for r in reps], labels)


def _tie_to_decoder(encoder: nn.Module, decoder_base: nn.Module) -> None:
    """Make each encoder parameter the same tensor as the identically named decoder parameter
    (the decoder's cross-attention has no encoder counterpart and stays its own)."""
    modules = dict(encoder.named_modules())
    tied = False
    for name, param in decoder_base.named_parameters():
        owner, _, attr = name.rpartition(".")
        module = modules.get(owner)
        if module is not None and hasattr(module, attr):
            setattr(module, attr, param)
            tied = True
    if not tied:
        from raytrieve.errors import ConfigError

        raise ConfigError(
            "DenoisingAutoEncoderLoss: no encoder weight matches the decoder; tie only the same architecture"
        )


@register("dense")
class DenoisingAutoEncoderLoss(LossContract, nn.Module):
    """TSDAE: reconstruct the original sentence from the embedding of a damaged copy with a
    causal decoder that cross-attends to that single embedding.

    Columns: (damaged, original). With ``tie_encoder_decoder`` the decoder is built from the
    encoder's own checkpoint and shares its weights (less memory, better results).
    """

    def __init__(
        self, model: Encoder, decoder_name_or_path: str | None = None, tie_encoder_decoder: bool = True
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from raytrieve.errors import ConfigError
        from raytrieve.modules.transformer import Transformer, quiet_progress

        self.encoder = model
        transformer = model.stack[0]
        if not isinstance(transformer, Transformer):
            first = type(transformer).__name__
            raise ConfigError(f"DenoisingAutoEncoderLoss: the model's first module must be a Transformer, not {first}")
        self.tokenizer_encoder = transformer.tokenizer
        encoder_path = transformer.auto_model.config._name_or_path
        if tie_encoder_decoder:
            decoder_name_or_path = encoder_path
        elif decoder_name_or_path is None:
            raise ConfigError("DenoisingAutoEncoderLoss: give decoder_name_or_path when tie_encoder_decoder=False")
        self.tokenizer_decoder = AutoTokenizer.from_pretrained(decoder_name_or_path, local_files_only=True)
        self.need_retokenization = not isinstance(self.tokenizer_encoder, type(self.tokenizer_decoder))
        config = AutoConfig.from_pretrained(decoder_name_or_path, local_files_only=True)
        config.is_decoder = True
        config.add_cross_attention = True
        with quiet_progress():
            self.decoder = AutoModelForCausalLM.from_pretrained(
                decoder_name_or_path, config=config, local_files_only=True
            )
        if transformer.auto_model.config.hidden_size != config.hidden_size:
            raise ConfigError("DenoisingAutoEncoderLoss: encoder and decoder hidden sizes differ")
        if self.tokenizer_decoder.pad_token is None:
            self.tokenizer_decoder.pad_token = self.tokenizer_decoder.eos_token
            self.decoder.config.pad_token_id = self.decoder.config.eos_token_id
        if tie_encoder_decoder:
            if self.need_retokenization:
                raise ConfigError("DenoisingAutoEncoderLoss: tied encoder and decoder need the same tokenizer")
            if len(self.tokenizer_encoder) != len(self.tokenizer_decoder):
                self.tokenizer_decoder = self.tokenizer_encoder
                self.decoder.resize_token_embeddings(len(self.tokenizer_decoder))
            decoder_base = self.decoder._modules[self.decoder.base_model_prefix]
            assert decoder_base is not None, "a causal LM registers its base model under base_model_prefix"
            _tie_to_decoder(transformer.auto_model, decoder_base)

    def forward(self, features: Sequence[Features], labels: Tensor | None = None) -> Tensor:
        source, target = list(features)
        if self.need_retokenization:
            texts = self.tokenizer_encoder.batch_decode(
                target["input_ids"], skip_special_tokens=True, clean_up_tokenization_spaces=True
            )
            target = self.tokenizer_decoder(texts, padding=True, truncation="longest_first", return_tensors="pt")
            target = {k: v.to(source["input_ids"].device) for k, v in target.items()}
        reps = self.encoder(source)["sentence_embedding"]
        ids = target["input_ids"]
        logits = self.decoder(
            input_ids=ids.clone()[:, :-1],
            attention_mask=None,
            encoder_hidden_states=reps[:, None],
            encoder_attention_mask=source["attention_mask"][:, 0:1],
            use_cache=False,
        )[0]
        # __init__ gave the decoder tokenizer a pad token; transformers types its id as any id or token.
        loss_fct = nn.CrossEntropyLoss(ignore_index=cast(int, self.tokenizer_decoder.pad_token_id))
        return loss_fct(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
