"""Tiny tokenizers and models that tests build themselves (no download), parity helpers against transformers
(PyTorch) and a TensorBoard event reader: shared by several test modules."""

import os
import struct

import numpy as np
import torch
import transformers
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fusejax.models import ModelConfig, Transformer, save_pretrained

# per-architecture options of a tiny ModelConfig (Llama-style needs none)
ARCH_OPTIONS = {
    "llama": {},
    "gpt_neox": dict(norm="layer", norm_bias=True, parallel_residual=True, rotary_dim=4, mlp="plain",
                     activation="gelu", attention_bias=True, mlp_bias=True),
    "mpt": dict(norm="layer", position="alibi", mlp="plain", activation="gelu"),
    "gpt2": dict(norm="layer", norm_bias=True, position="learned", mlp="plain", activation="gelu_new",
                 attention_bias=True, mlp_bias=True, tie_embeddings=True),
}


def bpe_tokenizer(kind: str, vocab: int, texts: list[str]) -> transformers.PreTrainedTokenizerFast:
    """A BPE trained on ``texts``: byte-level ("Ġ", ``kind="bytelevel"``) or Metaspace ("▁", ``"metaspace"``),
    with <unk>, <s> (BOS) and </s> (EOS)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>" if kind == "metaspace" else None))
    if kind == "bytelevel":
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        alphabet = []
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=alphabet))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


def save_tiny_model(folder, arch: str, vocab: int, seed: int, *, eos_token_id: int, intermediate_size: int = 64):
    """A random 2-layer, 32-wide model of ``arch`` written to ``folder`` as a Hugging Face folder."""
    cfg = ModelConfig(arch=arch, vocab_size=vocab, hidden_size=32, intermediate_size=intermediate_size, num_layers=2,
                      num_heads=4, max_position_embeddings=256, eos_token_id=eos_token_id, **ARCH_OPTIONS[arch])
    save_pretrained(Transformer(cfg, rngs=nnx.Rngs(seed)), folder)


def random_hf_model(config_cls, model_cls, kwargs: dict, seed: int = 0):
    """A random tiny transformers model in eval mode (eager attention) whose every weight is perturbed: norms
    start at 1 and biases at 0, so that their mapping is tested."""
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs, attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def padded_batch(vocab: int, lengths: tuple[int, ...], seed: int = 0):
    """(ids, mask) [len(lengths), max(lengths)] int32: random ids in [3, vocab), right-padded with id 0."""
    T = max(lengths)
    ids = np.random.default_rng(seed).integers(3, vocab, size=(len(lengths), T)).astype(np.int32)
    mask = (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, 0), mask


def hf_logits(model, ids, mask) -> np.ndarray:
    """A transformers model's float32 logits [B, T, V] on a numpy batch."""
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    return out.logits.float().numpy()


def assert_close_at_tokens(ours, ref, mask, tol: float = 1e-4):
    """max |ours - ref| <= tol over the real tokens (mask 1), on the reference's vocabulary columns."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    sel = mask.astype(bool)
    diff = np.abs(ours[..., :ref.shape[-1]][sel] - ref[sel]).max()
    assert diff <= tol, f"max abs logit difference {diff} > {tol}"


def read_events(folder):
    """{tag: [(step, value)]} from the TensorBoard event files in ``folder`` (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for name in sorted(os.listdir(folder)):
        data = (folder / name).read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out
