"""The hidden-state teacher path (output layer applied in chunks) equals the full-logits path on
small random models of every verified architecture, for every loss kind."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mlot_ds.config import TeacherConfig
from mlot_ds.losses import METHODS, MethodContext, TeacherView
from mlot_ds.losses.mlot import MlotParams
from mlot_ds.losses.official import OfficialParams
from mlot_ds.pairing import ModelBatch, position_pairing
from mlot_ds.teachers import chunked
from mlot_ds.teachers.pool import Teacher, TeacherPool

VOCAB, STUDENT_VOCAB = 211, 90


def tiny_model(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=16, num_attention_heads=2)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=64))
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, intermediate_size=32, num_hidden_layers=1, num_key_value_heads=1,
                                            tie_word_embeddings=False))
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, intermediate_size=32, num_hidden_layers=1, num_key_value_heads=1,
                                            tie_word_embeddings=True))
    if kind == "opt":
        return OPTForCausalLM(OPTConfig(**common, ffn_dim=32, num_hidden_layers=1, word_embed_proj_dim=16,
                                        max_position_embeddings=64))
    return GPTNeoForCausalLM(GPTNeoConfig(vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2,
                                          attention_types=[[["global"], 1]], max_position_embeddings=64))


def batch():
    gen = torch.Generator().manual_seed(1)
    lengths = [17, 11, 20]
    input_ids = torch.randint(0, VOCAB, (3, 20), generator=gen)
    attention = torch.zeros(3, 20, dtype=torch.long)
    labels = torch.full((3, 20), -100)
    for b, (length, prompt) in enumerate(zip(lengths, [5, 2, 9])):
        attention[b, :length] = 1
        labels[b, prompt:length] = input_ids[b, prompt:length]
    return ModelBatch(input_ids, attention, labels)


LOSSES = {
    "mlot-default": ("mlot", MlotParams(k=9)),
    "mlot-official": ("official", OfficialParams(k=9)),
    "uld": ("uld", None),
    "mined": ("mined", None),
}


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "opt"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_hidden_path_equals_full_logits(kind, loss):
    model = tiny_model(kind).eval()
    assert chunked.unsupported_reason(model) is None
    student_to_teacher = torch.randint(0, VOCAB, (STUDENT_VOCAB,), generator=torch.Generator().manual_seed(2))
    name, params = LOSSES[loss]
    method = METHODS[name](params, None, MethodContext(student_to_teacher=student_to_teacher if loss == "mined" else None))
    inputs = batch()
    student_labels = inputs.labels.clone()
    student_labels[1, 9:] = -100  # fewer student answer tokens: unequal pair counts
    pairing = position_pairing(student_labels, inputs.labels)
    view = TeacherView(pairing, ModelBatch(inputs.input_ids, inputs.attention_mask, student_labels), inputs)
    config = TeacherConfig(name=kind)
    pool = TeacherPool([Teacher(kind, config, model, "", hidden_path=False),
                        Teacher(kind, config, model, "", hidden_path=True)], torch.device("cpu"))
    (full, full_gold), (chunk, chunk_gold) = [pool.run(t, view, method, gold=True) for t in pool]
    if loss.startswith("mlot"):
        assert torch.equal(full.indices, chunk.indices)
        torch.testing.assert_close(chunk.values, full.values)
    else:
        torch.testing.assert_close(chunk, full, rtol=1e-5, atol=1e-5)
        expected_width = len(torch.unique(student_to_teacher)) if loss == "mined" else VOCAB
        assert chunk.shape == (*pairing.mask.shape, expected_width)
    for key in ("ce", "tokens"):
        torch.testing.assert_close(chunk_gold[key], full_gold[key], rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(model.get_output_embeddings())  # restored after the forward


def test_the_output_layer_is_restored_when_the_forward_fails():
    model = tiny_model("llama").eval()
    bad = torch.full((1, 4), VOCAB + 5)  # out of the embedding's range
    with pytest.raises(IndexError):
        chunked.final_hidden_states(model, bad, torch.ones_like(bad))
    assert "forward" not in vars(model.lm_head)
    inputs = batch()
    assert model(input_ids=inputs.input_ids).logits.shape == (3, 20, VOCAB)


def test_hidden_states_are_what_the_output_layer_turns_into_logits():
    model = tiny_model("opt").eval()
    inputs = batch()
    hidden = chunked.final_hidden_states(model, inputs.input_ids, inputs.attention_mask)
    with torch.no_grad():
        logits = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).logits
    torch.testing.assert_close(model.lm_head(hidden), logits)


def test_unknown_architecture_falls_back_to_full_logits_with_one_warning(tmp_path):
    neo = tiny_model("gpt_neo")
    assert "gpt_neo" in chunked.unsupported_reason(neo)
    neo.save_pretrained(tmp_path / "neo")
    tiny_model("llama").save_pretrained(tmp_path / "llama")
    configs = [TeacherConfig(name="neo", placement="replicate"), TeacherConfig(name="llama", placement="replicate")]
    with pytest.warns(UserWarning, match=r"teachers\[0\] \(neo\): chunked_logits falls back to full logits") as caught:
        pool = TeacherPool.load(configs, [str(tmp_path / "neo"), str(tmp_path / "llama")], {}, 2, torch.device("cpu"))
    assert len([w for w in caught if "falls back" in str(w.message)]) == 1
    assert [t.hidden_path for t in pool] == [False, True]
    off = [TeacherConfig(name="llama", placement="replicate", chunked_logits=False)]
    assert [t.hidden_path for t in TeacherPool.load(off, [str(tmp_path / "llama")], {}, 2, torch.device("cpu"))] == [False]
