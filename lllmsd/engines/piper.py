"""Text to speech on Piper (piper-tts: VITS voices in ONNX, phonemized by its bundled espeak-ng).

A voice is two files: ``NAME.onnx`` and ``NAME.onnx.json`` beside it (its sample rate, phonemes,
speakers and default noise and length scales). A model's source is the ``.onnx`` file, or a folder that
holds one voice: what the store fetches from a repository laid out like rhasspy/piper-voices with
``allow_patterns: [en/en_US/joe/medium/*]``.

The onnxruntime session is built here, not by ``PiperVoice.load``, which cannot set threads:
``device.threads`` is the session's intra-op thread count (null: onnxruntime's default, one per core),
with one inter-op thread (a VITS graph has little to run in parallel).

The text arrives split into sentences by lllmsd (core/sentences.py), none longer than its bound: Piper's
memory grows with what it synthesizes at once. Each sentence is synthesized, yielded, and encoded by the
base class while the client receives it; ``cancel`` is checked between sentences, so a client that goes
away frees the instance within one sentence. Piper is deterministic only with both noise scales at 0.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
from piper import PiperConfig, PiperVoice, SynthesisConfig

from lllmsd.config import ModelBase, PiperModelConfig
from lllmsd.core.jobs import SpeechJob
from lllmsd.engines.base import ModelFiles, SpeechEngine
from lllmsd.engines.tempo import change_tempo
from lllmsd.errors import ModelUnavailable


class PiperEngine(SpeechEngine):
    name = "piper"
    features = frozenset()

    def __init__(self, config: PiperModelConfig, files: ModelFiles) -> None:
        super().__init__(config, files)
        model, voice_json = voice_files(files.path)
        try:
            piper_config = PiperConfig.from_dict(json.loads(voice_json.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError) as exc:
            raise ModelUnavailable(f"{voice_json} is not a Piper voice config ({type(exc).__name__}: {exc})") from None
        self.voice = PiperVoice(session=build_session(model, config.device.threads), config=piper_config)
        self.sample_rate = piper_config.sample_rate
        for name, voice in config.voices.items():  # a speaker the voice does not have fails the load, not a request
            self._speaker_id(voice.speaker, f"voices.{name}.speaker")

    @classmethod
    def config_problems(cls, config: ModelBase) -> list[tuple[str, str]]:
        # one file from the hub would arrive without the .onnx.json that must sit beside it
        if config.url is not None:
            return [("url", "a Piper voice is two files (.onnx and .onnx.json): use repo with allow_patterns")]
        if config.repo is not None and config.file is not None:
            return [("file", f"a Piper voice is two files: use allow_patterns: ['{config.file}*'] instead of file")]
        return []

    def close(self) -> None:
        self.voice = None  # type: ignore[assignment]

    def synthesize(self, job: SpeechJob, cancel: threading.Event) -> Iterator[np.ndarray]:
        voice = self.voice
        options = SynthesisConfig(
            speaker_id=self._speaker_id(job.speaker, "voice"),
            length_scale=voice.config.length_scale,  # speed is applied after: see engines/tempo.py
            noise_scale=self.config.noise_scale,
            noise_w_scale=self.config.noise_w_scale,
        )
        silence = np.zeros(round(self.config.sentence_silence * self.sample_rate / job.speed), dtype=np.int16)
        for sentence in job.sentences:
            for chunk in voice.synthesize(sentence, syn_config=options):  # one chunk per sentence Piper finds
                if cancel.is_set():
                    return
                yield change_tempo(chunk.audio_int16_array, self.sample_rate, job.speed)
            if silence.size:
                yield silence
            if cancel.is_set():
                return

    def _speaker_id(self, speaker: int | str | None, where: str) -> int | None:
        """A configured speaker as the voice's speaker id (None: the voice's default)."""
        voice_config = self.voice.config
        if speaker is None:
            return None
        if isinstance(speaker, str):
            if speaker not in voice_config.speaker_id_map:
                known = ", ".join(sorted(voice_config.speaker_id_map)) or "none: it has one speaker"
                raise ModelUnavailable(f"{where}: the voice has no speaker named '{speaker}' (it has {known})")
            return int(voice_config.speaker_id_map[speaker])
        if not 0 <= speaker < max(voice_config.num_speakers, 1):
            raise ModelUnavailable(
                f"{where}: speaker {speaker} is not one of the voice's {voice_config.num_speakers} (0 to "
                f"{max(voice_config.num_speakers, 1) - 1})"
            )
        return speaker if voice_config.num_speakers > 1 else None


def voice_files(path: Path | None) -> tuple[Path, Path]:
    """The voice's ``.onnx`` and its ``.onnx.json``, from the file itself or a folder holding one voice."""
    if path is None:
        raise ModelUnavailable("piper needs a voice: an .onnx file with its .onnx.json beside it")
    model = path
    if path.is_dir():
        found = sorted(p for p in path.rglob("*.onnx") if p.is_file())
        if len(found) != 1:
            listed = ", ".join(str(p.relative_to(path)) for p in found[:5]) or "none"
            raise ModelUnavailable(
                f"{path} must hold exactly one Piper voice (.onnx), it holds {len(found)} ({listed}): "
                "point the model at one .onnx, or narrow allow_patterns"
            )
        model = found[0]
    voice_json = model.with_name(model.name + ".json")
    if not voice_json.is_file():
        raise ModelUnavailable(f"the Piper voice {model.name} needs its config {voice_json.name} beside it")
    return model, voice_json


def build_session(model: Path, threads: int | None) -> Any:
    """An onnxruntime CPU session for the voice, on ``threads`` intra-op threads (None: onnxruntime's
    default). What ``PiperVoice.load`` does, with the thread counts it cannot set."""
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        return onnxruntime.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own kinds for a file that is not a model
        raise ModelUnavailable(f"{model} is not an ONNX voice onnxruntime can load ({type(exc).__name__})") from None
