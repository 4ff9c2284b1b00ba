"""nanobagel data: datasets -> samples (lists of items) -> packed multimodal sequences (Pack) for model.py.

What train.py uses (everything else is the machinery behind it):

    tok = data.load_tokenizer(checkpoint_folder)      # or data.tiny_tokenizer() for the built-in dataset
    sources = [data.Source("shapes"),                  # built-in procedural dataset, nothing to download
               data.Source("train.jsonl", format="messages", weight=2.0, data_folder="images/"),
               data.Source("t2i/", format="t2i", mandatory=True)]  # mandatory: in every pack opened (official)
    loader = data.Loader(sources, tok, packing_length=16384, dropout=(0.1, 0.3, 0.3), workers=8, prefetch=2,
                         rank=rank, world_size=world_size, seed=0)  # the same packs for any workers / prefetch
    pack = loader.next_pack()     # -> Pack (model.forward consumes it), forever
    state = loader.state_dict()   # JSON-able; a fresh Loader(...).load_state_dict(state) yields the same next packs
    loader.stats                  # {samples, packs, tokens, fill, skipped: {reason: n}, epochs}
    python data.py PATH[:FORMAT] ... checks datasets before a run: fill, skips by reason, speed.

Read top to bottom:
  1. Pack + pack_samples: the exact official BAGEL layout of a list of samples (tests/fixtures/bagel_tiny checks it)
  2. Tokenizer: tokenizers' tokenizer.json plus BAGEL's four special tokens; a tiny one built on the fly
  3. Images: decode (with guards, EXIF, 16 bit), the official resize rule, [-1, 1] tensors; video frames
  4. Samples: a conversation in the OpenAI "messages" shape -> items, CFG condition dropout, the random draws
  5. Readers: rows from json / jsonl / parquet / arrow / tar files; the messages, official, IRG, UniCoT, recA formats
  6. The built-in dataset: coloured shapes with captions, questions and edit instructions
  7. Loader: sharding, weighted and mandatory sources, a true first-fit packer, worker processes, bad-input
     accounting, exact resume
"""
import base64
import bisect
import collections
import copyreg
import hashlib
import importlib
import io
import json
import logging
import math
import multiprocessing
import os
import pickle
import queue
import random
import re
import sys
import tarfile
import threading
import traceback
import weakref
from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw, ImageOps
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model import patchify


# ----------------------------------------------------------------------------------------------
# 1. The Pack: a flat sequence of several samples, and the official BAGEL layout rules
#
# A sample is an ordered list of items (the fixture vocabulary, tests/fixtures/bagel_tiny/cases.json):
#   {"type": "text", "ids": [...], "loss": bool, "special_token_loss": bool, "special_token_label": int|None}
#   {"type": "vit_image", "pixels": [3, H, W] in [-1, 1], H and W multiples of 14}
#   {"type": "vae_image", "latent": [16, 2h, 2w] or None, "pixels": [3, 16h, 16w] or None, "loss": bool,
#    "timestep_raw": float|None, "noise": [16, 2h, 2w]|None, "posterior_eps": [16, 2h, 2w]|None}
# and any item may carry "drop": True (CFG condition dropout). Pixels may also be uint8 in [0, 255] (what the
# loader makes: 4x less memory); the Pack keeps VAE pixels as given (uint8 travels to the GPU, where
# train.encode_images maps it to [-1, 1]) and holds ViT patches in [-1, 1].

@dataclass
class Pack:
    sample_lens: list            # tokens per sample
    split_lens: list             # one split per (kept) item; the splits tile the pack in order
    split_modes: list            # 'causal' | 'full' | 'noise'
    position_ids: torch.Tensor   # Long[L] RoPE ids, restart at 0 per sample
    text_ids: torch.Tensor       # Long[Nt] every token embedded by embed_tokens (text and the 4 markers)
    text_indexes: torch.Tensor   # Long[Nt]
    vit_patches: torch.Tensor    # Float[Nvit, 588] patchify(pixels, 14), images in sequence order
    vit_pos_ids: torch.Tensor    # Long[Nvit] row*vit_side + col
    vit_indexes: torch.Tensor    # Long[Nvit]
    vit_lens: list               # patches per ViT image
    vae_indexes: torch.Tensor    # Long[Nv] all latent tokens, noised and clean, sequence order
    latent_pos_ids: torch.Tensor  # Long[Nv] row*max_latent_size + col
    vae_grids: list              # (h, w) latent-token grid per VAE image
    vae_latents: list            # per VAE image: [16, 2h, 2w] or None (pixels given)
    vae_pixels: list             # per VAE image: [3, 16h, 16w] (uint8 or in [-1, 1]) or None (latent given)
    vae_keys: list               # per VAE image: a hash of its pixels (content and transform), or None
    vae_posterior_eps: list      # per VAE image: [16, 2h, 2w] for pixel images, else None
    vae_timestep_raw: torch.Tensor  # Float[Nimg_vae] pre-sigmoid draw; -inf for clean conditions
    vae_noise: torch.Tensor      # Float[Nv, 64] patchify(noise, 2); zeros for clean tokens
    ce_indexes: torch.Tensor     # Long[Nce]
    ce_labels: torch.Tensor      # Long[Nce]
    ce_weights: torch.Tensor     # Float[Nce] 1/sqrt(len(ids)+1) per text-loss token, 1.0 special-token loss
    mse_indexes: torch.Tensor    # Long[Nmse] latent tokens of noised images
    sample_keys: list = None     # where each sample came from, [source, epoch, row] (Loader); None for ad-hoc packs

    @property
    def num_tokens(self):
        return sum(self.sample_lens)

    def to(self, device):
        pin = torch.device(device).type == "cuda"  # pinned + non_blocking: no stall per tensor

        def move(v):
            if isinstance(v, torch.Tensor):
                return (v.pin_memory() if pin and v.device.type == "cpu" else v).to(device, non_blocking=pin)
            if isinstance(v, list):
                return [move(x) for x in v]
            return v
        return Pack(**{f.name: move(getattr(self, f.name)) for f in fields(self)})


def item_grid(item):
    """(h, w) token grid of an image item: ViT patches of 14 px, VAE latent tokens of 16 px (latent [16, 2h, 2w])."""
    if item.get("latent") is not None:
        return item["latent"].shape[1] // 2, item["latent"].shape[2] // 2
    side = 14 if item["type"] == "vit_image" else 16
    return item["pixels"].shape[1] // side, item["pixels"].shape[2] // side


def item_len(item):
    """LLM positions of a kept item: <|im_start|> ids <|im_end|>, or an image's tokens between its two markers."""
    if item["type"] == "text":
        return len(item["ids"]) + 2
    h, w = item_grid(item)
    return h * w + 2


def sample_len(items):
    """LLM positions a sample takes in a pack (what packing_length bounds)."""
    return sum(item_len(it) for it in items if not it.get("drop"))


def add_draws(item, gen):
    """Fills in the random draws a kept vae_image lacks, from `gen` in this order: timestep_raw ~ N(0, 1) and flow
    noise (a noised image), then the VAE posterior eps (an image given as pixels)."""
    h, w = item_grid(item)
    if item.get("loss"):
        if item.get("timestep_raw") is None:
            item["timestep_raw"] = torch.randn((), generator=gen).item()
        if item.get("noise") is None:
            item["noise"] = torch.randn(16, 2 * h, 2 * w, generator=gen)
    if item.get("pixels") is not None and item.get("posterior_eps") is None:
        item["posterior_eps"] = torch.randn(16, 2 * h, 2 * w, generator=gen)
    return item


def unit_pixels(x):
    """uint8 [0, 255] -> float [-1, 1] (ToTensor then Normalize(0.5, 0.5), as officially); floats pass through."""
    return x.float().div_(255).sub_(0.5).div_(0.5) if x.dtype == torch.uint8 else x.float()


def pixel_key(pixels):
    """A name for an image's pixels (its content after the transform): train.LatentCache's file name. The loader's
    samples carry it, computed where they are built (in its worker processes)."""
    return hashlib.blake2b(pixels.contiguous().numpy().tobytes(), digest_size=16).hexdigest() + \
        f"_{str(pixels.dtype)[6:]}_{pixels.shape[1]}x{pixels.shape[2]}"


def grid_pos_ids(h, w, side):
    """row*side + col for an h x w grid in raster order (the index into a side x side position table)."""
    return (torch.arange(h)[:, None] * side + torch.arange(w)[None, :]).flatten()


def pack_samples(samples, special, max_latent_size=64, vit_side=70, generator=None) -> Pack:
    """Lay samples out one after another with the official BAGEL packing rules.

    special: {"im_start", "im_end", "vision_start", "vision_end"} -> token id. The draws a VAE image lacks (timestep
    and noise of a noised one, posterior eps of pixels) are taken from `generator` (add_draws, in sequence order); the
    loader always supplies them: this is for ad-hoc use.
    """
    p = {f.name: [] for f in fields(Pack)}  # each field as a list, made tensors at the end
    L = 0  # tokens laid out so far
    for sample in samples:
        start, rope = L, 0
        for item in sample:
            kind = item["type"]
            if item.get("drop"):
                # a dropped condition adds no tokens; a dropped image still advances the position (official)
                rope += kind != "text"
                continue
            if kind not in ("text", "vit_image", "vae_image"):
                raise ValueError(f"unknown item type {kind!r}")
            n = item_len(item)
            if kind == "text":
                ids = [int(i) for i in item["ids"]]
                p["text_ids"] += [special["im_start"]] + ids + [special["im_end"]]
                p["text_indexes"] += range(L, L + n)
                p["position_ids"] += range(rope, rope + n)
                if item.get("loss"):  # next-token CE on <|im_start|> + ids, labels ids + <|im_end|>
                    p["ce_indexes"] += range(L, L + n - 1)
                    p["ce_labels"] += ids + [special["im_end"]]
                    p["ce_weights"] += [1.0 / math.sqrt(len(ids) + 1)] * (n - 1)
                if item.get("special_token_loss"):  # the <|im_end|> position predicts e.g. <|vision_start|>
                    p["ce_indexes"].append(L + n - 1)
                    p["ce_labels"].append(int(item["special_token_label"]))
                    p["ce_weights"].append(1.0)
                mode, rope = "causal", rope + n
            else:  # <|vision_start|> the image's tokens <|vision_end|>: a whole image takes one position id
                h, w = item_grid(item)
                tokens = torch.arange(L + 1, L + n - 1)
                p["text_ids"] += [special["vision_start"], special["vision_end"]]
                p["text_indexes"] += [L, L + n - 1]
                p["position_ids"] += [rope] * n
                noised = kind == "vae_image" and bool(item.get("loss"))
                # a noised image does not advance the position: a following clean copy reuses the id
                mode, rope = ("noise", rope) if noised else ("full", rope + 1)
            if kind == "vit_image":
                p["vit_patches"].append(patchify(unit_pixels(item["pixels"]), 14))
                p["vit_pos_ids"].append(grid_pos_ids(h, w, vit_side))
                p["vit_indexes"].append(tokens)
                p["vit_lens"].append(h * w)
            elif kind == "vae_image":
                latent, pixels = item.get("latent"), item.get("pixels")
                assert (latent is None) != (pixels is None), "a vae_image has exactly one of latent / pixels"
                item = add_draws(dict(item), generator)
                p["vae_timestep_raw"].append(float(item["timestep_raw"]) if noised else -math.inf)
                p["vae_noise"].append(patchify(item["noise"].float(), 2) if noised else torch.zeros(h * w, 64))
                if noised:
                    p["mse_indexes"].append(tokens)
                p["vae_indexes"].append(tokens)
                p["latent_pos_ids"].append(grid_pos_ids(h, w, max_latent_size))
                p["vae_grids"].append((h, w))
                p["vae_latents"].append(latent)
                p["vae_pixels"].append(pixels)
                p["vae_keys"].append(None if pixels is None else item.get("pixel_key") or pixel_key(pixels))
                p["vae_posterior_eps"].append(None if pixels is None else item["posterior_eps"])
            p["split_lens"].append(n)
            p["split_modes"].append(mode)
            L += n
        p["sample_lens"].append(L - start)
    widths = {"vit_patches": 14 * 14 * 3, "vae_noise": 64, "vae_timestep_raw": None, "ce_weights": None}  # floats

    def tensor(name):  # python numbers, or tensors to concatenate (none: an empty one, rows of the field's width)
        if p[name] and isinstance(p[name][0], torch.Tensor):
            return torch.cat(p[name])
        t = torch.tensor(p[name], dtype=torch.float32 if name in widths else torch.long)
        return t.reshape(-1, widths[name]) if widths.get(name) else t
    return Pack(**{f.name: tensor(f.name) if f.type is torch.Tensor else p[f.name] for f in fields(Pack)
                   if f.name != "sample_keys"})


# ----------------------------------------------------------------------------------------------
# 2. Tokenizer. BAGEL has no chat template: every text segment is <|im_start|> ids <|im_end|> (pack_samples adds the
# two), every image <|vision_start|> ... <|vision_end|>. The four special tokens are found by name.

SPECIAL_TOKENS = {"im_start": "<|im_start|>", "im_end": "<|im_end|>",
                  "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>"}


class TextTokenizer:
    """A tokenizers.Tokenizer plus the ids of BAGEL's four special tokens (`special`, as pack_samples wants it)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.vocab_size = tokenizer, tokenizer.get_vocab_size()
        self.special = {key: tokenizer.token_to_id(name) for key, name in SPECIAL_TOKENS.items()}
        missing = [name for key, name in SPECIAL_TOKENS.items() if self.special[key] is None]
        if missing:
            raise ValueError(f"tokenizer has no {missing[0]} token; BAGEL needs {list(SPECIAL_TOKENS.values())}")

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(path):
    """tokenizer.json of a checkpoint folder (or the file itself), e.g. the Qwen2 one shipped with BAGEL-7B-MoT."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    return TextTokenizer(Tokenizer.from_file(file))


def tiny_tokenizer(vocab_size=512):
    """Byte-level BPE trained on the built-in dataset's sentences: any text encodes, the shapes vocabulary in few
    tokens, a vocabulary small enough for a tiny model. Deterministic; the special tokens take ids 0..3."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(shapes_corpus(), trainer)
    return TextTokenizer(tok)


# ----------------------------------------------------------------------------------------------
# 3. Images

class BadSample(Exception):
    """A bad input row: the loader skips it, counts it under `reason` and logs it with the row."""

    def __init__(self, reason, detail=""):
        super().__init__(reason, detail)  # the arguments themselves, so it pickles (worker processes send it back)
        self.reason, self.detail = reason, detail

    def __str__(self):
        return f"{self.reason} ({self.detail})" if self.detail else self.reason


log = logging.getLogger("nanobagel.data")


def count_bad(counts, e, what):
    """Counts BadSample e under its reason; logs the first 20 of each reason, then every 1000th."""
    n = counts[e.reason] = counts.get(e.reason, 0) + 1
    if n <= 20 or n % 1000 == 0:
        log.warning("data: %s: %s [%d %s so far]", what, e, n, e.reason)


def rgb(img):
    """RGB, with transparency composited onto white (official pil_img2rgb); 16- and 32-bit greyscale scaled by
    its range (Pillow's own conversion clips at 255: a 16-bit image would come out white)."""
    if img.mode.startswith("I"):
        a = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(a * (255 / max(65535, a.max())) + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "RGBA" or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        white = Image.new("RGB", img.size, (255, 255, 255))
        white.paste(img, mask=img.split()[3])
        return white
    return img.convert("RGB")


def open_image(ref, folder, max_pixels):
    """ref: a PIL image | bytes | {"bytes", "path"} (a Hugging Face image cell) | "data:...;base64,..." | a path
    (relative to `folder`; "file://" allowed; Source.read has already confined it to the data folder). Refuses
    images over max_pixels before decoding them (bombs); applies the EXIF orientation (phone photos)."""
    if isinstance(ref, Image.Image):
        return rgb(ref)
    if isinstance(ref, dict):
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, str) and ref.startswith("data:"):
        try:  # line-wrapped base64 (base64.encodebytes) is fine, anything else outside the alphabet is not
            ref = base64.b64decode("".join(ref.split(",", 1)[1].split()), validate=True)
        except (IndexError, ValueError) as e:
            raise BadSample("bad_base64", str(e)[:80])
    if isinstance(ref, str):
        if ref.startswith(("http://", "https://")):
            raise BadSample("unsupported", f"remote image {ref[:60]}: download the data first")
        src = os.path.join(folder or "", ref.removeprefix("file://"))
        if not os.path.isfile(src):
            raise BadSample("missing_file", src)
    elif isinstance(ref, (bytes, bytearray, memoryview)):
        src = io.BytesIO(ref)
    else:
        raise BadSample("bad_image_ref", type(ref).__name__)
    try:
        img = Image.open(src)
        if img.width * img.height > max_pixels:
            raise BadSample("oversized_image", f"{img.width}x{img.height} > {max_pixels} pixels")
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
        img = rgb(img)
    except BadSample:
        raise
    except Image.DecompressionBombError as e:
        raise BadSample("oversized_image", str(e)[:80])
    except Exception as e:  # decoders fed untrusted bytes fail in many ways: unidentified, truncated, corrupt
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}"[:80])
    if min(img.size) == 0:
        raise BadSample("corrupt_image", f"empty image {img.size}")
    return img


def resize_size(w, h, min_size, max_size, stride, max_pixels):
    """Official MaxLongEdgeMinShortEdgeResize: long side <= max_size, short side >= min_size, both rounded to
    multiples of stride, at most max_pixels; the later rule wins, so max_size has the last word."""
    def scaled(w, h, scale):
        return (max(stride, round(round(w * scale) / stride) * stride),
                max(stride, round(round(h * scale) / stride) * stride))
    scale = max(min(max_size / max(w, h), 1.0), min_size / min(w, h))
    w, h = scaled(w, h, scale)
    if w * h > max_pixels:
        w, h = scaled(w, h, max_pixels / (w * h))  # (sic: the official code scales the sides by the area ratio)
    if max(w, h) > max_size:
        w, h = scaled(w, h, max_size / max(w, h))
    return w, h


def image_bytes(img, size, stride, max_pixels):
    """PIL RGB -> uint8 [3, H, W], resized bicubic per resize_size; size = (min side, max side). The loader keeps
    images like this while they wait in its buffer; pack_samples maps them to [-1, 1]."""
    w, h = resize_size(img.width, img.height, size[0], size[1], stride, max_pixels)
    if (w, h) != img.size:
        img = img.resize((w, h), Image.BICUBIC)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def image_tensor(img, size, stride, max_pixels):
    """PIL RGB -> float [3, H, W] in [-1, 1], resized as image_bytes."""
    return unit_pixels(image_bytes(img, size, stride, max_pixels))


# Video: the official FrameSampler (data/video_utils.py, frame_sampler_args) turns a clip into ViT frames.

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def frame_indices(n, vlen, gen):
    """Official get_frame_indices(sample="rand"): min(n, vlen) stretches of the clip, a frame drawn from each but
    its last one (sic); if a stretch is that short, min(n, vlen) distinct random frames in order; padded to n with
    the last."""
    edges = np.linspace(0, vlen, min(n, vlen) + 1).astype(int).tolist()
    if all(b - 1 > a for a, b in zip(edges, edges[1:])):
        idx = [a + int(torch.randint(b - 1 - a, (), generator=gen)) for a, b in zip(edges, edges[1:])]
    else:
        idx = sorted(torch.randperm(vlen, generator=gen)[:min(n, vlen)].tolist())
    return idx + idx[-1:] * (n - len(idx))


def video_frames(path, num_frames, gen):
    """Official FrameSampler: n ~ U{num_frames = (min, max)}; a folder of frames (sorted by the number in
    name_N.ext) gives all if it has at most n, else n by frame_indices; an animated image (Pillow) or a video file
    (decord, the official reader, or PyAV) gives n by frame_indices. -> frame paths (a folder) or PIL images."""
    n = num_frames[0] + int(torch.randint(num_frames[1] - num_frames[0] + 1, (), generator=gen))
    if os.path.isdir(path):
        number = lambda f: (int(m.group(1)) if (m := re.search(r"_(\d+)\.\w+$", f)) else -1, f)
        files = sorted((f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS)), key=number)
        if not files:
            raise BadSample("missing_file", f"no frames in {path}")
        return [os.path.join(path, f) for f in (files if len(files) <= n else
                                                 [files[i] for i in frame_indices(n, len(files), gen)])]
    try:
        with Image.open(path) as img:  # an animated image (a still one: a clip of one frame)
            frames = []
            for i in frame_indices(n, getattr(img, "n_frames", 1), gen):
                img.seek(i)
                frames.append(rgb(img))
            return frames
    except FileNotFoundError:
        raise BadSample("missing_file", path)
    except Image.UnidentifiedImageError:
        pass  # a video file
    except Exception as e:
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}"[:80])
    for name in ("decord", "av"):
        try:
            reader = importlib.import_module(name)
            break
        except ImportError:
            continue
    else:
        raise RuntimeError(f"{path}: reading video files needs decord or PyAV (pip install decord, or pip install av)")
    try:
        if name == "decord":
            video = reader.VideoReader(path, num_threads=1)
            return [Image.fromarray(x) for x in video.get_batch(frame_indices(n, len(video), gen)).asnumpy()]
        with reader.open(path) as video:  # PyAV: the container's frame count, else its packets counted
            vlen = video.streams.video[0].frames or sum(p.size > 0 for p in video.demux(video=0))
        idx = frame_indices(n, vlen, gen)
        with reader.open(path) as video:  # decoded in order up to the last frame drawn
            decoded = zip(range(idx[-1] + 1), video.decode(video=0))
            frames = [f.to_image() for i, f in decoded for _ in range(idx.count(i))]
    except Exception as e:
        raise BadSample("corrupt_video", f"{type(e).__name__}: {e}"[:80])
    if len(frames) < n:
        raise BadSample("corrupt_video", f"{path}: {len(frames)} of the {n} frames drawn decode")
    return frames


# ----------------------------------------------------------------------------------------------
# 4. Samples. Every reader produces a conversation: a list of parts (role, "text", str) | (role, "image", ref),
# roles system / user / assistant (a video is its frames); build_sample turns it into items.

ROLES = ("system", "user", "assistant")


def parse_messages(messages):
    """OpenAI "messages" (a list, or its JSON string) -> parts. Images: {"type": "image_url", "image_url": {"url"}}
    or {"type": "image", "image": ...}; a missing url/image means the row's next entry in its images column.
    Videos: {"type": "video_url", "video_url": {"url"}} or {"type": "video", "video": path}."""
    if isinstance(messages, str):
        messages = json.loads(messages)  # bad JSON: Source.read counts it as malformed_json
    if not isinstance(messages, list) or not messages:
        raise BadSample("empty_messages")
    parts = []
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise BadSample("unknown_role", repr(role)[:40])
        content = m.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise BadSample("malformed_row", f"content of a {role} message is {type(content).__name__}")
        for c in content:
            kind = c.get("type") if isinstance(c, dict) else None
            if kind == "text":
                if not isinstance(c.get("text"), str):
                    raise BadSample("malformed_row", f"text item without a string: {str(c)[:40]}")
                parts.append((role, "text", c["text"]))
            elif kind in ("image_url", "video_url"):
                url = c.get(kind)
                parts.append((role, kind.removesuffix("_url"), url.get("url") if isinstance(url, dict) else url))
            elif kind in ("image", "video"):
                parts.append((role, kind, c.get(kind)))
            else:
                raise BadSample("unknown_content_type", repr(kind)[:40])
    if not parts:
        raise BadSample("empty_messages")
    return parts


def vae_item(pixels, key, loss, droppable=False):
    return {"type": "vae_image", "latent": None, "pixels": pixels, "loss": loss, "timestep_raw": None,
            "noise": None, "posterior_eps": None, "droppable": droppable, "pixel_key": key}


RULE_FLAGS = ("loss", "vae", "vit", "droppable")
PARTS_LEFT_OUT = {}  # reason -> bad parts left out of otherwise good rows (IRG's rule) in this process


def build_sample(parts, load_image, tok, vae_size, vit_size, max_pixels, gen, dropout):
    """Items of one conversation (LMMS Engine conventions, which are the official plans; notes/data.md):
    - system/user text: no loss; assistant text: CE on its ids and the closing <|im_end|>.
    - an assistant image is generated (a noised VAE target, MSE); when more follows, also a clean VAE + ViT copy.
    - a user/system image is understood (ViT); in a sample that generates an image, first a clean VAE condition.
    - CFG condition dropout, only in samples that generate an image: user text, clean VAE and ViT conditions, with
      probabilities dropout = (text, vit, vae).
    A part's optional fourth element, a dict, may replace these rules by flags (IRG, UniCoT, recA): text {"loss"},
    image {"loss": a noised target, "vae": a clean VAE copy, "vit": a ViT copy}, each False unless given, and
    "droppable" (default True; a loss target never is). It may also say "vit_size" (this image's ViT (min, max)
    side), "img_num" (the ViT max_pixels is shared by that many images) and "optional" (a bad image leaves out this
    part, not the row: IRG's rule). Random draws, all from `gen`: the CFG decisions in sequence order, then
    add_draws per kept VAE image."""
    extras = [p[3] if len(p) > 3 else {} for p in parts]
    given = [e if any(k in e for k in RULE_FLAGS) else None for e in extras]
    generates = any(p[1] == "image" and (g.get("loss") if g else p[0] == "assistant") for p, g in zip(parts, given))

    def rules(i, role, kind):  # the conventions above, as flags
        if kind == "text":
            return {"loss": role == "assistant", "droppable": generates and role == "user"}
        more = i < len(parts) - 1
        return {"loss": role == "assistant", "vae": generates and (role != "assistant" or more),
                "vit": role != "assistant" or more, "droppable": generates}
    items = []
    for i, (part, extra) in enumerate(zip(parts, extras)):
        role, kind, value = part[:3]
        flags = given[i] or rules(i, role, kind)
        droppable = flags.get("droppable", True)
        if kind == "text":
            items.append({"type": "text", "ids": tok.encode(value), "loss": flags.get("loss", False),
                          "special_token_loss": False, "special_token_label": None, "droppable": droppable})
            continue
        loss, vae_copy, vit_copy = (flags.get(k, False) for k in ("loss", "vae", "vit"))
        try:
            if not (loss or vae_copy or vit_copy):
                raise BadSample("malformed_row", "an image part with no use (need_loss, need_vae, need_vit all false)")
            img = load_image(value)
        except BadSample as e:
            if not extra.get("optional"):
                raise
            count_bad(PARTS_LEFT_OUT, e, "left out a bad part of a row")
            continue
        vae = image_bytes(img, vae_size, 16, max_pixels) if loss or vae_copy else None
        key = pixel_key(vae) if vae is not None else None
        if loss:
            items.append(vae_item(vae, key, loss=True))
        if vae_copy:
            items.append(vae_item(vae, key, loss=False, droppable=droppable))
        if vit_copy:
            pixels = image_bytes(img, extra.get("vit_size", vit_size), 14, max_pixels / extra.get("img_num", 1))
            items.append({"type": "vit_image", "pixels": pixels, "droppable": droppable})
    if not any(it.get("loss") for it in items):
        raise BadSample("no_targets", "nothing to learn: no assistant text or image")
    probs = {"text": dropout[0], "vit_image": dropout[1], "vae_image": dropout[2]}
    for it in items:
        if it.pop("droppable") and not it.get("loss") and torch.rand((), generator=gen).item() < probs[it["type"]]:
            it["drop"] = True
    for it in items:
        if it["type"] == "vae_image" and not it.get("drop"):
            add_draws(it, gen)
    return items


# ----------------------------------------------------------------------------------------------
# 5. Readers. Rows gives random access to the rows (dicts) of a file or a folder of files (jsonl, json, parquet,
# arrow, webdataset tar shards); Source turns a row of its format into parts:
#   messages  {"messages": [...] or its JSON string, optional "images": [bytes | {"bytes", "path"} | path]}
#   t2i       official T2I parquet: {"image": bytes, "captions": JSON string of {name: caption}}
#   edit      official edit parquet: {"image_list": [bytes], "instruction_list": [[str]]}
#   vlm       official VLM jsonl (LLaVA): {"image": path | [paths] or "video": path, "conversations": [{"from",
#             "value"}]}, also UniCoT's "think" turns
#   irg       IRG parquet: {"conversation": JSON [{"role", "content"}]}, per-part need_loss / need_vae / need_vit
#   unicot    UniCoT MDP parquet: {"prompt", "think", "image"} or {"prompt", "think", "source_image",
#             "edit_instruction", "target_image"}, optional "system_prompt"; or decomposition rows {"task_type":
#             "step-1".."step-4", "instruction_list", "image_list"}
#   reca      recA: {"image"} alone (captions ignored): reconstruction from its ViT view and a describe-prompt
#   shapes    the built-in dataset (section 6), no files

EXTENSIONS = (".jsonl", ".json", ".parquet", ".arrow", ".tar")
SIZES = {  # official data config (data/configs/example.yaml): VAE (min, max) side, ViT (min, max) side, max_pixels
    "t2i": ((512, 1024), (378, 980), 14 * 14 * 9 * 1024),
    "edit": ((512, 1024), (224, 518), 14 * 14 * 9 * 1024),
    "vlm": ((512, 1024), (378, 980), 2_007_040),
    "messages": ((512, 1024), (378, 980), 14 * 14 * 9 * 1024),
    "irg": ((512, 1024), (378, 980), 14 * 14 * 9 * 1024),      # IRG's data config
    "unicot": ((512, 1024), (224, 518), 14 * 14 * 9 * 1024),   # UniCoT's light-weight edit conditions
    "reca": ((512, 1024), (224, 224), 14 * 14 * 9 * 1024),     # recA's bottleneck: the smallest ViT view
}
COLUMNS = {"messages": ["messages"], "t2i": ["image", "captions"], "edit": ["image_list", "instruction_list"],
           "vlm": ["conversations"], "irg": ["conversation"], "reca": ["image"], "shapes": ["index"],
           "unicot": []}  # two row shapes: checked per row

# recA's prompts ask for a description, as recA's own (all description requests, none says copy): with the ViT
# view as the condition, the model is asked to say densely what it sees
RECON_PROMPTS = [f"{ask} {what}." for ask in (
    "Describe", "Describe in detail", "Give a detailed description of", "Write a dense caption for",
    "Provide a thorough account of", "Explain, element by element,") for what in (
    "the image", "this picture", "the scene shown here", "every object in the image, with its colour and place",
    "the composition, colours and lighting of this picture", "the style, medium and mood of the image",
    "the subjects, their textures and the background", "the layout of the scene from left to right",
    "the foreground and background of this image", "the shapes, sizes and number of things in view",
    "any text, symbols and patterns visible in the picture")]


def cached(cache, key, make):
    """A one-entry cache: rows are visited block by block, so only the last row group / open file is worth keeping.
    (Safe to share between loaders in threads: dict operations are atomic and readers keep their own reference.)"""
    value = cache.get(key)
    if value is None:
        value = make()
        cache.clear()
        cache[key] = value
    return value


def pread(file, cache, offset, size):
    """Bytes of an open file, read positionally: no shared seek state."""
    return os.pread(cached(cache, file, lambda: open(file, "rb")).fileno(), size, offset)


def open_file_rows(file, cache):
    """-> (number of rows, row starts of blocks read together, get(i) -> dict, column names or None)."""
    if file.endswith(".jsonl"):
        spans, pos = [], 0  # (start, end) byte offsets of the non-blank lines
        with open(file, "rb") as f:
            for line in f:
                if line.strip():
                    spans.append((pos, pos + len(line)))
                pos += len(line)
        spans = np.array(spans, dtype=np.int64).reshape(-1, 2)

        def get(i):
            start, end = spans[i].tolist()
            try:
                return json.loads(pread(file, cache, start, end - start))
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                raise BadSample("malformed_json", str(e)[:80])
        return len(spans), np.arange(len(spans) + 1), get, None
    if file.endswith(".json"):
        try:
            with open(file) as f:
                rows = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file} is not valid JSON: {e}")
        if not isinstance(rows, list):
            raise ValueError(f"{file}: a .json data file must hold a list of rows, not a {type(rows).__name__}")
        return len(rows), np.arange(len(rows) + 1), rows.__getitem__, None
    if file.endswith(".parquet"):  # only the footer now (no file left open: folders may hold thousands)
        meta = pq.read_metadata(file)
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

        def get(i):
            g = int(np.searchsorted(starts, i, side="right")) - 1
            table = cached(cache, (file, g), lambda: pq.ParquetFile(file).read_row_group(g))
            return table.slice(i - int(starts[g]), 1).to_pylist()[0]
        return int(starts[-1]), starts, get, meta.schema.to_arrow_schema().names
    if file.endswith(".arrow"):  # Arrow IPC: the file format, or the stream format Hugging Face datasets write
        try:
            table = pa.ipc.open_file(pa.memory_map(file)).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_stream(pa.memory_map(file)).read_all()
        return table.num_rows, np.arange(table.num_rows + 1), lambda i: table.slice(i, 1).to_pylist()[0], \
            table.schema.names
    if file.endswith(".tar"):  # webdataset shard: a row per key (the member path up to its name's first dot)
        members = {}  # key -> {extension: (offset, size)}, from the headers alone
        with tarfile.open(file) as tar:
            for m in tar:
                if m.isfile():
                    folder, name = os.path.split(m.name)
                    key, _, ext = name.partition(".")
                    members.setdefault(os.path.join(folder, key), {})[ext.lower()] = (m.offset_data, m.size)
        keys = list(members)

        def get(i):  # {"__key__", a member per extension (json decoded, txt as text), "image": the image member}
            row = {"__key__": keys[i], **{ext: pread(file, cache, *at) for ext, at in members[keys[i]].items()}}
            try:
                row.update({k: json.loads(row[k]) if k == "json" else row[k].decode() for k in ("json", "txt")
                            if k in row})
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                raise BadSample("malformed_json", str(e)[:80])
            images = [v for k, v in row.items() if "." + k.rpartition(".")[2] in IMAGE_EXTENSIONS]
            if images:
                row.setdefault("image", images[0])
            return {**row["json"], **row} if isinstance(row.get("json"), dict) else row  # its fields: columns too
        return len(keys), np.arange(len(keys) + 1), get, None
    raise ValueError(f"{file}: unknown data file type (expected one of {EXTENSIONS})")


class Rows:
    """The rows of one data file or of every data file in a folder (sorted by name), as one indexable list."""

    def __init__(self, path):
        self.path = path
        if os.path.isdir(path):
            self.files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(EXTENSIONS))
            if not self.files:
                raise ValueError(f"no {'/'.join(EXTENSIONS)} files in {path}")
        elif os.path.isfile(path):
            self.files = [path]
        else:
            raise FileNotFoundError(f"data path does not exist: {path}")
        self.getters, self.columns, starts, blocks, cache = [], None, [0], [], {}
        for file in self.files:
            try:
                n, file_blocks, get, columns = open_file_rows(file, cache)
            except (pa.ArrowException, OSError, tarfile.TarError) as e:
                raise ValueError(f"cannot read {file}: {e}")
            blocks.append(starts[-1] + file_blocks[:-1])
            self.getters.append(get)
            self.columns = self.columns or columns
            starts.append(starts[-1] + n)
        self.starts = np.array(starts, dtype=np.int64)
        self.block_starts = np.concatenate(blocks + [self.starts[-1:]])  # last entry: the total
        if self.columns is None and len(self):  # json, jsonl, tar: the first row's keys
            try:
                self.columns = list(self[0])
            except BadSample:
                pass

    def __reduce__(self):  # open files and closures do not pickle: a worker process reads the path again
        return Rows, (self.path,)

    def __len__(self):
        return int(self.starts[-1])

    def locate(self, i):
        f = int(np.searchsorted(self.starts, i, side="right")) - 1
        return f, i - int(self.starts[f])

    def where(self, i):
        f, j = self.locate(i)
        return f"{self.files[f]} row {j}"

    def __getitem__(self, i):
        f, j = self.locate(i)
        row = self.getters[f](j)
        if not isinstance(row, dict):
            raise BadSample("malformed_row", f"a row is a {type(row).__name__}, not an object")
        return row


def pick(options, gen):
    return options[int(torch.randint(len(options), (), generator=gen))]


def read_messages(r, gen, src):
    """A video becomes its sampled frames (video_frames), which share the ViT budget (img_num); in a sample that
    generates an image, ViT views take the edit size (the official edit ViT transform, not the VLM one)."""
    parts = parse_messages(r["messages"])
    images = r.get("images", r.get("image"))
    images = list(images) if isinstance(images, (list, tuple, np.ndarray)) else [] if images is None else [images]
    size = {"vit_size": src.edit_vit_size} if any(p[:2] == ("assistant", "image") for p in parts) else {}
    out, k = [], 0
    for role, kind, value in parts:
        if kind == "image" and value is None:  # the row's next image
            if k >= len(images):
                raise BadSample("missing_image", "more image items than entries in the images column")
            value, k = images[k], k + 1
        if kind == "video":
            if role == "assistant":
                raise BadSample("unsupported", "a video the assistant generates")
            frames = src.frames(value, gen)
            out += [(role, "image", f, {**size, "img_num": len(frames)}) for f in frames]
        else:
            out.append((role, kind, value, size) if kind == "image" else (role, kind, value))
    return out


def read_t2i(r, gen, src):
    """Official T2I: a caption drawn uniformly, blank ones included (an implicit unconditional sample); a row
    without captions is captioned " "."""
    captions = json.loads(r["captions"]) if isinstance(r["captions"], str) else r["captions"]
    captions = [c for c in (captions.values() if isinstance(captions, dict) else captions) if isinstance(c, str)]
    return [("user", "text", pick(captions, gen) if captions else " "), ("assistant", "image", r["image"])]


def read_edit(r, gen, src):
    """Official edit plan: a random window of 1-2 steps from image start to image end; with probability 0.5 a
    2-step window is one instruction "a. b." (sic: "a.. b.." when they end in ".") and only the final image, but
    never the row's last image: such a window shrinks to its first step ("a.")."""
    images, instructions = r["image_list"], r["instruction_list"]
    if len(images) < 2 or len(instructions) < len(images) - 1:
        raise BadSample("malformed_row", f"{len(images)} images, {len(instructions)} instruction lists")
    say = lambda k: pick(instructions[k - 1], gen) if isinstance(instructions[k - 1], list) else instructions[k - 1]
    start = pick(range(len(images) - 1), gen)
    end = pick(range(start + 1, min(start + 3, len(images))), gen)
    parts = [("user", "image", images[start])]
    if end - start > 1 and torch.rand((), generator=gen).item() < 0.5:
        end -= end == len(images) - 1
        text = "".join(say(k) + ". " for k in range(start + 1, end + 1)).rstrip()
        return parts + [("user", "text", text), ("assistant", "image", images[end])]
    for k in range(start + 1, end + 1):
        parts += [("user", "text", say(k)), ("assistant", "image", images[k])]
    return parts


def read_vlm(r, gen, src):
    """LLaVA conversations, read as the official VLM dataset does: human turns are user text (split at <image>
    placeholders and stripped; as is without one), gpt turns assistant text, other turns (system) left out;
    <image> tags beyond the row's images are ignored, images beyond its tags unused, and all of them share the
    ViT budget (img_num). A "video" row is its sampled frames (video_frames) in place of <video>."""
    turns = r["conversations"]
    if r.get("image") is not None:
        images = r["image"] if isinstance(r["image"], list) else [r["image"]]
    elif r.get("video") is not None:
        images = src.frames(r["video"], gen)
        first = next((t for t in turns if "<video>" in t["value"]), None)
        if first is None:
            raise BadSample("malformed_row", "a video row without a <video> tag")
        turns = [dict(t, value=t["value"].replace("<video>", "<image>" * len(images))) if t is first else t
                 for t in turns]
    else:
        images = []
    parts, k = [], 0
    for turn in turns:
        who, value = turn["from"], turn["value"]
        if who == "think":  # UniCoT: the model's reasoning, left out with probability think_drop
            if torch.rand((), generator=gen).item() < src.think_drop:
                continue
            who = "gpt"
        if who == "gpt" or (who == "human" and "<image>" not in value):
            parts.append(("assistant" if who == "gpt" else "user", "text", value))
        elif who == "human":
            for j, text in enumerate(value.split("<image>")):
                if j and k < len(images):  # the tag before this piece
                    parts.append(("user", "image", images[k], {"img_num": len(images)}))
                    k += 1
                if text.strip():
                    parts.append(("user", "text", text.strip()))
    return parts


def read_irg(r, gen, src):
    """IRG: user turns are text (need_loss, default False); assistant turns are lists of parts: text (need_loss,
    default True) or a base64 image with need_loss (a generation target), need_vae / need_vit (clean copies for
    what follows), each default False. As IRG reads them: other roles (system), turns or parts without content,
    and parts of other types are ignored; a bad image part (undecodable, or no flag set) is left out, not the
    row."""
    turns = json.loads(r["conversation"]) if isinstance(r["conversation"], str) else r["conversation"]
    parts = []
    for turn in turns:
        role, content = turn.get("role"), turn.get("content")
        if role == "user" and isinstance(content, str) and content:
            parts.append(("user", "text", content, {"loss": bool(turn.get("need_loss", False))}))
        if role != "assistant" or not isinstance(content, list):
            continue
        for part in content:
            kind, value = part.get("type"), part.get("content")
            if not isinstance(value, str) or not value:
                continue
            if kind == "text":
                parts.append(("assistant", "text", value, {"loss": bool(part.get("need_loss", True))}))
            elif kind == "image":
                flags = {k: bool(part.get("need_" + k, False)) for k in ("loss", "vae", "vit")}
                ref = value if value.startswith("data:") else "data:;base64," + value  # decoded by open_image
                parts.append(("assistant", "image", ref, {**flags, "optional": True}))
    if not parts:
        raise BadSample("empty_messages")
    return parts


def read_unicot(r, gen, src):
    """UniCoT MDP rows, no text loss: [system_prompt] prompt [think: left out with probability think_drop] -> the
    generated image (T2I), or -> source_image (clean VAE + ViT) edit_instruction -> the generated target_image (a
    self-reflection step). Decomposition rows: instruction_list[0], image_list[0] (clean VAE + ViT); step-2 and
    step-4 add image_list[1] (clean VAE + ViT), step-3 and step-4 the last instruction, learned (CE); then
    image_list[-1] is generated."""
    if r.get("task_type") is not None:
        images, texts, task = r["image_list"], r["instruction_list"], r["task_type"]
        if task not in ("step-1", "step-2", "step-3", "step-4"):
            raise BadSample("malformed_row", f"unknown task_type {task!r}")
        parts = [("user", "text", texts[0]), ("user", "image", images[0])]
        if task in ("step-2", "step-4"):
            parts.append(("user", "image", images[1]))
        if task in ("step-3", "step-4"):
            parts.append(("assistant", "text", texts[-1]))
        return parts + [("assistant", "image", images[-1])]
    parts = [("system", "text", r["system_prompt"])] if r.get("system_prompt") else []
    parts.append(("user", "text", r["prompt"]))
    if r.get("think") and torch.rand((), generator=gen).item() >= src.think_drop:
        parts.append(("user", "text", r["think"]))
    if r.get("image") is not None:
        return parts + [("assistant", "image", r["image"])]
    return parts + [("user", "image", r["source_image"]), ("user", "text", r["edit_instruction"]),
                    ("assistant", "image", r["target_image"])]


def read_reca(r, gen, src):
    """recA: the image is its own condition: its ViT view (never dropped), a random describe-prompt (dropped with
    text_cond_dropout_prob), then the same image as the generation target. Image loss only."""
    return [("user", "image", r["image"], {"vit": True, "droppable": False}),
            ("user", "text", pick(RECON_PROMPTS, gen), {"droppable": True}),
            ("assistant", "image", r["image"], {"loss": True})]


def read_shapes(r, gen, src):
    return shapes_parts(src.seed, r["index"], src.image_size)


READERS = {"messages": read_messages, "t2i": read_t2i, "edit": read_edit, "vlm": read_vlm, "irg": read_irg,
           "unicot": read_unicot, "reca": read_reca, "shapes": read_shapes}


class ShapeRows:
    """The built-in dataset's rows (section 6): row i is {"index": i}; its scene is drawn from the index."""

    def __init__(self, num_rows):
        self.columns, self.block_starts = ["index"], np.arange(num_rows + 1)

    def __len__(self):
        return len(self.block_starts) - 1

    def where(self, i):
        return f"shapes row {i}"

    def __getitem__(self, i):
        return {"index": i}


class Source:
    """One dataset: a file or folder in one format (READERS), its sampling weight, and its image sizes: (min side,
    max side) for the VAE and the ViT, and max_pixels (defaults: the official data config, SIZES). Image and video
    paths are relative to data_folder (default: the data's own folder) and must stay inside it (no "..", absolute,
    file:// or symlink escapes: a counted skip) unless allow_absolute_paths. num_used_data: the first N rows alone,
    or repeated up to N (official num_used_data); num_frames: (min, max) frames sampled from a video (official
    frame_sampler_args). The built-in "shapes" dataset needs no files: num_rows scenes drawn at image_size px,
    resized to image_size (VAE) and image_size // 14 * 14 (ViT) unless told."""

    def __init__(self, path="shapes", format=None, weight=1.0, name=None, data_folder=None, vae_size=None,
                 vit_size=None, max_pixels=None, num_rows=10000, image_size=64, seed=0, think_drop=0.0,
                 num_used_data=None, num_frames=(8, 12), allow_absolute_paths=False, mandatory=False):
        self.format = format or ("shapes" if path == "shapes" else "messages")
        if self.format not in READERS:
            raise ValueError(f"unknown source format {self.format!r} (formats: {', '.join(READERS)})")
        for ok, need in [(weight > 0, f"weight must be > 0, got {weight}"),
                         (0 <= think_drop <= 1, f"think_drop must be in [0, 1], got {think_drop}"),
                         (1 <= num_frames[0] <= num_frames[1], f"num_frames must be (min, max), got {num_frames}"),
                         (num_used_data is None or isinstance(num_used_data, int) and num_used_data > 0,
                          f"num_used_data must be a positive int, got {num_used_data!r}")]:
            if not ok:
                raise ValueError(f"source {path}: {need}")
        self.path, self.weight, self.name, self.think_drop = path, weight, name or str(path), think_drop
        self.image_size, self.seed, self.num_frames = image_size, seed, tuple(num_frames)
        self.allow_absolute_paths = allow_absolute_paths
        self.mandatory = mandatory  # one sample in every pack the loader opens (section 7)
        if self.format == "shapes":
            self.rows, self.folder = ShapeRows(num_rows), None
            vae, vit, pixels = (image_size, image_size), (image_size // 14 * 14,) * 2, 14 * 14 * 9 * 1024
        else:
            self.rows = Rows(path)
            self.folder = data_folder or (path if os.path.isdir(path) else os.path.dirname(path))
            vae, vit, pixels = SIZES[self.format]
        self.root = os.path.realpath(self.folder or "")
        self.vae_size, self.vit_size, self.max_pixels = vae_size or vae, vit_size or vit, max_pixels or pixels
        self.edit_vit_size = vit_size or SIZES["edit"][1]  # messages samples that generate
        total = len(self.rows)
        if total == 0:
            raise ValueError(f"source {self.name}: no rows")
        self.num_used = num_used_data or total  # rows i and i + total are the same row
        copies = np.concatenate([self.rows.block_starts[:-1] + k * total for k in range(-(-self.num_used // total))])
        self.block_starts = np.append(copies[copies < self.num_used], self.num_used)
        columns = self.rows.columns
        missing = [c for c in COLUMNS[self.format] if columns is not None and c not in columns]
        if missing:
            raise ValueError(f"source {self.name} ({self.format}): missing column(s) {missing}; found {columns}")

    def __len__(self):
        return self.num_used

    def where(self, row):
        return self.rows.where(row % len(self.rows))

    def read(self, row, gen):
        """Row -> parts (role, kind, value[, flags]); image values are refs for open_image, paths made real."""
        r = self.rows[row % len(self.rows)]
        try:
            parts = READERS[self.format](r, gen, self)
        except json.JSONDecodeError as e:  # a JSON string column
            raise BadSample("malformed_json", str(e)[:80])
        except (KeyError, TypeError, AttributeError, IndexError) as e:  # a row of the wrong shape
            raise BadSample("malformed_row", f"{type(e).__name__}: {e}"[:80])
        return [p[:2] + (self.locate(p[2]),) + p[3:] if p[1] == "image" else p for p in parts]

    def locate(self, ref):
        """A path (or a {"bytes": None, "path"} cell) -> its real path, which must lie inside the data folder unless
        allow_absolute_paths; other refs unchanged."""
        if isinstance(ref, dict) and not ref.get("bytes"):
            ref = ref.get("path")
        if not isinstance(ref, str) or ref.startswith(("data:", "http://", "https://")):
            return ref
        if "\0" in ref:
            raise BadSample("bad_image_ref", "a path with a NUL byte")
        path = os.path.realpath(os.path.join(self.root, ref.removeprefix("file://")))
        if not self.allow_absolute_paths and os.path.commonpath([self.root, path]) != self.root:
            raise BadSample("unsafe_path", f"{ref[:60]} leads outside the data folder {self.root} "
                                           f"(allow_absolute_paths lets a source read anywhere)")
        return path

    def frames(self, ref, gen):
        """A video path of a row -> its sampled frames (video_frames)."""
        return video_frames(self.locate(ref), self.num_frames, gen)


# ----------------------------------------------------------------------------------------------
# 6. The built-in dataset: one or two coloured shapes on black, as text-to-image ("a red circle above a blue
# square"), understanding ("what colour is the circle?" "red") and editing ("make the square green") samples.
# Row r of seed s is always the same scene and task, so it needs no files and is exactly reproducible.

COLOURS = {"red": (230, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230), "yellow": (240, 220, 40),
           "purple": (160, 60, 200), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two")


def draw_shapes(scene, size):
    """scene: [(shape, colour, (x, y) centre as fractions of the side)] -> PIL image."""
    img = Image.new("RGB", (size, size), (0, 0, 0))
    d, r = ImageDraw.Draw(img), size * 0.18
    for shape, colour, (x, y) in scene:
        x, y, c = x * size, y * size, COLOURS[colour]
        if shape == "circle":
            d.ellipse([x - r, y - r, x + r, y + r], fill=c)
        elif shape == "square":
            d.rectangle([x - r, y - r, x + r, y + r], fill=c)
        else:
            d.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=c)
    return img


def describe(scene, rng):
    if len(scene) == 1:
        return f"a {scene[0][1]} {scene[0][0]}"
    (s1, c1, p1), (s2, c2, _) = scene
    vertical = p1[0] == 0.5  # scene[0] is above or left of scene[1]
    if rng.random() < 0.5:
        return f"a {c1} {s1} {'above' if vertical else 'left of'} a {c2} {s2}"
    return f"a {c2} {s2} {'below' if vertical else 'right of'} a {c1} {s1}"


def shapes_parts(seed, row, size, draw=True):
    """Row -> parts (role, kind, value) with PIL images; draw=False leaves images out (for the corpus)."""
    rng = random.Random(f"shapes/{seed}/{row}")
    n = 1 if rng.random() < 0.15 else 2  # mostly two shapes, mostly drawn: tying colours and shapes to places is
                                         # what a small model learns last (notes/tiny_demo.md)
    shapes, colours = rng.sample(SHAPES, n), rng.sample(sorted(COLOURS), n)
    cells = [(0.5, 0.5)] if n == 1 else rng.choice([[(0.5, 0.27), (0.5, 0.73)], [(0.27, 0.5), (0.73, 0.5)]])
    scene = list(zip(shapes, colours, cells))
    image = lambda sc: draw_shapes(sc, size) if draw else None
    task = rng.choices(["t2i", "vqa", "edit"], weights=[0.6, 0.2, 0.2])[0]
    if task == "t2i":
        return [("user", "text", describe(scene, rng)), ("assistant", "image", image(scene))]
    if task == "vqa":
        shape, colour, cell = rng.choice(scene)
        qa = [(f"what colour is the {shape}?", colour), (f"which shape is {colour}?", f"the {shape}"),
              ("how many shapes are there?", NUMBERS[n]), ("describe the image.", describe(scene, rng))]
        if n == 2:
            other = scene[1] if scene[0][0] == shape else scene[0]
            rel = ("above", "below") if cell[0] == 0.5 else ("left of", "right of")
            qa.append((f"where is the {shape}?", f"{rel[scene[0][0] != shape]} the {other[0]}"))
        question, answer = rng.choice(qa)
        return [("user", "image", image(scene)), ("user", "text", question), ("assistant", "text", answer)]
    k = rng.randrange(n)
    shape, colour, cell = scene[k]
    edit = rng.choice(["recolour", "reshape"] + (["remove"] if n == 2 else []))
    if edit == "recolour":
        new = rng.choice([c for c in sorted(COLOURS) if c not in colours])
        text, target = f"make the {shape} {new}", scene[:k] + [(shape, new, cell)] + scene[k + 1:]
    elif edit == "reshape":
        new = rng.choice([s for s in SHAPES if s not in shapes])
        text, target = f"turn the {shape} into a {new}", scene[:k] + [(new, colour, cell)] + scene[k + 1:]
    else:
        text, target = f"remove the {shape}", scene[:k] + scene[k + 1:]
    return [("user", "image", image(scene)), ("user", "text", text), ("assistant", "image", image(target))]


def shapes_corpus(rows=2000):
    """The sentences of the first rows of the built-in dataset (what tiny_tokenizer is trained on)."""
    return [v for r in range(rows) for _, kind, v in shapes_parts(0, r, 0, draw=False) if kind == "text"]


# ----------------------------------------------------------------------------------------------
# 7. Loader: the samples of weighted sources, sharded per rank, packed first-fit (the design: notes/data.md).
# A sample is a pure function of its key [source, epoch, row]: its random draws (caption choice, CFG dropout,
# timesteps, noise, posterior eps) come from a generator seeded by (seed, source, epoch, row). So the loader state is
# small and JSON-able (each source's position, the number of weighted draws, the keys waiting in the packer, rebuilt
# on resume), and worker processes can build keys ahead of need while this process packs them in key order: the
# same packs and states for any number of workers.

class SourceOrder:
    """Which row of which source one rank reads next: sample keys [source, epoch, row]. Per source and epoch, a
    seeded permutation of its blocks (parquet row groups, else single rows), rows permuted within a block, cut into
    world_size contiguous shards; a source that runs out starts its next epoch. Which source gives the next sample:
    a weighted draw, the n-th of a rank seeded by (seed, rank, n)."""

    def __init__(self, sources, rank, world_size, seed):
        self.block_starts = [s.block_starts for s in sources]
        self.cum_weights = np.cumsum([s.weight for s in sources]).tolist()
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.positions = [[0, 0] for _ in sources]  # [epoch, cursor into this rank's shard]
        self.draws, self.shard_cache = 0, {}

    def shard(self, s, epoch):
        """This rank's rows of source s in epoch `epoch`, in order."""
        if (s, epoch) not in self.shard_cache:
            starts = self.block_starts[s]
            rng = np.random.default_rng([self.seed, s, epoch])
            if len(starts) - 1 == starts[-1]:  # one row per block
                order = rng.permutation(int(starts[-1]))
            else:
                order = np.concatenate([starts[b] + rng.permutation(int(starts[b + 1] - starts[b]))
                                        for b in rng.permutation(len(starts) - 1)])
            # keeps the epoch before: workers may already read a source's next epoch while this one is consumed
            self.shard_cache = {k: v for k, v in self.shard_cache.items() if k[0] != s or k[1] >= epoch - 1}
            lo, hi = (len(order) * r // self.world_size for r in (self.rank, self.rank + 1))
            self.shard_cache[(s, epoch)] = order[lo:hi].copy()  # a copy lets the whole permutation go
        return self.shard_cache[(s, epoch)]

    def pick(self, draw):
        """The source of this rank's draw-th weighted draw."""
        u = random.Random(f"{self.seed}/{self.rank}/{draw}").random() * self.cum_weights[-1]
        return min(bisect.bisect_right(self.cum_weights, u), len(self.cum_weights) - 1)

    def step(self, s, position):
        """(the key at `position` [epoch, cursor] of source s, the position after it)."""
        epoch, cursor = position
        shard = self.shard(s, epoch)
        return [s, epoch, int(shard[cursor])], [epoch + 1, 0] if cursor + 1 == len(shard) else [epoch, cursor + 1]

    def next_key(self, s=None):
        """The next key of source s, or of the next weighted draw's source."""
        if s is None:
            s, self.draws = self.pick(self.draws), self.draws + 1
        key, self.positions[s] = self.step(s, self.positions[s])
        return key


class FirstFitPacker:
    """Up to `open_packs` packs of `capacity` LLM positions are open; a sample goes into the first it fits, else into
    a pack opened for it (all slots taken: the fullest goes out first), which seeds() (the mandatory sources) then
    join: into it if they fit, else the first they fit, else a new pack (not seeded again). A pack goes out at once
    when even the smallest sample seen so far no longer fits. A pack is {"keys", "samples", "used"}; its keys (where
    its samples came from) are all the state needs."""

    def __init__(self, capacity, open_packs):
        self.capacity, self.open_packs = capacity, open_packs
        self.open, self.ready, self.min_cost = [], [], None

    def add(self, sample, seeds):
        """sample: (key, items, cost); seeds() -> such samples."""
        pack = self.first_fit(sample[2])
        if pack is not None:
            return self.put(pack, sample)
        pack = self.open_pack()
        self.put(pack, sample)  # first: an empty pack always has room for it, its seeds may not
        for seed in seeds():
            self.put(self.first_fit(seed[2], first=pack) or self.open_pack(), seed)

    def first_fit(self, cost, first=None):
        """The first open pack with room for `cost` positions, trying `first` (if still open) before the others."""
        return next((p for p in [p for p in self.open if p is first] + self.open if p["used"] + cost <= self.capacity),
                    None)

    def open_pack(self):
        if len(self.open) == self.open_packs:  # make room: the fullest open pack goes out
            self.emit(max(self.open, key=lambda p: p["used"]))
        self.open.append({"keys": [], "samples": [], "used": 0})
        return self.open[-1]

    def put(self, pack, sample):
        key, items, cost = sample
        self.min_cost = cost if self.min_cost is None else min(self.min_cost, cost)
        pack["keys"].append(key)
        pack["samples"].append(items)
        pack["used"] += cost
        if self.capacity - pack["used"] < self.min_cost:  # full: no sample seen so far would fit any more
            self.emit(pack)

    def emit(self, pack):
        self.open = [p for p in self.open if p is not pack]
        self.ready.append(pack)

    def pop(self):
        """The next finished pack, or None."""
        return self.ready.pop(0) if self.ready else None

    def state_dict(self):
        return {"min_cost": self.min_cost, "open": [p["keys"] for p in self.open],
                "ready": [p["keys"] for p in self.ready]}

    def load_state_dict(self, state, build):
        """build(key) -> (items, cost) remakes each waiting sample from its key."""
        def rebuild(keys):
            built = [build(key) for key in keys]
            return {"keys": keys, "samples": [b[0] for b in built], "used": sum(b[1] for b in built)}
        self.min_cost = state["min_cost"]
        self.open, self.ready = [rebuild(k) for k in state["open"]], [rebuild(k) for k in state["ready"]]


class SampleBuilder:
    """key [source, epoch, row] -> (items, LLM positions); raises BadSample, also for a sample over
    max_sample_tokens. Picklable: worker processes run it."""

    def __init__(self, sources, tok, dropout, seed, max_sample_tokens, max_image_pixels):
        self.sources, self.tok, self.dropout, self.seed = sources, tok, tuple(dropout), seed
        self.max_sample_tokens, self.max_image_pixels = max_sample_tokens, max_image_pixels
        if max_sample_tokens < 1:
            raise ValueError(f"max_sample_tokens must be at least 1, got {max_sample_tokens}")

    def __call__(self, key):
        s, epoch, row = key
        src = self.sources[s]
        digest = hashlib.blake2b(f"{self.seed}/{s}/{epoch}/{row}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        parts = src.read(row, gen)
        load = lambda ref: open_image(ref, src.folder, self.max_image_pixels)
        items = build_sample(parts, load, self.tok, src.vae_size, src.vit_size, src.max_pixels, gen, self.dropout)
        cost = sample_len(items)
        if cost > self.max_sample_tokens:
            raise BadSample("too_long", f"{cost} positions > max_sample_tokens {self.max_sample_tokens}")
        return items, cost


class SamplePickler(pickle.Pickler):
    """Tensors as numpy arrays: they unpickle ~3x faster than in torch's format, and this process unpickles every
    sample. (The queue's own pickler would put each tensor in a shared-memory file of its own: torch's reducers.)"""
    dispatch_table = {**copyreg.dispatch_table, torch.Tensor: lambda t: (torch.from_numpy, (t.numpy(),))}


def build_worker(build, tasks, results):
    """A worker process: builds the keys it is given and sends back (key, the pickled sample, BadSample or other
    error). It ends when the process that started it has, however that ended (train.py leaves by os._exit: no
    clean-up of the parent's runs; a worker blocked for ever would also keep the forkserver alive)."""
    torch.set_num_threads(1)
    results.cancel_join_thread()  # leaving, wait for no one to read what is still buffered
    parent = multiprocessing.parent_process()
    while parent.is_alive():
        try:
            key = tasks.get(timeout=1.0)
        except queue.Empty:
            continue
        try:
            outcome = build(key)
        except BadSample as e:
            outcome = e
        except Exception:
            outcome = RuntimeError(f"data worker, sample {key}:\n{traceback.format_exc()}")
        buf = io.BytesIO()
        SamplePickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(outcome)
        results.put((key, buf.getvalue()))


def stop_workers(processes, *queues):
    for p in processes:
        p.terminate()
        p.join()
    for q in queues:
        q.cancel_join_thread()  # nothing left to flush to the dead
        q.close()


class SampleStream:
    """The samples of the keys SourceOrder gives, in its order: built here when asked (workers=0), or by `workers`
    processes ahead of need. Ahead: each source's next keys in its own order, as many as the next 4 * workers
    weighted draws take from it, plus 2 for each mandatory source (its seeds come at unknown times); a key handed
    out is consumed in turn, whatever draws it, and each wait is for the key this process would have built."""

    def __init__(self, order, build, workers, mandatory):
        self.order, self.build, self.workers, self.mandatory = order, build, workers, mandatory
        self.processes = []

    def take(self, s=None):
        """(key, (items, cost) | BadSample) for the next key of source s (None: of the next weighted draw)."""
        if self.workers and not self.processes:
            self.start()
        elif self.processes and not self.stop.alive:
            raise RuntimeError("the loader's workers were stopped (close)")
        key = self.order.next_key(s)
        if not self.workers:
            try:
                return key, self.build(key)
            except BadSample as e:
                return key, e
        if not self.in_flight[key[0]]:
            self.hand_out(key[0])
        handed_out = self.in_flight[key[0]].popleft()
        assert handed_out == key, (handed_out, key)
        self.hand_out_ahead()
        while tuple(key) not in self.done:
            try:
                k, blob = self.results.get(timeout=1.0)
                self.done[tuple(k)] = blob
            except queue.Empty:
                for p in self.processes:
                    if not p.is_alive():
                        raise RuntimeError(f"data {p.name} is gone (exit code {p.exitcode})")
        outcome = pickle.loads(self.done.pop(tuple(key)))
        if isinstance(outcome, RuntimeError):  # a worker's error, not a bad row: raised where N = 0 raises it
            raise outcome
        return key, outcome

    def start(self):
        ctx = multiprocessing.get_context("forkserver")  # fork is unsafe under threads (torch, CUDA, the prefetcher)
        ctx.set_forkserver_preload(["data"])  # workers fork from a server that imported torch once
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        self.processes = [ctx.Process(target=build_worker, args=(self.build, self.tasks, self.results), daemon=True,
                                      name=f"worker {i}") for i in range(self.workers)]
        for p in self.processes:
            p.start()
        self.stop = weakref.finalize(self, stop_workers, self.processes, self.tasks, self.results)  # also at exit
        self.ahead = [list(p) for p in self.order.positions]  # each source's position after its last key handed out
        self.in_flight, self.done = [collections.deque() for _ in self.ahead], {}

    def close(self):
        """Stops the workers for good and lets go of their queues, whose semaphores would be reported leaked if the
        process then leaves by os._exit."""
        if self.processes:
            self.stop()
            self.tasks = self.results = None

    def hand_out(self, s):
        key, self.ahead[s] = self.order.step(s, self.ahead[s])
        self.in_flight[s].append(key)
        self.tasks.put(key)

    def hand_out_ahead(self):
        draws = [self.order.pick(d) for d in range(self.order.draws, self.order.draws + 4 * self.workers)]
        for s, keys in enumerate(self.in_flight):
            while len(keys) < draws.count(s) + 2 * (s in self.mandatory):
                self.hand_out(s)


class Prefetcher:
    """make() run ahead in a thread, up to `depth` results, each with state() as just after it (decoding and
    resizing release the GIL, so this overlaps the training step). An error of the thread is raised by get(), and
    again by any later call (the thread has stopped)."""

    def __init__(self, make, state, depth):
        self.queue = queue.Queue(depth)
        threading.Thread(target=self.run, args=(make, state), daemon=True).start()

    def run(self, make, state):
        try:
            while True:
                result = make()
                self.queue.put((result, state()))
        except BaseException as e:
            self.queue.put((e, None))

    def get(self):
        result, state = self.queue.get()
        if isinstance(result, BaseException):
            self.queue.put((result, state))
            raise result
        return result, state


def check_sources(sources, order, build, max_latent_size, vit_side):
    """Systemic problems fail at start, not hours into a run: duplicate source names, a rank outside the world,
    images beyond the model's position tables, a rank left without rows, a source whose first samples are all bad."""
    if not sources:
        raise ValueError("no data sources")
    if len({s.name for s in sources}) != len(sources):
        raise ValueError(f"source names must be unique: {[s.name for s in sources]}")
    if not 0 <= order.rank < order.world_size:
        raise ValueError(f"rank {order.rank} outside world_size {order.world_size}")
    for s, src in enumerate(sources):
        if src.vae_size[1] > 16 * max_latent_size or src.vit_size[1] > 14 * vit_side:
            raise ValueError(f"source {src.name}: images up to {src.vae_size[1]} px (VAE) / {src.vit_size[1]} px "
                             f"(ViT) exceed the position tables ({16 * max_latent_size} / {14 * vit_side} px)")
        shard = order.shard(s, 0)
        if len(shard) == 0:
            raise ValueError(f"source {src.name}: {len(src)} rows leave rank {order.rank} of {order.world_size} "
                             f"nothing")
        errors = []
        for row in shard[:8]:
            try:
                build([s, 0, int(row)])
                break
            except BadSample as e:
                errors.append(f"{src.where(int(row))}: {e}")
        else:
            raise ValueError(f"source {src.name}: its first {len(errors)} samples are all bad:\n  " +
                             "\n  ".join(errors))


class Loader:
    """Packs for one rank, forever. packing_length bounds the LLM positions of a pack; dropout = (text, vit, vae)
    CFG condition dropout probabilities; open_packs: the first-fit buffer; max_latent_size / vit_side: the model's
    position tables; samples over max_sample_tokens (at most and by default packing_length) are too_long skips;
    max_image_pixels refuses decompression bombs before decoding; max_bad_streak bad rows in a row from one source
    is an error, not an endless skip; `workers` processes build the samples; `prefetch` packs are made in a thread."""

    def __init__(self, sources, tokenizer, packing_length, dropout, open_packs=8, max_latent_size=64, vit_side=70,
                 max_sample_tokens=None, max_image_pixels=2 ** 26, max_bad_streak=1000, workers=0, prefetch=0,
                 rank=0, world_size=1, seed=0):
        self.sources, self.tok, self.packing_length, self.open_packs = sources, tokenizer, packing_length, open_packs
        self.max_latent_size, self.vit_side = max_latent_size, vit_side
        max_sample_tokens = min(max_sample_tokens or packing_length, packing_length)  # the pack bounds it anyway
        self.build = SampleBuilder(sources, tokenizer, dropout, seed, max_sample_tokens, max_image_pixels)
        self.mandatory = [s for s, src in enumerate(sources) if src.mandatory]
        self.max_bad_streak, self.rank, self.world_size, self.seed = max_bad_streak, rank, world_size, seed
        self.workers, self.prefetch, self.ahead = workers, prefetch, None
        self.reset()
        check_sources(sources, self.order, self.build, max_latent_size, vit_side)

    def reset(self):
        if hasattr(self, "stream"):
            self.stream.close()
        self.order = SourceOrder(self.sources, self.rank, self.world_size, self.seed)
        self.stream = SampleStream(self.order, self.build, self.workers, self.mandatory)
        self.packer = FirstFitPacker(self.packing_length, self.open_packs)
        self.bad_streak = [0] * len(self.sources)
        self.counts = {"samples": 0, "packs": 0, "tokens": 0, "skipped": {}}

    def close(self):
        """Stops the worker processes for good (so do garbage collection and exit; a worker also ends by itself
        once this process has ended, however it ended)."""
        self.stream.close()

    def next_sample(self, s=None):
        """The next sample of source s (None: of a weighted draw): (key, items, cost), or None for a bad row."""
        key, outcome = self.stream.take(s)
        s = key[0]
        if isinstance(outcome, BadSample):
            count_bad(self.counts["skipped"], outcome, f"skipped {self.sources[s].where(key[2])} (epoch {key[1]})")
            self.bad_streak[s] += 1
            if self.bad_streak[s] >= self.max_bad_streak:
                raise RuntimeError(f"source {self.sources[s].name}: {self.bad_streak[s]} bad samples in a row, "
                                   f"the last: {outcome}")
            return None
        self.bad_streak[s] = 0
        self.counts["samples"] += 1
        return (key, *outcome)

    def seeds(self):
        """One sample of each mandatory source, for a pack being opened (after a bad row, that source's next)."""
        out = []
        for s in self.mandatory:
            while (sample := self.next_sample(s)) is None:
                pass
            out.append(sample)
        return out

    def make_pack(self) -> Pack:
        while (p := self.packer.pop()) is None:
            sample = self.next_sample()
            if sample is not None:
                self.packer.add(sample, self.seeds)
        self.counts["packs"] += 1
        self.counts["tokens"] += p["used"]
        pack = pack_samples(p["samples"], self.tok.special, self.max_latent_size, self.vit_side)
        pack.sample_keys = p["keys"]
        return pack

    def next_pack(self) -> Pack:
        """The next pack. With prefetch > 0 a thread makes up to `prefetch` packs ahead, each with the loader state
        just after it: state_dict()/stats describe the packs handed out so far, so resume stays exact."""
        if not self.prefetch:
            return self.make_pack()
        if self.ahead is None:
            self.consumed = self.live_state()
            self.ahead = Prefetcher(self.make_pack, self.live_state, self.prefetch)
        pack, self.consumed = self.ahead.get()
        return pack

    def identity(self):  # what a state must have been saved by to be loaded here
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "sources": [s.name for s in self.sources]}

    def live_state(self):
        return plain({**self.identity(), "positions": self.order.positions, "draws": self.order.draws,
                      "packer": self.packer.state_dict(), "bad_streak": self.bad_streak, "counts": self.counts})

    def state_dict(self):
        """Everything that decides the next packs, as plain JSON-able Python."""
        return plain(self.consumed) if self.ahead else self.live_state()

    @property
    def stats(self):
        """{samples, packs, tokens, fill: tokens / (packs * packing_length), skipped {reason: n}, epochs {source: n}}"""
        state = self.state_dict()
        c = state["counts"]
        return {"samples": c["samples"], "packs": c["packs"], "tokens": c["tokens"],
                "fill": c["tokens"] / (c["packs"] * self.packing_length) if c["packs"] else 0.0,
                "skipped": c["skipped"], "epochs": {src.name: p[0] for src, p in zip(self.sources, state["positions"])}}

    def load_state_dict(self, state):
        if self.ahead is not None:
            raise RuntimeError("load_state_dict must come before the first next_pack")
        theirs = {k: state[k] for k in self.identity()}
        if theirs != self.identity():
            raise ValueError(f"loader state is for {theirs}, this loader is {self.identity()}")
        self.reset()
        state = plain(state)
        self.order.positions, self.order.draws = state["positions"], state["draws"]
        self.bad_streak, self.counts = state["bad_streak"], state["counts"]

        def build(key):
            try:
                return self.build(key)
            except BadSample as e:
                raise RuntimeError(f"cannot rebuild buffered sample {key} ({self.sources[key[0]].where(key[2])}): "
                                   f"{e}; has the data changed?")
        self.packer.load_state_dict(state["packer"], build)


def plain(x):
    """A deep copy as plain JSON data (lists for tuples): states are saved and compared as such."""
    return json.loads(json.dumps(x))


def main(argv):
    """Check datasets before training: pack a few as train.py would, print fill, skips by reason and speed."""
    import argparse
    import time
    import train  # the training defaults: one place for packing_length and the CFG dropout
    formats = ", ".join(f for f in READERS if f != "shapes")
    parser = argparse.ArgumentParser(
        description="Pack a few batches from datasets as train.py would, and report fill, skips and speed.",
        epilog=f"PATH is a data file or folder ({' '.join(EXTENSIONS)}), 'shapes' for the built-in dataset, or a "
               f"train.py config (.py) whose sources to check. FORMAT: {formats}; guessed from the columns if left "
               f"out.")
    parser.add_argument("paths", nargs="*", default=["shapes"], metavar="PATH[:FORMAT]")
    parser.add_argument("--packs", type=int, default=20, help="packs to make (default 20)")
    parser.add_argument("--packing_length", type=int, help=f"LLM positions per pack (default: the config's, else "
                                                             f"train.py's {train.DEFAULTS['packing_length']})")
    parser.add_argument("--tokenizer", help="checkpoint folder with tokenizer.json (default: the built-in)")
    parser.add_argument("--workers", type=int, help="worker processes (default: the config's, else 0)")
    args = parser.parse_args(argv)
    if args.packs < 1:
        parser.error("--packs must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    config, sources = dict(train.DEFAULTS), []
    for p in args.paths:
        if p.endswith(".py"):
            config = train.load_config([p])
            sources += [Source(**s) for s in config["sources"]]
            continue
        path, _, fmt = p.rpartition(":") if ":" in p and not os.path.exists(p) else (p, "", "")
        if not fmt and path != "shapes":  # the format whose columns it has (messages when several fit)
            columns = Rows(path).columns or []
            fits = [f for f, need in COLUMNS.items() if need and f != "shapes" and all(c in columns for c in need)]
            fmt = "messages" if "messages" in fits else (fits[0] if fits else None)
            if fmt is None:
                raise SystemExit(f"{path}: no format's columns found; say PATH:FORMAT ({formats})")
            print(f"{path}: format {fmt} (from its columns)")
        sources.append(Source(path, fmt or None))
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else tiny_tokenizer()
    dropout = [config[k + "_cond_dropout_prob"] for k in ("text", "vit", "vae")]
    data_args = config["data_args"] | ({} if args.workers is None else {"workers": args.workers})
    loader = Loader(sources, tok, args.packing_length or config["packing_length"], dropout, **data_args)
    t0 = time.perf_counter()
    for i in range(args.packs):
        pack = loader.next_pack()
        print(f"pack {i}: {pack.num_tokens} positions, {len(pack.sample_lens)} samples, {pack.vit_patches.shape[0]} "
              f"ViT patches, {pack.vae_indexes.numel()} latent tokens ({pack.mse_indexes.numel()} noised), "
              f"{pack.ce_indexes.numel()} CE targets")
        if i == 0:  # speed from here: the first pack also waits for the workers to start
            t1, samples = time.perf_counter(), loader.stats["samples"]
    dt = time.perf_counter() - t1
    print(f"{loader.stats}\nfirst pack after {t1 - t0:.1f} s, then {(loader.stats['samples'] - samples) / dt:.1f} "
          f"samples/s, {(args.packs - 1) / dt:.2f} packs/s")


if __name__ == "__main__":
    main(sys.argv[1:])
