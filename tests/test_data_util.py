"""Shared helpers for the data tests (no tests here)."""
import io
import json

from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

import data

SPECIAL_IDS = {"<|im_start|>": 1000, "<|im_end|>": 1001, "<|vision_start|>": 1008, "<|vision_end|>": 1009}


def word_tokenizer(special_ids=SPECIAL_IDS, vocab_size=1024):
    """'w17 w3.' -> [17, 3, <id of .>]: a word-level tokenizer whose ids can be read off the text, so token counts
    and ids in the tests are known without the code under test. Every id below vocab_size that is not a special
    token is a word; "." and the unknown token come after."""
    vocab = {f"w{i}": i for i in range(vocab_size) if i not in special_ids.values()}
    vocab.update(special_ids)
    vocab.update({".": vocab_size, "<unk>": vocab_size + 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return data.TextTokenizer(tok)


def words(ids):
    return " ".join(f"w{i}" for i in ids)


def png(w, h, colour=(255, 0, 128), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def solid(colour):
    """The [-1, 1] value of a uint8 channel value, computed independently of data.py."""
    return [(c / 255 - 0.5) / 0.5 for c in colour]
