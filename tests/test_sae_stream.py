"""Streaming SAE fitting: text sources, bounded buffers, resume, architectures and the probe hash."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmalign.config import ProbesConfig, RunConfig
from mmalign.io import stable_hash
from mmalign.lm import LanguageModel
from mmalign.probes.corpus import TextSource, iter_texts, open_text_sources
from mmalign.probes.sae import FIT_SUMMARY, collect_text_activations, fit_sae, fit_sae_probes, hook_name
from mmalign.probes.sae_stream import STATE_FILE, StreamingSaeFitter, TokenStream

LAYERS = [0, 2]
WORDS = ["red", "small", "quiet", "wooden", "bright", "old", "round", "heavy", "striped", "paper"]
THINGS = ["boat", "house", "dog", "lamp", "tree", "clock", "kite", "chair", "drum", "star"]


def _texts(n: int) -> list[str]:
    """Return n distinct short sentences of varying length."""
    return [f"A {WORDS[i % 10]} {THINGS[(i // 10) % 10]} " + "and more " * (i % 4) + f"number {i}." for i in range(n)]


@pytest.fixture(scope="module")
def tiny_lm(smollm2):
    """A randomly initialized 3-layer Llama (d_model 32) with SmolLM2's tokenizer."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm2.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return LanguageModel("tiny-llama", model, smollm2.tokenizer)


def _config(**overrides) -> ProbesConfig:
    settings = {"d_sae": 32, "steps": 24, "batch_tokens": 64, "lr": 3e-3, "max_text_tokens": 16,
                "lm_batch_size": 8, "checkpoint_every": 5}
    return ProbesConfig(**{**settings, **overrides})


def _metadata(lm: LanguageModel, layers: list[int]) -> dict[int, dict[str, object]]:
    return {layer: {"model_name": lm.lm_id, "hook_name": hook_name(layer)} for layer in layers}


def _weights(probes) -> dict[str, torch.Tensor]:
    return {f"{layer}.{name}": value for layer, sae in probes.items() for name, value in sae.state_dict().items()}


def _assert_same_weights(a, b) -> None:
    left, right = _weights(a), _weights(b)
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


# --- streaming fit ------------------------------------------------------------------------


def test_stream_matches_in_memory_fit(tiny_lm, tmp_path):
    texts = _texts(60)
    config = _config()
    probes = fit_sae_probes(tiny_lm, texts, LAYERS, config, seed=3, directory=tmp_path)
    activations = collect_text_activations(tiny_lm, texts, LAYERS, config.lm_batch_size, config.max_text_tokens)
    for layer in LAYERS:
        expected = fit_sae(activations[layer], config, 3 + layer, _metadata(tiny_lm, [layer])[layer])
        for name, value in expected.state_dict().items():
            assert torch.equal(probes[layer].state_dict()[name], value), (layer, name)
    summary = json.loads((tmp_path / FIT_SUMMARY).read_text())
    assert summary["n_fit_texts"] == 60
    assert summary["n_tokens_read"] == activations[0].shape[0]
    assert not (tmp_path / STATE_FILE).exists()


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_each_architecture_fits_through_refilled_buffer(tiny_lm, architecture):
    texts = _texts(40)
    config = _config(architecture=architecture, k=4, buffer_tokens=96, steps=30, batch_tokens=32)
    fitter = StreamingSaeFitter(tiny_lm, LAYERS, config, seed=0, metadata=_metadata(tiny_lm, LAYERS))
    saes = fitter.fit([TextSource("texts", lambda: iter(texts))])
    corpus = collect_text_activations(tiny_lm, texts, LAYERS, 8, config.max_text_tokens)
    assert fitter.peak_buffer_rows_ <= 96
    assert fitter.n_tokens_read_ > corpus[0].shape[0]  # the stream was read more than once
    assert fitter.n_fit_texts_ == 40
    for layer, sae in saes.items():
        x = corpus[layer]
        with torch.no_grad():
            latents = sae.encode(x)
            reconstruction = sae.decode(latents)
        fvu = ((x - reconstruction) ** 2).sum() / ((x - x.mean(dim=0)) ** 2).sum()
        assert fvu < 1.0, (layer, float(fvu))
        if architecture == "topk":
            assert (latents != 0).sum(dim=1).max() <= 4


def test_buffer_stays_bounded_when_corpus_doubles(tiny_lm, tmp_path):
    peaks = {}
    for n_texts in (80, 160):
        path = tmp_path / f"corpus_{n_texts}.txt"
        path.write_text("\n\n".join(_texts(n_texts)) + "\n", encoding="utf-8")
        sources = open_text_sources([f"file:{path}"], wordnet_count=0, seed=0, captions=[])
        config = _config(buffer_tokens=128, steps=40, batch_tokens=32)
        fitter = StreamingSaeFitter(tiny_lm, LAYERS, config, seed=0, metadata=_metadata(tiny_lm, LAYERS))
        fitter.fit(sources)
        peaks[n_texts] = fitter.peak_buffer_rows_
        assert fitter.n_tokens_read_ > 2 * 128  # several fills, so the buffer was reused, not grown
    assert max(peaks.values()) <= 128
    assert peaks[160] <= peaks[80] + 16  # one text more or less at the edge of a fill, no growth with the corpus


def test_token_stream_fill_is_fixed_by_its_start(tiny_lm):
    sources = [TextSource("texts", lambda: iter(_texts(30)))]
    stream = TokenStream(sources, tiny_lm.tokenizer, max_text_tokens=16)
    stream.fill(60, wrap=True)
    start = (stream.epoch, stream.position)
    expected, _ = stream.fill(60, wrap=True)
    again = TokenStream(sources, tiny_lm.tokenizer, max_text_tokens=16)
    again.seek(*start)
    assert again.fill(60, wrap=True)[0] == expected
    assert sum(len(ids) for ids in expected) <= 60


def test_empty_stream_is_an_error(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="'blank'\\] give no tokens"):
        fit_sae_probes(tiny_lm, [TextSource("blank", lambda: iter(["", ""]))], LAYERS, _config(), 0, tmp_path)


def test_single_token_stream_is_an_error(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="rows of the first buffer are all equal"):
        fit_sae_probes(tiny_lm, ["cat"], LAYERS, _config(), 0, tmp_path)


# --- resume -------------------------------------------------------------------------------


class _Interrupt(Exception):
    pass


def _stop_at(step_to_stop: int):
    def on_step(step: int) -> None:
        if step == step_to_stop:
            raise _Interrupt(step)

    return on_step


@pytest.mark.parametrize("buffer_tokens", [65536, 96], ids=["whole-corpus", "refilled"])
def test_interrupted_fit_resumes_to_the_same_weights(tiny_lm, tmp_path, buffer_tokens):
    texts = _texts(40)
    config = _config(buffer_tokens=buffer_tokens, steps=23, batch_tokens=32, architecture="topk", k=4)
    reference = fit_sae_probes(tiny_lm, texts, LAYERS, config, 1, tmp_path / "reference")

    directory = tmp_path / "interrupted"
    with pytest.raises(_Interrupt):
        fit_sae_probes(tiny_lm, texts, LAYERS, config, 1, directory, on_step=_stop_at(13))
    state = torch.load(directory / STATE_FILE, weights_only=True)
    assert state["step"] == 10  # the last multiple of checkpoint_every before the interruption
    assert not list(directory.glob("layer_*"))

    fitter_steps = []
    resumed = fit_sae_probes(tiny_lm, texts, LAYERS, config, 1, directory, on_step=fitter_steps.append)
    assert fitter_steps[0] == 11  # steps 1..10 were not repeated
    _assert_same_weights(reference, resumed)
    assert not (directory / STATE_FILE).exists()


def test_finished_layers_are_loaded_not_refitted(tiny_lm, tmp_path):
    texts = _texts(30)
    config = _config(steps=6)
    first = fit_sae_probes(tiny_lm, texts, LAYERS, config, 0, tmp_path)
    again = fit_sae_probes(tiny_lm, texts, LAYERS, config, 0, tmp_path, on_step=_stop_at(1))  # would raise if fitting
    _assert_same_weights(first, again)


def test_state_of_other_settings_is_not_resumed(tiny_lm, tmp_path, caplog):
    texts = _texts(30)
    with pytest.raises(_Interrupt):
        fit_sae_probes(tiny_lm, texts, LAYERS, _config(steps=12), 0, tmp_path, on_step=_stop_at(7))
    assert (tmp_path / STATE_FILE).exists()
    steps = []
    fit_sae_probes(tiny_lm, texts, LAYERS, _config(steps=12, lr=1e-3), 0, tmp_path, on_step=steps.append)
    assert steps[0] == 1
    assert "saved for other settings" in caplog.text


# --- text sources -------------------------------------------------------------------------


def test_file_source_reads_non_empty_lines_lazily(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first text\n\n  \nsecond text  \nthird\n", encoding="utf-8")
    sources = open_text_sources([f"file:{path}", "captions"], wordnet_count=0, seed=0, captions=["a caption"])
    assert list(iter_texts(sources)) == ["first text", "second text", "third", "a caption"]
    assert list(iter_texts(sources, max_texts=2)) == ["first text", "second text"]
    assert list(iter_texts(sources)) == ["first text", "second text", "third", "a caption"]  # read again from the start
    assert str(path.resolve()) in sources[0].fingerprint


def test_default_sources_keep_wordnet_then_captions(tmp_path):
    root = tmp_path / "wordnet"
    root.mkdir()
    for name in ("data.noun", "data.verb", "data.adj", "data.adv"):
        (root / name).write_text(f"00001 03 n 01 x 0 000 | a gloss from {name}\n", encoding="utf-8")
    sources = open_text_sources(["wordnet", "captions"], wordnet_count=2, seed=0, captions=["cap one", "cap two"],
                                wordnet_root=root)
    texts = list(iter_texts(sources))
    assert len(texts) == 4
    assert texts[2:] == ["cap one", "cap two"]
    assert all(text.startswith("A gloss from data.") for text in texts[:2])
    only_captions = open_text_sources(["wordnet", "captions"], wordnet_count=0, seed=0, captions=["cap"])
    assert [source.name for source in only_captions] == ["captions"]


@pytest.mark.parametrize(
    ("specs", "error", "match"),
    [
        (["file:{tmp}/missing.txt"], FileNotFoundError, "no file at .*missing.txt"),
        (["file:{tmp}/empty.txt"], ValueError, "has no non-empty lines"),
        (["wiki"], ValueError, "'wiki' is not a text source; accepted: wordnet"),
        (["captions"], ValueError, "training split has no captions"),
        (["wordnet"], ValueError, "gives no texts; add a source"),
        (["hf:{tmp}/no_dataset"], FileNotFoundError, "no dataset folder at"),
        (["file:{tmp}/latin1.txt"], ValueError, "is not UTF-8"),
    ],
)
def test_bad_text_sources_rejected(tmp_path, specs, error, match):
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(error, match=match):
        sources = open_text_sources([spec.format(tmp=tmp_path) for spec in specs], wordnet_count=0, seed=0, captions=[])
        list(iter_texts(sources))


def test_hf_dataset_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"text": ["alpha", "", "beta"], "caption": ["c1", "c2", None], "label": [1, 2, 3]})
    data.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(str(tmp_path / "with_train"))
    datasets.DatasetDict({"validation": data, "test": data}).save_to_disk(str(tmp_path / "no_train"))

    def read(spec: str) -> list[str]:
        return list(iter_texts(open_text_sources([spec], wordnet_count=0, seed=0, captions=[])))

    assert read(f"hf:{tmp_path}/single") == ["alpha", "beta"]
    assert read(f"hf:{tmp_path}/single:caption") == ["c1", "c2"]
    assert read(f"hf:{tmp_path}/with_train") == ["alpha", "beta"]
    with pytest.raises(ValueError, match=r"no column 'body'; its columns are \['text', 'caption', 'label'\]"):
        read(f"hf:{tmp_path}/single:body")
    with pytest.raises(ValueError, match=r"splits \['test', 'validation'\] and no 'train' split"):
        read(f"hf:{tmp_path}/no_train")
    with pytest.raises(ValueError, match="contains int values, not text"):
        read(f"hf:{tmp_path}/single:label")


# --- config and provenance ----------------------------------------------------------------


def test_default_probe_settings_hash_as_before():
    # Values computed with ProbesConfig().model_dump() before the streaming fields existed.
    assert stable_hash(ProbesConfig().hash_fields()) == "3ddcc5808a1a1a8d"
    assert stable_hash(ProbesConfig(architecture="topk", k=16, layers=[3, 6]).hash_fields()) == "f2343773b7152020"
    assert stable_hash(ProbesConfig(buffer_tokens=4096).hash_fields()) != "3ddcc5808a1a1a8d"
    assert stable_hash(ProbesConfig(text_sources=["captions"]).hash_fields()) != "3ddcc5808a1a1a8d"


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"text_sources": []}, "empty list"),
        ({"text_sources": ["wordnet", "books"]}, "'books' is not a text source"),
        ({"text_sources": ["file:"]}, "'file:' is not a text source"),
        ({"buffer_tokens": 32, "max_text_tokens": 48}, "cannot hold one text"),
    ],
)
def test_probe_config_rejects_bad_streaming_settings(settings, match):
    with pytest.raises(ValueError, match=match):
        ProbesConfig(**settings)


class _Dataset:
    name, skipped = "stub", {}

    def fingerprint(self) -> str:
        return "stub"

    def __len__(self) -> int:
        return 2


def test_manifest_records_architecture_and_text_sources(tiny_lm, tmp_path):
    from mmalign.pipeline import build_manifest

    config = RunConfig(probes={"architecture": "topk", "k": 16, "text_sources": ["captions", "file:corpus.txt"]})
    context = SimpleNamespace(config=config, dataset=_Dataset(), train_rows=[0], val_rows=[1], lm=tiny_lm,
                              encoder=SimpleNamespace(describe=lambda: {"id": "encoder"}))
    manifest = build_manifest(context, tmp_path, 5, {})
    assert manifest["probes"]["architecture"] == "topk (k=16)"
    assert manifest["probes"]["text_sources"] == ["captions", "file:corpus.txt"]
    assert manifest["probes"]["n_fit_texts"] == 5
    standard = build_manifest(SimpleNamespace(**{**vars(context), "config": RunConfig()}), tmp_path, 5, {})
    assert standard["probes"]["architecture"] == "standard (ReLU, L1)"
