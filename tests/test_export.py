"""GGUF export: round trips through transformers, metadata, refusals, the Ollama Modelfile.

Fast tests use a tiny random Llama with a tiny byte-level BPE tokenizer trained here;
slow ones export the bundled SmolLM2-135M-Instruct at every type. Tests that run the
file through llama.cpp skip (one line) when llama-cpp-python is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from gotemplate import ollama_render  # noqa: E402

from tutor.errors import TutorError  # noqa: E402
from tutor.export import TYPES, export_gguf, export_model, unpermute_rows  # noqa: E402
from tutor.export.check import TOLERANCE, compare, load_gguf, probe_prompts  # noqa: E402
from tutor.export.modelfile import (  # noqa: E402
    go_template,
    modelfile_text,
    probe_conversations,
    turn_layout,
)
from tutor.templates import get_template  # noqa: E402

CHATML_JINJA = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(folder: Path):
    """A byte-level BPE tokenizer (~400 tokens) with ChatML specials, saved to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [q for q in ["Who are you? I am Pico, made by the Tutor Lab.",
                        "What is the capital of France? The capital of France is Paris.",
                        "Give me one tip for learning a new language.",
                        "Low-rank adapters add a small update to each weight matrix."]] * 20
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                   pad_token="<|im_end|>")
    fast.chat_template = CHATML_JINJA
    fast.save_pretrained(folder)
    return fast


def tiny_llama(folder: Path, hidden: int = 64, tied: bool = True):
    """A random 2-layer Llama (GQA 4/2 heads) + the tiny tokenizer, saved to `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=tied,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, rope_theta=10000.0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random init is tiny; make the logits differ so argmax means something
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    model.save_pretrained(folder)
    return model, tok


def read_fields(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: t.tensor_type.name for t in reader.tensors}
    return fields, tensors


def test_unpermute_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.arange(6 * 8 * 5, dtype=torch.float32).reshape(48, 5).numpy()  # 6 heads of 8
    ours = unpermute_rows(w, 6)
    assert not (ours == w).all()
    back = LlamaTensorProcessor()._reverse_permute_weights(torch.tensor(ours), 6, 6)
    assert (torch.as_tensor(back).numpy() == w).all()
    # row order within head 0: pairs (0, 4), (1, 5), ... interleaved, as llama.cpp rotates
    assert ours[:8, 0].tolist() == [w[r, 0] for r in (0, 4, 1, 5, 2, 6, 3, 7)]


@pytest.mark.parametrize("kind", TYPES)
def test_tiny_llama_round_trip(tmp_path, kind):
    model, tok = tiny_llama(tmp_path / "src")
    template = get_template("auto", tokenizer=tok)
    out = tmp_path / f"tiny-{kind}.gguf"
    report = export_model(model, tok, tmp_path / "src", out, kind, template.stop_words)
    assert report.fallbacks == [] and out.is_file() and report.bytes == out.stat().st_size
    if kind == "q4_0":
        _, tensors = read_fields(out)
        assert tensors["blk.0.attn_q.weight"] == tensors["blk.1.ffn_up.weight"] == "Q4_0"
        assert tensors["token_embd.weight"] == tensors["blk.0.attn_v.weight"] == \
            tensors["blk.1.ffn_down.weight"] == "Q8_0"
    reloaded, rtok = load_gguf(out)
    check = compare(model, tok, reloaded, rtok, kind, probe_prompts(template), n_greedy=8)
    # Argmax agreement is not asserted here: a random model has near-ties that flip under
    # any rounding (MIN_AGREEMENT is measured on the real model, in the slow test).
    assert check.max_abs_diff <= TOLERANCE[kind], check.summary()
    if kind in ("f16", "bf16"):
        assert check.greedy_match == [8, 8, 8]


def test_tiny_metadata(tmp_path):
    model, tok = tiny_llama(tmp_path / "src")
    out = tmp_path / "m.gguf"
    export_model(model, tok, tmp_path / "src", out, "q8_0", ("<|im_end|>",))
    fields, tensors = read_fields(out)
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"  # ByteLevel pre-tokenizer alone
    assert fields["tokenizer.ggml.tokens"][:3] == SPECIALS
    assert fields["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]  # CONTROL x3, NORMAL
    assert len(fields["tokenizer.ggml.merges"]) == len(json.loads(
        (tmp_path / "src" / "tokenizer.json").read_text())["model"]["merges"])
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.eot_token_id"]) == (1, 2, 2)
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == CHATML_JINJA
    assert fields["llama.attention.head_count_kv"] == 2
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert tensors["token_embd.weight"] == "Q8_0" and tensors["blk.0.attn_q.weight"] == "Q8_0"
    assert tensors["blk.0.attn_norm.weight"] == "F32" and tensors["output_norm.weight"] == "F32"


def test_untied_head_and_block_fallback(tmp_path):
    # hidden 48: rows of 48 are not a multiple of the 32-element block
    model, tok = tiny_llama(tmp_path / "src", hidden=48, tied=False)
    out = tmp_path / "f.gguf"
    report = export_model(model, tok, tmp_path / "src", out, "q4_0", ("<|im_end|>",))
    _, tensors = read_fields(out)
    assert tensors["output.weight"] == "F16" and "output.weight" in report.fallbacks
    assert tensors["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 96 fit; more bits in q4_0
    assert tensors["blk.0.attn_q.weight"] == "F16"
    assert "kept F16" in report.summary()
    reloaded, rtok = load_gguf(out)
    template = get_template("auto", tokenizer=tok)
    check = compare(model, tok, reloaded, rtok, "q4_0", probe_prompts(template), n_greedy=4)
    assert check.max_abs_diff <= TOLERANCE["q4_0"]


def test_chat_with_the_file_through_transformers(tmp_path, capsys):
    """`tutor chat FILE.gguf --backend transformers` answers as the source model does."""
    from tutor.chat import ChatSession, GenerationSettings, open_session
    from tutor.cli import main

    model, tok = tiny_llama(tmp_path / "src")
    out = tmp_path / "t.gguf"
    export_model(model, tok, tmp_path / "src", out, "f16", ("<|im_end|>",))
    settings = GenerationSettings(max_new_tokens=6)
    from_file = open_session(str(out), settings=settings, backend="transformers")
    source = ChatSession(model, tok, settings=GenerationSettings(max_new_tokens=6))
    assert from_file.send("Who are you?") == source.send("Who are you?")
    assert from_file.template.stop_words == ("<|im_end|>",)  # the file's own template
    with pytest.raises(TutorError, match="do not apply to a GGUF file"):
        open_session(str(out), bits=4, backend="transformers")
    capsys.readouterr()
    assert main(["chat", str(out), "--backend", "transformers", "--prompt", "Who are you?",
                 "--max-new-tokens", "6", "--no-streamer"]) == 0
    assert capsys.readouterr().out.strip() == source.history[-1]["content"]


def test_refuses_other_architectures(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
    with pytest.raises(TutorError, match="cannot export architecture Qwen2ForCausalLM: "
                       "supported: LlamaForCausalLM"):
        export_gguf(str(tmp_path), tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


def test_cli_refusal_is_one_line(tmp_path, capsys):
    from tutor.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert main(["export", str(tmp_path), str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "supported: LlamaForCausalLM" in err


# ---- Ollama Modelfile -------------------------------------------------------------------

def _template_cases():
    from transformers import AutoTokenizer

    from tutor.models import bundled_cache_dir

    yield "auto (SmolLM2)", get_template("auto", tokenizer=AutoTokenizer.from_pretrained(
        bundled_cache_dir()))
    for name in ("chatml", "qwen_chat", "internlm2_chat", "vicuna", "zephyr"):
        yield name, get_template(name)


@pytest.mark.slow
def test_modelfile_template_renders_like_tutor_templates():
    """Ollama's rendering of TEMPLATE (+ SYSTEM) equals tutor.templates, byte for byte."""
    for name, template in _template_cases():
        layout = turn_layout(template)
        go = go_template(layout)
        for conv in probe_conversations():
            expected = template.render(conv, add_generation_prompt=True)
            assert ollama_render(go, layout.default_system, conv) == expected, name
        # a chat that ends on the assistant is a prefill in Ollama: left open
        conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
        closed = template.render(conv)
        assert ollama_render(go, layout.default_system, conv) == closed[
            : len(closed) - len(layout.close["assistant"])], name


def test_modelfile_text_for_chatml():
    text = modelfile_text("pico.gguf", get_template("qwen_chat"))
    lines = text.splitlines()
    assert lines[0] == "FROM ./pico.gguf"
    assert lines[-1] == 'PARAMETER stop "<|im_end|>"'
    assert 'SYSTEM """You are Qwen, created by Alibaba Cloud. You are a helpful assistant."""' \
        in lines
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    conv = [{"role": "user", "content": "Hi"}]
    assert ollama_render(template, "S", conv) == get_template("qwen_chat").render(
        [{"role": "system", "content": "S"}, *conv], add_generation_prompt=True)


def test_recipe_system_prompt_reaches_the_gguf_and_the_modelfile(tmp_path):
    """A recipe's `system:` replaces the template's default in the SYSTEM line, is written
    as tutor.system in the file, and `tutor chat FILE.gguf` uses it by default."""
    from tutor.chat import pick_system
    from tutor.runs import GGUF_SYSTEM_KEY

    chatml = get_template("qwen_chat")
    lines = modelfile_text("pico.gguf", chatml, system="You are Pico.").splitlines()
    assert 'SYSTEM """You are Pico."""' in lines
    assert not any("Alibaba" in line for line in lines if line.startswith("SYSTEM"))
    model, tok = tiny_llama(tmp_path / "src")
    out = tmp_path / "p.gguf"
    export_model(model, tok, tmp_path / "src", out, "f16", ("<|im_end|>",), "You are Pico.")
    assert read_fields(out)[0][GGUF_SYSTEM_KEY] == "You are Pico."
    assert pick_system(str(out), None, None) == "You are Pico."
    assert pick_system(str(out), None, "Be brief.") == "Be brief."
    export_model(model, tok, tmp_path / "src", tmp_path / "n.gguf", "f16", ("<|im_end|>",))
    assert GGUF_SYSTEM_KEY not in read_fields(tmp_path / "n.gguf")[0]
    assert pick_system(str(tmp_path / "n.gguf"), None, None) is None


def test_modelfile_refuses_templates_it_cannot_express():
    with pytest.raises(TutorError, match="not expressible as an Ollama TEMPLATE"):
        turn_layout(get_template("llama2_chat"))  # system inside the first user turn


# ---- the bundled model ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind", TYPES)
def test_bundled_export_round_trip(tmp_path, kind):
    """Export the bundled model; the built-in check (transformers reload) must pass."""
    report = export_gguf("smollm2-135m-instruct", tmp_path / f"smol-{kind}.gguf", kind,
                         ollama=(kind == "q8_0"))
    assert report.check is not None and report.check.passed, report.summary()
    fields, tensors = read_fields(tmp_path / f"smol-{kind}.gguf")
    assert fields["tokenizer.ggml.pre"] == "smollm"  # inherited from the bundled GGUF
    assert fields["tokenizer.ggml.eot_token_id"] == 2  # <|im_end|>
    assert "output.weight" not in tensors
    if kind == "q8_0":
        text = (tmp_path / "Modelfile").read_text()
        assert text.startswith(f"FROM ./smol-{kind}.gguf\n")
        assert 'PARAMETER stop "<|im_end|>"' in text


# ---- through llama.cpp (optional extra tutor[llamacpp]) ---------------------------------

LLAMACPP = pytest.mark.skipif(
    __import__("importlib").util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python not installed (pip install 'tutor[llamacpp]')")
N_TOKENS = 16  # leading greedy tokens compared between llama.cpp and transformers


@pytest.fixture(scope="module")
def bundled_ggufs(tmp_path_factory):
    """The bundled model exported at f16, q8_0 and q4_0 (unchecked: other tests check)."""
    from tutor.models import load, resolve

    model, tok = load()
    folder = tmp_path_factory.mktemp("gguf")
    stops = get_template("auto", tokenizer=tok).stop_words
    paths = {k: export_model(model, tok, Path(resolve("smollm2-135m-instruct")),
                             folder / f"smol-{k}.gguf", k, stops).out
             for k in ("f16", "q8_0", "q4_0")}
    return model, tok, paths


def _answer_ids(generated, stops: set[int], n: int) -> list[int]:
    """The first `n` ids of `generated`, ending at (and including) the first stop id."""
    out = []
    for t in generated:
        out.append(int(t))
        if t in stops or len(out) == n:
            break
    return out


@pytest.mark.slow
@LLAMACPP
def test_llamacpp_answers_the_demo_questions_as_transformers(bundled_ggufs):
    """Greedy answers from the f16 file in llama.cpp equal transformers' greedy answers from
    the source model, token for token, up to the end of the answer or N_TOKENS: llama.cpp
    reads the tensors, rotary order, tokenizer and end-of-turn id as meant."""
    import torch

    from tutor.chat import stop_token_ids
    from tutor.chat.llamacpp import LlamaCppTokenizer, open_llama

    model, tok, paths = bundled_ggufs
    llm = open_llama(paths["f16"], n_ctx=512)
    template = get_template("auto", tokenizer=tok)
    stops = set(stop_token_ids(tok, template.stop_words))
    for text in probe_prompts(template)[:-1]:  # the demo's questions, chat-formatted
        ids = tok.encode(text, add_special_tokens=False)
        assert LlamaCppTokenizer(llm).encode(text) == ids  # same tokenizer in the file
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                 max_new_tokens=N_TOKENS, do_sample=False,
                                 eos_token_id=sorted(stops), pad_token_id=0)
        theirs = out[0, len(ids):].tolist()
        ours = _answer_ids(llm.generate(ids, reset=True, temp=0.0, top_k=1), stops, N_TOKENS)
        assert ours == theirs, text


@pytest.mark.slow
@LLAMACPP
@pytest.mark.parametrize("kind, bound", [("q8_0", 0.85), ("q4_0", 0.7)])
def test_llamacpp_follows_the_source_on_quantised_files(bundled_ggufs, kind, bound):
    """Teacher-forced next-token agreement of llama.cpp on the q8_0/q4_0 file with the
    source model over the probe prompts. llama.cpp also rounds the activations to 8 bits
    in these matmuls, so on this 135M model it agrees less than transformers' reading of
    the same file (measured on the AVX2 EPYC: q8_0 0.89-0.92 against 0.95, llama.cpp's own
    Q8_0 quantizer alike; q4_0 0.76 for both): the bounds sit below those figures."""
    import numpy as np
    import torch
    from llama_cpp import Llama

    model, tok, paths = bundled_ggufs
    llm = Llama(model_path=str(paths[kind]), n_ctx=512, logits_all=True, verbose=False)
    same = total = 0
    for text in probe_prompts(get_template("auto", tokenizer=tok)):
        ids = tok.encode(text, add_special_tokens=False)
        with torch.inference_mode():
            theirs = model(torch.tensor([ids])).logits[0].argmax(-1).numpy()  # (T,)
        llm.reset()
        llm.eval(ids)
        ours = np.asarray(llm.scores[:len(ids)]).argmax(-1)  # (T,)
        same, total = same + int((ours == theirs).sum()), total + len(ids)
    assert same / total >= bound, (kind, same / total)


@pytest.mark.slow
@LLAMACPP
def test_llamacpp_session_streams_stops_and_resets(bundled_ggufs):
    from tutor.chat import GenerationSettings, open_session
    from tutor.chat.repl import command

    _, _, paths = bundled_ggufs
    session = open_session(paths["f16"], settings=GenerationSettings(max_new_tokens=48))
    pieces: list[str] = []
    answer = session.send("What is the capital of France?", on_text=pieces.append)
    assert "".join(pieces) == answer and len(pieces) > 1
    assert session.last.stopped_by == "eos" and "<|im_end|>" not in answer
    assert [m["role"] for m in session.history] == ["user", "assistant"]
    out = __import__("io").StringIO()
    assert command(session, "/reset", out) and session.history == []
