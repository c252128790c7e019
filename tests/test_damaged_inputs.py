"""Damaged input files give one clear error naming the file (and the line where there is one),
not a library's raw exception (issue 24, item 3). Truncated safetensors checkpoints are
covered in tests/llm_rl/test_models_checkpoint_errors.py, torn metrics.jsonl lines in
tests/trainkit/test_run.py, corrupt checkpoints in tests/experiments/test_cli_errors.py."""

import json

import numpy as np
import pytest

from trainkit.checkpoint import CheckpointError


def _truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_tokenizer_json_names_the_file_and_line(tmp_path):
    from llm_rl.tokenization import TokenizerError, char_tokenizer, load_tokenizer, save_tokenizer

    save_tokenizer(char_tokenizer(), tmp_path)
    load_tokenizer(tmp_path)  # intact: loads
    _truncate(tmp_path / "tokenizer.json")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: line \d+: not valid JSON.*damaged"):
        load_tokenizer(tmp_path)


def test_truncated_minilm_tokenizer_json_names_the_file(tmp_path):
    from audio.minilm import load_tokenizer

    (tmp_path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"vocab": {}}})[:-9])
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: line 1: not valid JSON"):
        load_tokenizer(tmp_path)


def test_torn_jsonl_data_file_names_the_file_and_line(tmp_path):
    from llm_rl.tasks import DataFormatError, load_jsonl

    path = tmp_path / "train.jsonl"
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_jsonl(path, "gsm8k")) == 3
    path.write_text(path.read_text()[:-20])  # a copy cut off inside the third record
    with pytest.raises(DataFormatError, match=r"train\.jsonl: line 3: invalid JSON"):
        load_jsonl(path, "gsm8k")


def test_truncated_wav_header_names_the_file(tmp_path):
    from audio.frontend import read_audio, write_audio

    path = tmp_path / "clip.wav"
    write_audio(path, np.zeros(1600, np.float32), 16000)
    _truncate(path, keep=30 / path.stat().st_size)  # inside the header
    with pytest.raises(ValueError, match=r"clip\.wav: cannot read audio"):
        read_audio(path)


def test_truncated_midi_names_the_file(tmp_path):
    import pretty_midi

    from audio.music.data import piece_from_midi

    midi = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(0)
    piano.notes.append(pretty_midi.Note(80, 60, 0.0, 1.0))
    midi.instruments.append(piano)
    path = tmp_path / "tune.mid"
    midi.write(str(path))
    _truncate(path)
    with pytest.raises(ValueError, match=r"tune\.mid: not a readable MIDI file"):
        piece_from_midi(path)
