"""Tokenizers, the official image resize rule, pixel values, and the built-in shapes dataset."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models

import data
from conftest import DEFAULT_DROPOUT, SPECIAL_IDS, solid, word_tokenizer


def test_tiny_tokenizer():
    tok = data.tiny_tokenizer()
    assert tok.vocab_size <= 1024
    assert tok.special == {"im_start": 0, "im_end": 1, "vision_start": 2, "vision_end": 3}
    for text in ["a red circle above a blue square", "what colour is the circle?", "Ünïcode, 123 & emoji 🙂"]:
        assert tok.decode(tok.encode(text)) == text  # byte level: any text round-trips
    assert len(tok.encode("make the square green")) <= 6  # the dataset's words are single tokens
    assert data.tiny_tokenizer().tokenizer.to_str() == tok.tokenizer.to_str()  # deterministic


def test_load_tokenizer_from_a_checkpoint_folder(tmp_path):
    word_tokenizer().tokenizer.save(str(tmp_path / "tokenizer.json"))
    tok = data.load_tokenizer(str(tmp_path))
    assert tok.special == {"im_start": 1000, "im_end": 1001, "vision_start": 1008, "vision_end": 1009}
    assert tok.encode("w5 w17") == [5, 17]  # no BOS/EOS or role template added: BAGEL adds <|im_start|> itself
    Tokenizer(models.WordLevel({"a": 0, "<|im_start|>": 1}, unk_token="a")).save(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="no <\\|im_end\\|> token"):
        data.load_tokenizer(str(tmp_path / "bad.json"))
    with pytest.raises(FileNotFoundError):
        data.load_tokenizer(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("w,h,lo,hi,stride,expect", [
    (1024, 768, 512, 1024, 16, (1024, 768)),   # already fine
    (4000, 3000, 512, 1024, 16, (1024, 768)),  # long side capped
    (300, 200, 512, 1024, 16, (768, 512)),     # short side raised to min: scale 2.56
    (1000, 500, 512, 1024, 16, (1024, 512)),   # short side raised to 512 (1.024x)
    (2000, 100, 512, 1024, 16, (1024, 48)),    # 5.12x -> 10240x512 -> max_pixels (area-ratio quirk) -> cap
    (640, 480, 378, 980, 14, (644, 476)),      # 640/14 = 45.7 -> 46*14; 480/14 = 34.3 -> 34*14
    (10, 10, 224, 518, 14, (224, 224)),        # tiny images are scaled up
])
def test_resize_rule(w, h, lo, hi, stride, expect):
    """Hand-computed from the official MaxLongEdgeMinShortEdgeResize (max_pixels 14*14*9*1024)."""
    assert data.resize_size(w, h, lo, hi, stride, 14 * 14 * 9 * 1024) == expect


def test_image_tensor_values():
    x = data.image_bytes(Image.new("RGB", (300, 200), (255, 0, 128)), (512, 1024), 16, 14 * 14 * 9 * 1024)
    assert x.shape == (3, 512, 768) and x.dtype == torch.uint8  # kept as bytes while buffered
    assert torch.equal(x, torch.tensor([255, 0, 128], dtype=torch.uint8)[:, None, None].expand_as(x))
    u = data.image_tensor(Image.new("RGB", (300, 200), (255, 0, 128)), (512, 1024), 16, 14 * 14 * 9 * 1024)
    assert u.dtype == torch.float32
    assert torch.allclose(u, torch.tensor(solid((255, 0, 128)))[:, None, None].expand_as(u), atol=1e-6)
    grad = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (4, 1, 3))  # no resize: exact values
    x = data.image_bytes(Image.fromarray(grad), (4, 256), 4, 10 ** 9)
    assert torch.equal(x[0, 0], torch.arange(256, dtype=torch.uint8))
    assert torch.allclose(data.unit_pixels(x)[0, 0], torch.arange(256) / 127.5 - 1, atol=1e-6)
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent: composited onto white
    assert torch.equal(data.image_tensor(data.rgb(rgba), (16, 16), 16, 10 ** 9), torch.ones(3, 16, 16))
    f = torch.rand(3, 4, 4) * 2 - 1
    assert torch.equal(data.unit_pixels(f), f)  # floats pass through


def test_shapes_dataset():
    """Deterministic rows; captions, answers and edits say what the pictures show."""
    tok = data.tiny_tokenizer()
    rgb = {name: np.array(c) for name, c in data.COLOURS.items()}
    seen = set()
    for row in range(300):
        parts = data.shapes_parts(0, row, 64)
        again = data.shapes_parts(0, row, 64)
        assert [p[:2] for p in parts] == [p[:2] for p in again]
        texts = [v for _, k, v in parts if k == "text"]
        images = [np.array(v) for _, k, v in parts if k == "image"]
        assert all(np.array_equal(a, np.array(v)) for a, (_, k, v) in zip(images, [p for p in again if p[1] == "image"]))
        kind = "t2i" if len(parts) == 2 else "vqa" if parts[-1][1] == "text" else "edit"
        seen.add(kind)
        if kind == "t2i" and " above " in texts[0]:  # "a C1 S1 above a C2 S2": C1 in the top half, C2 in the bottom
            words = texts[0].split()
            img = images[0]
            top, bottom = img[:32].reshape(-1, 3), img[32:].reshape(-1, 3)
            assert (top == rgb[words[1]]).all(1).sum() > 50 and (bottom == rgb[words[5]]).all(1).sum() > 50
            assert not (top == rgb[words[5]]).all(1).any()
        if kind == "vqa" and texts[0].startswith("what colour"):
            assert (images[0].reshape(-1, 3) == rgb[texts[1]]).all(1).sum() > 50
        if kind == "edit" and texts[0].startswith("make the"):  # recolour: the new colour appears, the image changes
            new = texts[0].split()[-1]
            assert not (images[0].reshape(-1, 3) == rgb[new]).all(1).any()
            assert (images[1].reshape(-1, 3) == rgb[new]).all(1).sum() > 50
    assert seen == {"t2i", "vqa", "edit"}
    src = data.Source("shapes", image_size=64)
    loader = data.Loader([src], tok, packing_length=512, seed=0, dropout=DEFAULT_DROPOUT)
    items, _ = loader.build([0, 0, 0])
    assert all(it["pixels"].shape[1:] in [(64, 64), (56, 56)] for it in items if it["type"] != "text")


def test_command_line_check(tmp_path):
    """python data.py PATH:FORMAT packs a few batches and reports fill and skips."""
    import subprocess
    import sys
    from pathlib import Path
    from conftest import png, write_jsonl
    (tmp_path / "a.png").write_bytes(png(56, 28))
    rows = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image> what is it?"},
                                                {"from": "gpt", "value": "a pink rectangle"}]}] * 30
    rows[3] = {"image": "gone.png", "conversations": rows[0]["conversations"]}
    path = write_jsonl(tmp_path / "v.jsonl", rows)
    out = subprocess.run([sys.executable, "data.py", f"{path}:vlm", "--packs", "8", "--packing_length", "8192"],
                         capture_output=True, text=True, cwd=Path(data.__file__).parent, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pack 1: " in out.stdout and "'fill': " in out.stdout and "'missing_file': 1" in out.stdout
    assert "v.jsonl row 3" in out.stderr  # the skip is logged with its row
