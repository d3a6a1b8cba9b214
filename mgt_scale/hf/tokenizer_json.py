# A `tokenizers` tokenizer (tokenizer.json) that encodes and decodes like one of our SentencePiece models
# (mgt_scale/data/tokenizer.py), so that transformers' AutoTokenizer loads an export without
# trust_remote_code and without sentencepiece. Built from the model's pieces directly, not through
# transformers' converter, whose SentencePiece settings (a Metaspace pre-tokenizer, a dummy prefix) are
# not ours:
# - normalizer: spaces -> U+2581 only (our models: identity normalisation, no dummy prefix, no collapsing
#   of whitespace); no pre-tokenizer (SentencePiece encodes the whole text as one sequence);
# - model: BPE with merges read off the pieces (a merge for every split of a piece into two pieces,
#   ranked by the merged piece's score, as SentencePiece merges the best-scored pair first), or Unigram
#   with the pieces' scores; byte fallback for characters outside the vocabulary; control pieces
#   (<unk>, </s>) and byte pieces (<0xNN>) never match text, as in SentencePiece;
# - decoder: U+2581 -> space, byte pieces -> UTF-8 (an invalid byte -> U+FFFD), <unk> -> " \u2047 ", </s>
#   -> nothing, as SentencePiece decodes them; both are special tokens (the unknown and EOS tokens).
# BPE (mgt prep's default) encodes exactly as SentencePiece (tests/unit/test_hf_tokenizer.py, 300 stdlib
# files); Unigram can break a tie differently inside long runs of spaces (same score, other pieces).
from __future__ import annotations

from pathlib import Path

UNK_SURFACE = " \u2047 "  # what SentencePiece's decode writes for <unk>
NEVER = -1e9  # score of pieces that must not match text (Unigram)


def read_pieces(model_file: str | Path):
    """(model type name, [(piece, score, type name)]) of a SentencePiece model file."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    m = pb.ModelProto()
    m.ParseFromString(Path(model_file).read_bytes())
    kinds = pb.ModelProto.SentencePiece.Type
    mtype = pb.TrainerSpec.ModelType.Name(m.trainer_spec.model_type)
    return mtype, [(p.piece, p.score, kinds.Name(p.type)) for p in m.pieces], m


def build_tokenizer(model_file: str | Path):
    """A tokenizers.Tokenizer equivalent to the SentencePiece model in `model_file`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    mtype, pieces, proto = read_pieces(model_file)
    ns = proto.normalizer_spec
    if ns.add_dummy_prefix or ns.remove_extra_whitespaces or ns.name not in ("identity", ""):
        raise ValueError(f"{model_file}: normalizer {ns.name!r} (add_dummy_prefix={ns.add_dummy_prefix}, "
                         f"remove_extra_whitespaces={ns.remove_extra_whitespaces}) is not mgt prep's: only "
                         f"tokenizers trained by mgt prep can be converted")
    unk_id = next((i for i, (_, _, t) in enumerate(pieces) if t == "UNKNOWN"), 0)
    if mtype == "BPE":
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        normal = {p for p, _, t in pieces if t in ("NORMAL", "USER_DEFINED")}
        merges = []
        for i, (p, _, t) in enumerate(pieces):
            if t != "NORMAL" or len(p) < 2:
                continue
            for k in range(1, len(p)):
                a, b = p[:k], p[k:]
                if a in normal and b in normal:
                    merges.append((i, vocab[a], vocab[b], a, b))
        merges.sort()  # pieces are stored best score first: rank = the merged piece's position
        model = models.BPE(vocab, [(a, b) for *_, a, b in merges], unk_token=pieces[unk_id][0],
                           byte_fallback=True, fuse_unk=True)
    elif mtype == "UNIGRAM":
        model = models.Unigram([(p, s if t in ("NORMAL", "USER_DEFINED") else NEVER) for p, s, t in pieces],
                               unk_id=unk_id, byte_fallback=True)
    else:
        raise ValueError(f"{model_file}: SentencePiece model type {mtype} cannot be converted (BPE or UNIGRAM)")
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    # decode <unk> and the control pieces as SentencePiece does (" \u2047 ", nothing) unless a text piece
    # contains their text, which the per-token Replace would change too
    surface = {pieces[unk_id][0]: UNK_SURFACE, **{p: "" for p, _, t in pieces if t == "CONTROL"}}
    texts = [p for p, _, t in pieces if t in ("NORMAL", "USER_DEFINED")]
    replace = [decoders.Replace(k, v) for k, v in surface.items() if not any(k in p for p in texts)]
    tok.decoder = decoders.Sequence(replace + [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, _, t in pieces if t == "CONTROL"]
                           + [AddedToken(pieces[unk_id][0], special=True, normalized=False)])
    return tok, mtype, pieces


def write_tokenizer(model_file: str | Path, out_dir: str | Path, max_length: int) -> str:
    """tokenizer.json + tokenizer_config.json for AutoTokenizer in `out_dir`; returns the model type."""
    import json
    tok, mtype, pieces = build_tokenizer(model_file)
    out = Path(out_dir)
    tok.save(str(out / "tokenizer.json"))
    eos = next((p for p, _, t in pieces if t == "CONTROL" and p == "</s>"), None)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": next(p for p, _, t in pieces if t == "UNKNOWN"),
        "eos_token": eos,
        "bos_token": None,
        "model_max_length": max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        # "</s>" in a text is text, as for SentencePiece (our documents never contain an EOS piece)
        "split_special_tokens": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return mtype
