"""Tokenizers, image decoding (EXIF orientation, 16-bit), the official image resize rule, pixel values, video frames
as the official FrameSampler draws them, and the built-in shapes dataset."""
import io
import json
import os
import random
import sys

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


def test_exif_orientation_is_applied(tmp_path):
    """A camera's Orientation=6 ("rotate 90 degrees clockwise to view"): the decoded image is the stored one turned
    clockwise, before any resize (PNG exactly; JPEG by its four flat quadrants)."""
    stored = np.zeros((32, 48, 3), np.uint8)  # 48 wide, 32 high: four coloured quadrants
    stored[:16, :24], stored[:16, 24:], stored[16:, :24], stored[16:, 24:] = (250, 0, 0), (0, 250, 0), (0, 0, 250), \
        (250, 250, 250)
    viewed = np.rot90(stored, k=-1)  # numpy's clockwise quarter turn: 32 wide, 48 high
    for fmt in ("PNG", "JPEG"):
        img = Image.fromarray(stored)
        exif = img.getexif()
        exif[0x0112] = 6
        buf = io.BytesIO()
        img.save(buf, format=fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
        got = np.asarray(data.open_image(buf.getvalue(), None, 10 ** 6)).astype(int)
        assert got.shape == viewed.shape, fmt
        if fmt == "PNG":
            assert np.array_equal(got, viewed)
        else:
            for rows, cols in [(slice(2, 14), slice(2, 14)), (slice(2, 14), slice(18, 30)),
                               (slice(34, 46), slice(2, 14)), (slice(34, 46), slice(18, 30))]:
                assert np.abs(got[rows, cols].mean((0, 1)) - viewed[rows, cols].mean((0, 1))).max() < 8


def test_16_bit_images_keep_their_values():
    """A full-range 16-bit greyscale PNG (a gradient 0..65535) maps to 8 bits as v / 257 (65535 -> 255), not
    clipped at 255 (Pillow's convert would make 99.6% of it white)."""
    v = np.linspace(0, 65535, 1000).round().astype(np.uint16)[None, :].repeat(3, 0)
    buf = io.BytesIO()
    Image.fromarray(v).save(buf, format="PNG")
    got = np.asarray(data.open_image(buf.getvalue(), None, 10 ** 6))
    assert np.array_equal(got, np.repeat(np.round(v / 257).astype(np.uint8)[:, :, None], 3, 2))
    assert (got == 255).mean() < 0.01


def frame_png(k, size=(8, 8)):
    return Image.new("RGB", size, (k, 0, 0))


# stretches of a 30-frame clip for 8 frames: int(linspace(0, 30, 9)) = 0 3 7 11 15 18 22 26 30; official draws from
# range(start, next - 1), i.e. every frame of a stretch but its last
STRETCHES_8_OF_30 = [{0, 1}, {3, 4, 5}, {7, 8, 9}, {11, 12, 13}, {15, 16}, {18, 19, 20}, {22, 23, 24}, {26, 27, 28}]


def test_frames_of_a_folder_as_the_official_sampler(tmp_path):
    """Official read_frames_folder with frame_sampler_args (8, 12): n ~ U{8..12}; a folder of more than n frames
    gives n by get_frame_indices (one per stretch, sorted, 1000 draws); of at most n, all of them, no padding.
    Frames sorted by the number after the last "_" (frame_2 before frame_10)."""
    clip = tmp_path / "clip"
    clip.mkdir()
    for k in random.Random(0).sample(range(30), 30):
        frame_png(k).save(clip / f"f_{k}.png")
    draws = [[int(os.path.basename(p)[2:-4]) for p in data.video_frames(str(clip), (8, 12),
                                                                        torch.Generator().manual_seed(s))]
             for s in range(1000)]
    for n in range(8, 13):
        assert abs(sum(len(d) == n for d in draws) / 1000 - 0.2) < 4 * (0.16 / 1000) ** 0.5
    assert all(d == sorted(d) and len(set(d)) == len(d) for d in draws)
    eights = [d for d in draws if len(d) == 8]
    assert [set(col) for col in zip(*eights)] == STRETCHES_8_OF_30
    short = tmp_path / "short"
    short.mkdir()
    for k in (100, 2, 11, 1, 20, 10):
        frame_png(k).save(short / f"frame_{k}.png")
    for s in range(20):
        got = data.video_frames(str(short), (8, 12), torch.Generator().manual_seed(s))
        assert [os.path.basename(p) for p in got] == [f"frame_{k}.png" for k in (1, 2, 10, 11, 20, 100)]


def test_frames_of_an_animated_image(tmp_path, monkeypatch):
    """Official read_frames_decord: n ~ U{8..12} frames by get_frame_indices, always n: a clip of 6 frames has
    stretches of one frame, so the fallback takes all 6 (sorted) and pads with the last. A video file without
    decord or PyAV installed: a clear error naming both."""
    frames = [frame_png(40 * k) for k in range(6)]
    frames[0].save(tmp_path / "clip.png", save_all=True, append_images=frames[1:])
    for s in range(40):
        got = [im.getpixel((0, 0))[0] // 40 for im in data.video_frames(str(tmp_path / "clip.png"), (8, 12),
                                                                         torch.Generator().manual_seed(s))]
        assert 8 <= len(got) <= 12 and got == [0, 1, 2, 3, 4, 5] + [5] * (len(got) - 6)
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "decord", None)
        m.setitem(sys.modules, "av", None)
        with pytest.raises(RuntimeError, match="needs decord or PyAV"):
            data.video_frames(str(tmp_path / "clip.mp4"), (8, 12), torch.Generator())


def test_frames_of_a_video_file(tmp_path):
    """A generated mp4 read with PyAV (when installed): 8 frames, each from its stretch of the 30 (the official
    get_frame_indices), several different draws."""
    av = pytest.importorskip("av")
    with av.open(str(tmp_path / "bits.mp4"), "w") as video:  # frame k shows k in binary: 5 black/white blocks
        stream = video.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 80, 16, "yuv420p"
        for k in range(30):
            bits = np.repeat([(k >> b & 1) * 255 for b in range(5)], 16).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.tile(bits[None, :, None], (16, 1, 3)),
                                                                   format="rgb24")):
                video.mux(packet)
        for packet in stream.encode():
            video.mux(packet)
    seen = []
    for s in range(30):
        got = data.video_frames(str(tmp_path / "bits.mp4"), (8, 8), torch.Generator().manual_seed(s))
        seen.append([sum((np.asarray(im)[:, 16 * b:16 * b + 16].mean() > 128) << b for b in range(5)) for im in got])
    assert all(len(d) == 8 for d in seen)
    assert all(set(col) <= stretch for col, stretch in zip(zip(*seen), STRETCHES_8_OF_30))
    assert len({tuple(d) for d in seen}) > 10


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
