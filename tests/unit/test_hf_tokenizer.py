# The tokenizer of a Hugging Face export (mgt_scale/hf/tokenizer_json.py), loaded with AutoTokenizer,
# encodes and decodes like our SentencePiece tokenizer (mgt_scale/data/tokenizer.py): whitespace runs,
# tabs, newlines, unicode, characters outside the vocabulary (byte fallback), the unknown and EOS ids,
# and "</s>" written in a text (text, not EOS). BPE (mgt prep's default) also on 300 stdlib files.
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from hf_helpers import stdlib_texts, train_small_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow  # trains SentencePiece tokenizers (seconds each)

SAMPLE = [
    "def f(x):\n    return x  # comment\n",
    "  leading, trailing and double  spaces  ",
    "\t\ttabs\tand\r\nCRLF\n\n\nblank lines\n",
    "        deep = {\n            'k': [1, 2, 3],\n        }\n",
    "héllo wörld, ∑ αβγ, 日本語のテキスト, emoji 🙂🚀, nbsp\u00a0zwsp\u200b",
    "</s> <unk> <0x41> \u2581x",
    "",
    " ",
    "x" * 500,
]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def pair(request, tmp_path_factory):
    from transformers import AutoTokenizer
    from mgt_scale.hf.tokenizer_json import write_tokenizer
    d = tmp_path_factory.mktemp(request.param)
    ours = train_small_tokenizer(d / "tokenizer.model", request.param)
    write_tokenizer(d / "tokenizer.model", d, 128)
    return request.param, ours, AutoTokenizer.from_pretrained(str(d))


def test_sample_encodes_and_decodes_alike(pair):
    kind, ours, hf = pair
    for text in SAMPLE:
        ids = ours.encode(text)
        assert hf.encode(text) == ids == hf(text)["input_ids"], (kind, text)
        assert hf.decode(ids) == ours.decode(ids) == text.replace("\u2581", " "), (kind, text)
    # characters outside the vocabulary went through byte pieces, as SentencePiece's byte fallback
    assert any(hf.convert_ids_to_tokens(i).startswith("<0x") for i in hf.encode("🙂🚀 日本語"))


def test_special_ids_decode_alike(pair):
    kind, ours, hf = pair
    assert hf.eos_token_id == ours.eos_id and hf.bos_token_id is None and hf.unk_token_id == 0
    for ids in ([0], [ours.eos_id], [0, 40, ours.eos_id, 41], [3 + 0xE6, 3 + 0x97], [3 + 0xFF, 3 + 0x41]):
        assert hf.decode(ids) == ours.decode(ids), (kind, ids)


def test_bpe_matches_on_stdlib():
    import tempfile
    from pathlib import Path
    from mgt_scale.hf.tokenizer_json import build_tokenizer
    with tempfile.TemporaryDirectory() as d:
        ours = train_small_tokenizer(Path(d) / "t.model", "bpe")
        tok = build_tokenizer(Path(d) / "t.model")[0]
    texts = stdlib_texts(300, seed=0)
    bad = [i for i, t in enumerate(texts) if tok.encode(t).ids != ours.encode(t)]
    assert not bad, f"{len(bad)} of {len(texts)} files encode differently"
    assert all(tok.decode(ours.encode(t), skip_special_tokens=False) == t for t in texts[:50])
