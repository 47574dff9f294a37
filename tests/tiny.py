"""Tiny tokenizers and models that tests build themselves (no download), logit parity checks against
transformers (PyTorch), and a TensorBoard event reader: shared by several test modules."""

import os
import struct

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fusejax.models import ModelConfig, Transformer, load_pretrained, save_pretrained

PARITY_TOL = 1e-4  # max |logit difference| against transformers in float32
PARITY_VOCAB = 300  # not a multiple of 128: the embedding is padded to 384
PARITY_LENGTHS = (10, 7, 4, 1)  # right padding

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


def parity_batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ids, attention mask [len(PARITY_LENGTHS), max(PARITY_LENGTHS)] int32, right-padded with id 0."""
    T = max(PARITY_LENGTHS)
    ids = np.random.default_rng(seed).integers(3, PARITY_VOCAB, size=(len(PARITY_LENGTHS), T)).astype(np.int32)
    mask = (np.arange(T)[None, :] < np.asarray(PARITY_LENGTHS)[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, 0), mask


def hf_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A transformers model's float32 logits [B, T, V] without gradients."""
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    return out.logits.float().numpy()


def assert_close_at_tokens(ours, ref, mask):
    """Logits agree within PARITY_TOL at real (unpadded) tokens, over the reference's (unpadded) vocabulary."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    sel = mask.astype(bool)
    diff = np.abs(ours[..., :ref.shape[-1]][sel] - ref[sel]).max()
    assert diff <= PARITY_TOL, f"max abs logit difference {diff} > {PARITY_TOL}"


def save_random_hf_model(folder, config_cls, model_cls, kwargs: dict, seed: int = 0):
    """A random transformers model (eager attention, eval mode) with every weight perturbed (norms start at 1
    or 0 and biases at 0: perturbed so that their mapping is tested), saved to ``folder``; returned."""
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs, attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def check_load_parity(folder, ref: np.ndarray) -> None:
    """fusejax loads ``folder`` and gives the reference logits on :func:`parity_batch`; padded vocab is -inf."""
    ids, mask = parity_batch()
    model = load_pretrained(folder)
    logits = model(jnp.asarray(ids), jnp.asarray(mask))
    assert logits.dtype == jnp.float32 and logits.shape == (*ids.shape, model.config.padded_vocab_size)
    assert_close_at_tokens(logits, ref, mask)
    assert np.all(np.isneginf(np.asarray(logits)[..., PARITY_VOCAB:])), "padded vocab ids must have -inf logits"
    assert np.isfinite(np.asarray(logits)[..., :PARITY_VOCAB]).all()


def check_export_parity(folder, ref: np.ndarray, out, model_cls) -> None:
    """fusejax loads ``folder`` and saves it to ``out``; transformers loads that as ``model_cls`` with no
    missing, unexpected or mismatched tensors and gives the reference logits."""
    ids, mask = parity_batch()
    save_pretrained(load_pretrained(folder), out)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(hf) is model_cls
    assert_close_at_tokens(hf_logits(hf.eval(), ids, mask), ref, mask)
