"""What only the sentence-transformers engine does: agree with the library itself, run the same model on
onnxruntime, and fail fast with a clear message when the folder is not what it should be."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from lllmsd.config import ConfigError, parse_config
from lllmsd.core.jobs import EmbeddingJob
from lllmsd.engines.base import ModelFiles
from lllmsd.engines.sentence_transformers import SentenceTransformersEngine
from lllmsd.errors import ModelUnavailable
from tests.conftest import AppFactory, sdk
from tests.engines.conftest import EMBEDDING_MODELS, model_config
from tests.engines.test_embedding_contract import PARAPHRASE, folder_tokenizer
from tests.setup_models import model_path

pytestmark = pytest.mark.engines

SENTENCES = ("A man is eating food.", "Quarterly revenue grew by twelve percent.", "Two dogs play in the snow.")


def engine(model: dict[str, Any], folder: Path | None = None) -> SentenceTransformersEngine:
    config = model_config(model)
    return SentenceTransformersEngine(config, ModelFiles(folder or Path(model["location"])))


def embed(subject: SentenceTransformersEngine, *texts: str) -> np.ndarray:
    return np.asarray(subject.embed(EmbeddingJob(inputs=texts)).vectors)


@pytest.fixture(scope="module")
def torch_engine() -> SentenceTransformersEngine:
    return engine(EMBEDDING_MODELS["st-torch"]())


def test_torch_backend_gives_what_sentence_transformers_gives(torch_engine: SentenceTransformersEngine) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(model_path("minilm")), device="cpu", local_files_only=True)
    np.testing.assert_allclose(embed(torch_engine, *SENTENCES), reference.encode(list(SENTENCES)), atol=1e-5)
    assert torch_engine.dimension == reference.get_embedding_dimension()
    assert torch_engine.max_seq_length == reference.max_seq_length


def test_onnx_int8_backend_agrees_with_torch(torch_engine: SentenceTransformersEngine) -> None:
    onnx = engine(EMBEDDING_MODELS["st-onnx"]())
    try:
        ours, theirs = embed(onnx, *SENTENCES), embed(torch_engine, *SENTENCES)
    finally:
        onnx.close()
    assert ours.shape == theirs.shape
    agreement = (ours * theirs).sum(axis=1)  # both unit vectors: cosine per sentence
    assert (agreement > 0.99).all(), agreement


def test_a_missing_weights_file_fails_at_once_naming_the_folder(tmp_path: Path) -> None:
    for entry in model_path("minilm").iterdir():
        if entry.name != "model.safetensors":
            (tmp_path / entry.name).symlink_to(entry.resolve())
    with pytest.raises(ModelUnavailable, match=re.escape(str(tmp_path))):
        engine({**EMBEDDING_MODELS["st-torch"](), "location": str(tmp_path)}, tmp_path)


def test_a_location_that_is_not_a_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="is not one"):
        engine(EMBEDDING_MODELS["st-torch"](), tmp_path / "nowhere")


def test_onnx_without_file_name_says_which_files_there_are() -> None:
    model = {**EMBEDDING_MODELS["st-onnx"](), "file_name": None}
    with pytest.raises(ModelUnavailable, match=r"onnx/model\.onnx.*onnx/model_qint8\.onnx: choose one with file_name"):
        engine(model)


def test_onnx_needs_a_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "model.onnx").symlink_to((model_path("minilm-onnx") / "onnx" / "model_qint8.onnx").resolve())
    model = {**EMBEDDING_MODELS["st-onnx"](), "file_name": None, "location": str(tmp_path)}
    with pytest.raises(ModelUnavailable, match=r"tokenizer\.json"):
        engine(model)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"file_name": "onnx/model.onnx"}, "goes with backend: onnx"),
        ({"backend": "onnx", "file_name": "../elsewhere.onnx"}, "inside the model folder"),
        ({"backend": "tensorflow"}, "backend"),
    ],
)
def test_config_mistakes(options: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        model_config({**EMBEDDING_MODELS["st-torch"](), **options})


@pytest.mark.parametrize("name", ["st-torch", "st-onnx"])
async def test_the_official_sdk_against_the_real_model(start_app: AppFactory, name: str) -> None:
    """The whole daemon on the real model: what an OpenAI client sees."""
    model = EMBEDDING_MODELS[name]()
    # token ids in the model's own vocabulary, as this test sends them (the default reads cl100k ids)
    client = await start_app(parse_config({"models": {"minilm": {**model, "token_ids": "model"}}}))
    tokenize = folder_tokenizer(model)
    async with sdk(client) as api:
        default = await api.embeddings.create(model="minilm", input=list(PARAPHRASE))  # base64 on the wire
        floats = await api.embeddings.create(model="minilm", input=list(PARAPHRASE), encoding_format="float")
        short = await api.embeddings.create(model="minilm", input=PARAPHRASE[0], dimensions=64)
        ids = tokenize(PARAPHRASE[1].lower())
        by_ids = await api.embeddings.create(model="minilm", input=ids, encoding_format="float")
        with pytest.raises(openai.BadRequestError, match="385"):
            await api.embeddings.create(model="minilm", input="x", dimensions=385)
        with pytest.raises(openai.BadRequestError, match="vocabulary"):
            await api.embeddings.create(model="minilm", input=[[101, 999_999, 102]])
    assert [d.embedding for d in default.data] == [d.embedding for d in floats.data]
    bread, food, stocks = (np.asarray(d.embedding) for d in floats.data)
    assert bread @ food > bread @ stocks + 0.3
    assert default.usage.prompt_tokens == sum(len(tokenize(text)) for text in PARAPHRASE)
    vector = np.asarray(short.data[0].embedding)
    assert vector.shape == (64,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert np.asarray(by_ids.data[0].embedding) @ food > 0.999
    assert by_ids.usage.prompt_tokens == len(ids)
