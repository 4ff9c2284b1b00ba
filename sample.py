"""nanobagel sampling: text-to-image, editing and understanding from a checkpoint, with a KV cache.

    python sample.py --ckpt out/tiny/export --size 32 --prompt "a red circle" --out x.png      # configs/tiny.py
    python sample.py --ckpt out/tiny/export --size 32 --prompts "a red circle" "a blue square" --out grid.png
    python sample.py --ckpt BAGEL-7B --prompt "make the sky pink" --image in.png --out edit.png
    python sample.py --ckpt BAGEL-7B --prompt "What is in the picture?" --image in.png --understand
    python sample.py --ckpt out/tiny/checkpoints/step_0000400 --size 64 --prompt "a red circle"   # mid-run, EMA
    python sample.py --ckpt out/tiny/export --image-size 64 --vit-size 56 --prompt "make it blue" --image in.png

Inference follows the official BAGEL inferencer (Bagel's inferencer.py):
  1. KV cache: context items (text causal; an input image as clean VAE latents at t = 0 through the generation
     expert, then as ViT tokens; each image one position id) are prefilled once; new tokens see all of them.
  2. Images: Euler steps of the flow from t = 1 (noise) to 0 (data) on shifted timesteps, with classifier-free
     guidance from two more caches: without the last text (text CFG) and with the text only (image CFG).
  3. Text: greedy or temperature decoding, one token at a time against the cache.
  4. Front ends: generate_image, answer, sample_grid (train.py's sample grids) and the command line.
"""
import argparse
import functools
import os
import sys

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import convert
import data
from model import PackAttention, Rotary, expert_order, sdpa, span_layout, unpatchify

# Official inference settings (app.py / inference.ipynb). Editing also guides with the source image.
T2I = dict(num_timesteps=50, timestep_shift=3.0, cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.4, 1.0),
           cfg_renorm_type="global", cfg_renorm_min=0.0)
EDIT = dict(T2I, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")
VAE_SIZE, VIT_SIZE = (512, 1024), (224, 980)   # (min side, max side) of input images, official inference transforms
MAX_PIXELS = 14 * 14 * 9 * 1024


# ----------------------------------------------------------------------------------------------
# 1. KV cache. Context tokens never see later tokens, so their keys and values never change: compute them once.

class KVCache:
    """Per layer: keys and values of every context token. Dense attention keeps keys after RoPE, in each call's row
    order; NSA keeps them before RoPE, in sequence order (it pools keys before rotating them, and its windows and
    blocks count tokens). positions: the context's RoPE positions in sequence order; pos: the next item's."""
    def __init__(self, num_layers):
        self.k, self.v, self.positions, self.pos = [None] * num_layers, [None] * num_layers, None, 0

    def __len__(self):
        return 0 if self.k[0] is None else self.k[0].shape[0]

    def copy(self):  # branches share a prefix; cached tensors are never written in place
        c = KVCache(0)
        c.k, c.v, c.positions, c.pos = list(self.k), list(self.v), self.positions, self.pos
        return c


def run_tokens(model, cache, x, is_gen, positions, spans, keep=False):
    """Decoder stack on new tokens x [n, C] (sequence order) after the cached ones. spans: (lengths, modes) of the new
    tokens' spans, as data.pack_samples lays them out; the cache is one earlier span, visible to all of them, so the
    rule is the training one (model.SpanLayout). is_gen [n] picks the expert, positions [n] the RoPE ids. Returns
    the hidden states after the final norms [n, C]; keep=True appends the tokens to the cache. NSA attends over the
    whole sequence (compressed keys, selected blocks and the window over cache + new tokens) and keeps only the new
    rows: exact, and as much work per call as one forward over the sequence."""
    cfg, device, n, m = model.cfg, x.device, x.shape[0], len(cache)
    nsa = cfg.attn_backend == "nsa"
    layout = span_layout([m + n], [m] * (m > 0) + list(spans[0]), ["full"] * (m > 0) + list(spans[1]), device)
    order, where = expert_order(is_gen)
    n_und = int((~is_gen).sum())
    rows = m + order  # the new tokens' places in the sequence, in the layers' row order
    # one bidirectional span, or one new token, sees everything: no mask keeps SDPA on its fused kernels
    sees_all = len(spans[0]) == 1 and (spans[1][0] != "causal" or n == 1)
    mask = None if nsa or sees_all else \
        layout.visible(rows[:, None], torch.cat([torch.arange(m, device=device), rows])[None])
    seen = positions if cache.positions is None else torch.cat([cache.positions, positions])
    rope = Rotary(cfg.head_dim, cfg.rope_theta, positions[order], x.dtype)
    x = x[order]

    def with_cache(i, k, v):  # layer i's keys and values: the cached ones, then these
        if cache.k[i] is not None:
            k, v = torch.cat([cache.k[i], k]), torch.cat([cache.v[i], v])
        if keep:
            cache.k[i], cache.v[i] = k, v
        return k, v

    def past(i, g, q, k, v):  # NSA: the cached rows' gate values and queries are never used again (zeros)
        pad = lambda t: torch.cat([t.new_zeros(m, *t.shape[1:]), t])
        return pad(g), pad(q), *with_cache(i, k, v)
    for i, layer in enumerate(model.layers):
        ctx = PackAttention(rope, lambda q, k, v, i=i: sdpa(q, *with_cache(i, k, v), mask), layout, order, where,
                            seen, cfg.rope_theta, functools.partial(past, i) if nsa else None)
        x = layer(x, n_und, ctx)
    if keep:
        cache.positions = seen
    return model.final_norm(x, n_und)[where]


def prefill(model, cache, items, special):
    """Append context items (text, clean vae_image latents, vit_image; data.py's item vocabulary) to the cache, laid
    out exactly as in training. Returns their hidden states [n, C] in sequence order."""
    if not items:
        raise ValueError("prefill needs at least one item")
    if any(it["type"] == "vae_image" and it.get("loss") for it in items):
        raise ValueError("a noised image is never context: it is sampled (velocity), not prefilled")
    if any(it["type"] == "vae_image" and it.get("latent") is None for it in items):
        raise ValueError("a vae_image in the context needs its latent (encode_image), not pixels")
    cfg, device = model.cfg, model.embed_tokens.weight.device
    pack = data.pack_samples([items], special, cfg.max_latent_size, cfg.vit_max_patches_per_side).to(device)
    x, _ = model.embed(pack, 1.0)  # clean latents: t = 0
    is_gen = torch.zeros(pack.num_tokens, dtype=torch.bool, device=device)
    is_gen[pack.vae_indexes] = True
    positions = pack.position_ids + cache.pos
    h = run_tokens(model, cache, x, is_gen, positions, (pack.split_lens, pack.split_modes), keep=True)
    cache.pos = int(positions.max()) + 1  # text advances by one per token, an image by one
    return h


def feed_token(model, cache, token):
    """One text token after the cache (kept): its next-token logits [vocab] in float32."""
    device = model.embed_tokens.weight.device
    x = model.embed_tokens(torch.tensor([token], device=device))
    h = run_tokens(model, cache, x, torch.zeros(1, dtype=torch.bool, device=device),
                   torch.tensor([cache.pos], device=device), ([1], ["causal"]), keep=True)
    cache.pos += 1
    return model.lm_head(h[0]).float()


def velocity(model, cache, x_t, t, grid, special):
    """Flow velocity [h*w, 64] of the latent tokens x_t [h*w, 64] at time t, as an image generated after the cache:
    <|vision_start|> latents <|vision_end|> at one position id, a noise span, not kept (nothing sees noise)."""
    cfg, device, dtype = model.cfg, x_t.device, model.embed_tokens.weight.dtype
    n = grid[0] * grid[1]
    markers = model.embed_tokens(torch.tensor([special["vision_start"], special["vision_end"]], device=device))
    pos_ids = data.grid_pos_ids(*grid, cfg.max_latent_size).to(device)
    t = torch.full((n,), float(t), device=device)
    latents = model.vae2llm(x_t.to(dtype)) + model.time_embedder(t) + model.latent_pos_table[pos_ids].to(dtype)
    x = torch.cat([markers[:1], latents, markers[1:]])
    is_gen = torch.ones(n + 2, dtype=torch.bool, device=device)
    is_gen[0] = is_gen[-1] = False  # the markers are text tokens: understanding expert
    h = run_tokens(model, cache, x, is_gen, torch.full((n + 2,), cache.pos, device=device), ([n + 2], ["noise"]))
    return model.llm2vae(h[1:-1]).float()


# ----------------------------------------------------------------------------------------------
# 2. Images: Euler flow-matching sampler with classifier-free guidance

def flow_times(num_timesteps, shift):
    """num_timesteps points from 1 to 0, shifted as in training: s*t / (1 + (s-1)*t); float32 as the official code."""
    t = torch.linspace(1, 0, num_timesteps)
    t = shift * t / (1 + (shift - 1) * t)
    return t.tolist(), (t[:-1] - t[1:]).tolist()


def guide(v, v_text=None, v_img=None, text_scale=1.0, img_scale=1.0, renorm="global", renorm_min=0.0):
    """BAGEL's guidance of the full-context velocity v [n, 64]: text CFG v_text + s_text*(v - v_text), then image CFG
    v_img + s_img*(that - v_img); the renorm caps the guided norm at v's ("global": the whole image, "channel": per
    token, "text_channel": per token, on the text-CFG result before image CFG). A missing branch is skipped.
    (The official code skips image CFG too when the text scale is 1; here the two are independent.)"""
    if renorm not in ("global", "channel", "text_channel"):
        raise ValueError(f"cfg_renorm_type must be global, channel or text_channel, not {renorm!r}")
    if v_text is None and v_img is None:
        return v

    def capped(g, per_token):
        norm = (lambda u: u.norm(dim=-1, keepdim=True)) if per_token else (lambda u: u.norm())
        return g * (norm(v) / (norm(g) + 1e-8)).clamp(min=renorm_min, max=1.0)
    g = v if v_text is None else v_text + text_scale * (v - v_text)
    if renorm == "text_channel" and v_text is not None:
        g = capped(g, per_token=True)
    if v_img is not None:
        g = v_img + img_scale * (g - v_img)
    if renorm != "text_channel":
        g = capped(g, per_token=renorm == "channel")
    return g


@torch.no_grad()
def sample_latent(model, cache, grid, special, generator, cfg_text_cache=None, cfg_img_cache=None, num_timesteps=50,
                  timestep_shift=3.0, cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.4, 1.0),
                  cfg_renorm_type="global", cfg_renorm_min=0.0):
    """Latent tokens [h*w, 64] of an image generated after the context in `cache`: num_timesteps - 1 Euler steps
    x <- x - v*(t_i - t_{i+1}) from noise at t = 1. Guidance runs where cfg_interval[0] < t <= cfg_interval[1],
    with a branch per cache given whose scale is not 1."""
    device = model.embed_tokens.weight.device
    x = torch.randn(grid[0] * grid[1], model.cfg.latent_dim, generator=generator).to(device)
    ts, dts = flow_times(num_timesteps, timestep_shift)
    for t, dt in zip(ts, dts):
        guided = cfg_interval[0] < t <= cfg_interval[1]
        v = velocity(model, cache, x, t, grid, special)
        v_text = velocity(model, cfg_text_cache, x, t, grid, special) \
            if guided and cfg_text_cache is not None and cfg_text_scale != 1.0 else None
        v_img = velocity(model, cfg_img_cache, x, t, grid, special) \
            if guided and cfg_img_cache is not None and cfg_img_scale != 1.0 else None
        v = guide(v, v_text, v_img, cfg_text_scale, cfg_img_scale, cfg_renorm_type, cfg_renorm_min)
        x = x - v * dt
    return x


def to_vae(vae, x):
    """x on the VAE's device and dtype (model.PooledAE has no weights: x stays where the model put it)."""
    p = next(vae.parameters(), None)
    return x if p is None else x.to(p)


def encode_image(vae, pixels, generator, device):
    """[3, H, W] in [-1, 1] -> scaled latent [16, H/8, W/8], the posterior sampled as in the official code."""
    x = to_vae(vae, pixels[None].to(device))
    eps = torch.randn(1, 16, x.shape[2] // 8, x.shape[3] // 8, generator=generator).to(x)
    return vae.encode(x, eps)[0].float()


def decode_image(vae, tokens, grid, cfg):
    """Latent tokens [h*w, 64] -> PIL image of 16h x 16w pixels."""
    z = unpatchify(tokens, grid[0], grid[1], cfg.latent_patch_size, cfg.latent_channels)
    x = vae.decode(to_vae(vae, z[None]))[0].float()
    x = ((x * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).cpu().numpy())


def text_item(tokenizer, text):
    return {"type": "text", "ids": tokenizer.encode(text)}


def image_items(vae, img, generator, device, vae_size=VAE_SIZE, vit_size=VIT_SIZE, with_vae=True):
    """An input image as context: a clean VAE latent (for editing) then ViT patches, each resized the official way."""
    items = []
    if with_vae:
        pixels = data.image_tensor(img, vae_size, 16, MAX_PIXELS)
        items.append({"type": "vae_image", "latent": encode_image(vae, pixels, generator, device), "loss": False})
    items.append({"type": "vit_image", "pixels": data.image_tensor(img, vit_size, 14, MAX_PIXELS)})
    return items


@torch.no_grad()
def generate_image(model, vae, tokenizer, prompt, image=None, image_size=(1024, 1024), seed=0, vae_size=VAE_SIZE,
                   vit_size=VIT_SIZE, **settings):
    """PIL image from a prompt (text-to-image), or an edit of `image` (PIL) by the prompt. image_size (H, W) is for
    text-to-image (multiples of 16); an edit keeps the resized input's size. settings override T2I / EDIT."""
    cfg, special = model.cfg, tokenizer.special
    settings = dict(EDIT if image is not None else T2I, **settings)
    generator = torch.Generator().manual_seed(seed)
    cfg_text_cache = KVCache(cfg.num_layers)        # the context without the last text
    cfg_img_cache = None
    if image is not None:
        items = image_items(vae, data.rgb(image), generator, model.embed_tokens.weight.device, vae_size, vit_size)
        prefill(model, cfg_text_cache, items, special)
        h, w = items[0]["latent"].shape[1] // 2, items[0]["latent"].shape[2] // 2
        cfg_img_cache = KVCache(cfg.num_layers)     # the text only
        prefill(model, cfg_img_cache, [text_item(tokenizer, prompt)], special)
    else:
        if image_size[0] % 16 or image_size[1] % 16:
            raise ValueError(f"image_size {image_size} must be multiples of 16 (VAE 8 x latent patch 2)")
        h, w = image_size[0] // 16, image_size[1] // 16
    if max(h, w) > cfg.max_latent_size:
        raise ValueError(f"{16 * h}x{16 * w} px is over the model's {16 * cfg.max_latent_size} px position table")
    cache = cfg_text_cache.copy()
    prefill(model, cache, [text_item(tokenizer, prompt)], special)
    tokens = sample_latent(model, cache, (h, w), special, generator, cfg_text_cache, cfg_img_cache, **settings)
    return decode_image(vae, tokens, (h, w), cfg)


def make_grid(images, cols=None, captions=None, min_side=0):
    """Images side by side, `cols` per row (default: all in one row), on black. An image smaller than min_side is
    enlarged by a whole factor (nearest: its pixels stay sharp). With captions, caption i is written under image i
    (wrapped) and the cells are parted by grey lines."""
    scale = max(1, -(-min_side // min(min(im.size) for im in images)))
    images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    cols = cols or len(images)
    rows = -(-len(images) // cols)
    font = ImageFont.load_default(size=max(11, max(im.width for im in images) // 18))
    gap, line_height = (4, font.size + 4) if captions else (0, 0)
    W, H = max(im.width for im in images) + gap, max(im.height for im in images) + gap
    lines = [wrap(text, font, W - 8) for text in captions] if captions else [[]]
    cell = H + line_height * max(len(ls) for ls in lines) + gap
    grid = Image.new("RGB", (cols * W - gap, rows * cell - gap), (96, 96, 96) if captions else (0, 0, 0))
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        x, y = (i % cols) * W, (i // cols) * cell
        draw.rectangle([x, y, x + W - gap - 1, y + cell - gap - 1], fill=(0, 0, 0))
        grid.paste(im, (x, y))
        for k, line in enumerate(lines[i] if captions else []):
            draw.text((x + W // 2, y + H + k * line_height), line, fill="white", font=font, anchor="ma")
    return grid


def wrap(text, font, width):
    """Words into lines no wider than width pixels (a longer word gets a line of its own)."""
    lines = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


@torch.no_grad()
def sample_grid(model, vae, tokenizer, prompts, image_size=(1024, 1024), seed=0, cols=None, captioned=False,
                **settings):
    """One PIL grid of text-to-image samples, prompt i drawn with seed + i (the same noise at every call, so grids
    from successive training steps are comparable); captioned: each prompt written under its image, and images
    under 256 px enlarged. train.py writes it to samples/step_XXXXXX.png."""
    was_training = model.training
    model.eval()
    fsdp = hasattr(model, "unshard")  # FSDP2 root: its own weights (embeddings, heads) gathered for direct calls;
    if fsdp:                          # every rank must call this (the layers gather theirs in their forward)
        model.unshard()
    try:
        images = [generate_image(model, vae, tokenizer, p, image_size=image_size, seed=seed + i, **settings)
                  for i, p in enumerate(prompts)]
    finally:
        if fsdp:
            model.reshard()
        model.train(was_training)
    return make_grid(images, cols, prompts, 256) if captioned else make_grid(images, cols)


# ----------------------------------------------------------------------------------------------
# 3. Text: understanding

@torch.no_grad()
def generate_text(model, cache, special, max_new_tokens=256, temperature=0.0, generator=None):
    """Token ids of the answer after the context: feed <|im_start|>, then take the argmax (temperature 0) or a
    sample of softmax(logits / temperature) until <|im_end|>. The answer's tokens join the cache."""
    token, out = special["im_start"], []
    for _ in range(max_new_tokens):
        logits = feed_token(model, cache, token).cpu()
        if temperature > 0:
            token = int(torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator))
        else:
            token = int(logits.argmax())
        if token == special["im_end"]:
            break
        out.append(token)
    return out


@torch.no_grad()
def answer(model, vae, tokenizer, prompt, images=(), max_new_tokens=256, temperature=0.0, seed=0, vit_size=VIT_SIZE):
    """Text answer to a prompt about images (PIL): images as ViT tokens, then the prompt, as the official chat()."""
    generator = torch.Generator().manual_seed(seed)
    cache = KVCache(model.cfg.num_layers)
    for img in images:
        prefill(model, cache, image_items(vae, data.rgb(img), generator, None, vit_size=vit_size, with_vae=False),
                tokenizer.special)
    prefill(model, cache, [text_item(tokenizer, prompt)], tokenizer.special)
    ids = generate_text(model, cache, tokenizer.special, max_new_tokens, temperature, generator)
    return tokenizer.decode(ids)


# ----------------------------------------------------------------------------------------------
# 4. Command line

def load(ckpt, weights=None, device="cpu", dtype=torch.float32):
    """(model, vae, cfg) from a checkpoint folder of any layout convert.py reads, a train.py checkpoint
    (out_dir/checkpoints/step_N) too; weights "model" or "ema" (default: the EMA when the folder has one)."""
    model, vae, cfg = convert.load_checkpoint(ckpt, device, dtype, ema=None if weights is None else weights == "ema")
    return model.eval(), vae.eval(), cfg


def pair(ap, values, flag):
    """--flag A or A B -> (A, A) or (A, B)."""
    if len(values) > 2:
        ap.error(f"{flag} takes one or two numbers")
    return tuple(values * 2)[:2]


def main(argv=None):
    ap = argparse.ArgumentParser(description="nanobagel: generate, edit or answer from a checkpoint")
    ap.add_argument("--ckpt", required=True, help="checkpoint folder: any layout convert.py reads, or a train.py "
                                                  "checkpoint (out_dir/checkpoints/step_N)")
    ap.add_argument("--prompt", help="one prompt")
    ap.add_argument("--prompts", nargs="+", help="several prompts (or one file of prompts, one a line): one grid")
    ap.add_argument("--image", help="input image: edited by the prompt, or asked about with --understand")
    ap.add_argument("--understand", action="store_true", help="answer the prompt in text instead of drawing")
    ap.add_argument("--out", default="sample.png")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, nargs="+", default=[1024], help="text-to-image size: S, or H W")
    ap.add_argument("--image-size", type=int, nargs="+", default=list(VAE_SIZE),
                    help="an edited image's side range: S, or MIN MAX (resized as training does; multiples of 16)")
    ap.add_argument("--vit-size", type=int, nargs="+", default=list(VIT_SIZE),
                    help="the ViT view's side range: S, or MIN MAX (multiples of 14)")
    ap.add_argument("--steps", type=int, help="num_timesteps (points; model calls per branch = steps - 1)")
    ap.add_argument("--shift", type=float, help="timestep_shift")
    ap.add_argument("--cfg-text", type=float, help="cfg_text_scale")
    ap.add_argument("--cfg-img", type=float, help="cfg_img_scale")
    ap.add_argument("--cfg-interval", type=float, nargs=2, help="guidance only for t in (lo, hi]")
    ap.add_argument("--renorm", choices=["global", "channel", "text_channel"], help="cfg_renorm_type")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--weights", choices=["model", "ema"], help="default: ema when the folder has it")
    ap.add_argument("--tokenizer", help="tokenizer.json or its folder (default: the checkpoint's), or 'tiny' "
                                        "(data.tiny_tokenizer)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args(argv)
    if bool(args.prompt) == bool(args.prompts):
        ap.error("give exactly one of --prompt and --prompts")
    prompts = [args.prompt] if args.prompt else args.prompts
    if len(prompts) == 1 and os.path.isfile(prompts[0]) and not args.prompt:
        with open(prompts[0]) as f:
            prompts = [line.strip() for line in f if line.strip()]

    size, vae_size, vit_size = (pair(ap, getattr(args, k), "--" + k.replace("_", "-"))
                                for k in ("size", "image_size", "vit_size"))
    try:
        model, vae, cfg = load(args.ckpt, args.weights, args.device, getattr(torch, args.dtype))
        tok = args.tokenizer or convert.tokenizer_source(args.ckpt) or "tiny"
    except convert.CheckpointError as e:
        sys.exit(f"error: {e}")
    tokenizer = data.tiny_tokenizer() if tok == "tiny" else data.load_tokenizer(tok)
    image = data.open_image(args.image, None, MAX_PIXELS) if args.image else None
    if args.understand:
        for p in prompts:
            print(answer(model, vae, tokenizer, p, [image] if image else [], args.max_new_tokens, args.temperature,
                         args.seed, vit_size))
        return
    settings = {k: v for k, v in dict(num_timesteps=args.steps, timestep_shift=args.shift,
                                      cfg_text_scale=args.cfg_text, cfg_img_scale=args.cfg_img,
                                      cfg_interval=args.cfg_interval, cfg_renorm_type=args.renorm).items()
                if v is not None}
    images = [generate_image(model, vae, tokenizer, p, image, size, args.seed + i, vae_size, vit_size, **settings)
              for i, p in enumerate(prompts)]
    make_grid(images).save(args.out)
    print(f"wrote {args.out}: " + " | ".join(prompts))


if __name__ == "__main__":
    main()
