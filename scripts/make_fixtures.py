#!/usr/bin/env python3
"""Generate the test fixtures of clipft from Hugging Face `transformers`.

    python3 scripts/make_fixtures.py

writes (deterministically; every run regenerates everything):

  tests/fixtures/tiny-clip/      tiny random CLIP checkpoint in the Hugging Face layout
                                 (config.json, model.safetensors, tokenizer.json, ...)
  tests/fixtures/images/         8 small images (crops of skimage photographs) in various
                                 sizes / PIL modes / file formats
  tests/fixtures/reference.json  token ids, text/image features, pixel values, logits
                                 computed by transformers (fp32, eval, no grad)
  tests/fixtures/preprocess/     two real-size photos + the 224x224 uint8 result of
                                 CLIPImageProcessor's resize + center crop

Python is only used to generate the fixtures; the Rust test-suite never runs it.
Needs: torch transformers tokenizers pillow numpy safetensors scikit-image ftfy regex,
and open_clip_torch (only for its bundled `bpe_simple_vocab_16e6.txt.gz`; it is not imported,
`pip install --no-deps open_clip_torch` is enough).
"""

import gzip
import hashlib
import html
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from functools import lru_cache

import numpy as np
import PIL
import PIL.features
import regex as re
import torch
from PIL import Image

import skimage
import skimage.data
import tokenizers
import transformers
from transformers import CLIPConfig, CLIPModel, CLIPTokenizerFast
from transformers.image_transforms import get_resize_output_image_size
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ChannelDimension

try:  # transformers >= 5: PIL backend is its own class (the default one needs torchvision)
    from transformers import CLIPImageProcessorPil as ImageProcessor
except ImportError:  # transformers 4.x: the slow CLIPImageProcessor is the PIL/numpy one
    from transformers import CLIPImageProcessor as ImageProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
MODEL_DIR = os.path.join(FIX, "tiny-clip")
IMG_DIR = os.path.join(FIX, "images")
PRE_DIR = os.path.join(FIX, "preprocess")

N_MERGES = 1000
CONTEXT = 77
NOISE_STD = 0.05

PROMPTS = [
    "a photo of a dog.",
    "A Photo Of A CAT!!",
    "",
    "itap of a rocket.",
    "a café crème",
    "3 cats, 2 dogs & 1 bird: 100% real (2024)!",
    "it's   a dog's\tlife,\nisn't it?",
    # longer than 77 tokens: 60 distinct words -> must be truncated to 77 with EOS last
    " ".join(
        "the quick brown fox jumps over lazy dogs while seven small cats sleep under a warm "
        "yellow blanket near an old wooden door and three birds sing songs about summer rain "
        "falling on green hills where children play with red balls kites and paper boats until "
        "the golden evening light fades into quiet blue night"
        .split()[:60]
    ),
]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def rmtree_contents(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)


def f32list(t):
    """Tensor/array -> (nested) list of Python floats holding the exact f32 values."""
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().numpy()
    return np.asarray(t, dtype=np.float32).astype(np.float64).tolist()


def bpe_gz_path():
    spec = importlib.util.find_spec("open_clip")  # locate without importing (needs torchvision)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("open_clip_torch is needed for bpe_simple_vocab_16e6.txt.gz "
                 "(pip install --no-deps open_clip_torch)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    assert os.path.isfile(path), path
    return path


@lru_cache()
def bytes_to_unicode():
    """OpenAI CLIP / GPT-2 byte -> unicode table (same order as the real CLIP vocab)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


class ReferenceSlowTokenizer:
    """Copy of OpenAI's `clip/simple_tokenizer.py` (the algorithm of transformers' old slow
    CLIPTokenizer), restricted to the first `n_merges` merges. Independent check of the fast one."""

    def __init__(self, merges, vocab):
        self.byte_encoder = bytes_to_unicode()
        self.encoder = vocab
        self.bpe_ranks = {tuple(m): i for i, m in enumerate(merges)}
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pat = re.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            re.IGNORECASE)

    @staticmethod
    def _clean(text):
        try:
            import ftfy
            text = ftfy.fix_text(text)
        except ImportError:
            pass
        text = html.unescape(html.unescape(text)).strip()
        text = re.sub(r"\s+", " ", text).strip()
        return text.lower()

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text):
        ids = []
        for token in re.findall(self.pat, self._clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def __call__(self, text, context_length=CONTEXT):
        ids = [self.encoder["<|startoftext|>"]] + self.encode(text) + [self.encoder["<|endoftext|>"]]
        if len(ids) > context_length:  # OpenAI clip.tokenize(truncate=True)
            ids = ids[:context_length]
            ids[-1] = self.encoder["<|endoftext|>"]
        return ids


# --------------------------------------------------------------------------------------
# 1a. tokenizer
# --------------------------------------------------------------------------------------

def make_tokenizer():
    gz = bpe_gz_path()
    raw = gzip.open(gz).read()
    lines = raw.decode("utf-8").split("\n")
    merges = [tuple(l.split()) for l in lines[1:1 + N_MERGES]]  # line 0 is the version header
    assert len(merges) == N_MERGES and all(len(m) == 2 for m in merges)

    byte_chars = list(bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    assert len(vocab) == len(vocab_list) == 1514, len(vocab)
    assert vocab["<|startoftext|>"] == 1512 and vocab["<|endoftext|>"] == 1513

    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tok = CLIPTokenizerFast.from_pretrained(tmp, model_max_length=CONTEXT)
        tok.save_pretrained(MODEL_DIR)

    tok = CLIPTokenizerFast.from_pretrained(MODEL_DIR)
    assert len(tok) == 1514, len(tok)
    assert tok.bos_token_id == 1512 and tok.eos_token_id == 1513 and tok.pad_token_id == 1513
    slow = ReferenceSlowTokenizer(merges, vocab)
    return tok, slow, {"bpe_file": os.path.basename(gz),
                       "bpe_file_sha256": hashlib.sha256(raw).hexdigest(),
                       "n_merges": N_MERGES}


# --------------------------------------------------------------------------------------
# 1b. model + image processor
# --------------------------------------------------------------------------------------

def make_config():
    return CLIPConfig(
        text_config=dict(
            vocab_size=1514, hidden_size=32, intermediate_size=64, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=CONTEXT, hidden_act="quick_gelu",
            bos_token_id=1512, eos_token_id=1513, pad_token_id=1513, projection_dim=24,
        ),
        vision_config=dict(
            hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2,
            image_size=32, patch_size=8, num_channels=3, hidden_act="gelu", projection_dim=24,
        ),
        projection_dim=24,
    )


def make_model():
    config = make_config()
    torch.manual_seed(0)
    model = CLIPModel(config)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * NOISE_STD)
        model.logit_scale.fill_(math.log(100.0))
    model = model.float().eval()
    model.save_pretrained(MODEL_DIR, safe_serialization=True)

    proc = ImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=3,
        do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )
    proc.save_pretrained(MODEL_DIR)

    # reload everything from disk: the reference numbers come from the files we ship
    model = CLIPModel.from_pretrained(MODEL_DIR, attn_implementation="eager").float().eval()
    proc = ImageProcessor.from_pretrained(MODEL_DIR)
    from safetensors import safe_open
    with safe_open(os.path.join(MODEL_DIR, "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            assert t.dtype == torch.float32, (k, t.dtype)
            # no tensor at a trivial value (LN weight 1 / bias 0 / zeros)
            if "logit_scale" not in k:
                assert not torch.all(t == 1) and not torch.all(t == 0), k
                assert (t.std() if t.numel() > 1 else torch.tensor(1.0)) > 0.01, k
    return model, proc


# --------------------------------------------------------------------------------------
# 2. small images
# --------------------------------------------------------------------------------------

def pil(arr):
    return Image.fromarray(np.ascontiguousarray(arr))


def make_images():
    rng = np.random.default_rng(0)
    astronaut = skimage.data.astronaut()   # 512x512 RGB
    chelsea = skimage.data.chelsea()       # 300x451 RGB
    coffee = skimage.data.coffee()         # 400x600 RGB
    rocket = skimage.data.rocket()         # 427x640 RGB
    camera = skimage.data.camera()         # 512x512 gray

    LZ = Image.Resampling.LANCZOS
    specs = []

    # landscape RGB JPEG, odd size
    im = pil(coffee[40:360, 60:570]).resize((97, 61), LZ)
    specs.append(("landscape_97x61.jpg", im, dict(format="JPEG", quality=90)))

    # tall portrait RGB PNG (the rocket)
    im = pil(rocket[20:427, 250:385]).resize((40, 120), LZ)
    specs.append(("portrait_40x120.png", im, dict(format="PNG")))

    # square, odd size, RGB PNG (astronaut face)
    im = pil(astronaut[30:250, 140:360]).resize((33, 33), LZ)
    specs.append(("square_33x33.png", im, dict(format="PNG")))

    # smaller than the 32px target: must be UPscaled
    im = pil(chelsea[60:260, 100:367]).resize((20, 15), LZ)
    specs.append(("upscale_20x15.png", im, dict(format="PNG")))

    # grayscale (mode L) PNG
    im = pil(camera[40:300, 150:440]).resize((50, 45), LZ)
    assert im.mode == "L"
    specs.append(("gray_50x45.png", im, dict(format="PNG")))

    # RGBA with non-trivial alpha: horizontal gradient 0..255, a fully transparent disc,
    # and a few random alpha values; transformers composites it onto WHITE.
    rgb = np.asarray(pil(astronaut[200:500, 100:500]).resize((64, 48), LZ))
    yy, xx = np.mgrid[0:48, 0:64]
    alpha = np.round(xx / 63.0 * 255).astype(np.int32)
    alpha[(xx - 44) ** 2 + (yy - 20) ** 2 < 81] = 0
    sel = rng.random((48, 64)) < 0.1
    alpha[sel] = rng.integers(0, 256, size=int(sel.sum()))
    alpha = np.clip(alpha, 0, 255).astype(np.uint8)
    im = Image.fromarray(np.dstack([rgb, alpha]))
    assert im.mode == "RGBA"
    specs.append(("rgba_64x48.png", im, dict(format="PNG")))

    # palette (mode P) PNG, no transparency
    im = pil(chelsea[20:290, 30:440]).resize((45, 30), LZ).quantize(colors=64, method=Image.Quantize.MEDIANCUT,
                                                                   dither=Image.Dither.NONE)
    assert im.mode == "P"
    specs.append(("palette_45x30.png", im, dict(format="PNG")))

    # CMYK JPEG with a real black channel (K = 255 - max(R, G, B), "full black generation"),
    # so that decoders must use K; Pillow stores it Adobe-style (inverted) with adobe_transform 0
    rgb = np.asarray(pil(rocket[100:427, 0:230]).resize((50, 70), LZ)).astype(np.float64)
    k = 255.0 - rgb.max(axis=2)
    denom = np.maximum(255.0 - k, 1e-9)
    cmy = np.where((255.0 - k)[..., None] > 0, (255.0 - k[..., None] - rgb) / denom[..., None] * 255.0, 0.0)
    cmyk = np.dstack([cmy, k]).round().clip(0, 255).astype(np.uint8)
    im = Image.frombytes("CMYK", (50, 70), cmyk.tobytes())
    specs.append(("cmyk_50x70.jpg", im, dict(format="JPEG", quality=90)))

    for name, im, kw in specs:
        im.save(os.path.join(IMG_DIR, name), **kw)
    return [name for name, _, _ in specs]


# --------------------------------------------------------------------------------------
# 4. real-size preprocessing check
# --------------------------------------------------------------------------------------

def make_preprocess():
    openai_proc = ImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
        do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )
    photos = [
        ("photo1", pil(skimage.data.chelsea())),                                  # 451x300 landscape
        ("photo2", pil(skimage.data.astronaut()).resize((300, 410), Image.Resampling.LANCZOS)),  # portrait
    ]
    mean = np.array(OPENAI_CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.array(OPENAI_CLIP_STD, dtype=np.float32)[:, None, None]
    info = []
    for stem, im in photos:
        jpg = os.path.join(PRE_DIR, f"{stem}.jpg")
        im.save(jpg, format="JPEG", quality=90)
        src = Image.open(jpg)
        w, h = src.size
        rgb = src.convert("RGB")
        # what transformers computes for the resize (short side 224, long side int(224*long/short))
        new_h, new_w = get_resize_output_image_size(
            np.asarray(rgb), size=224, default_to_square=False, input_data_format=ChannelDimension.LAST)
        short, long = min(w, h), max(w, h)
        exp_long = int(224 * long / short)
        assert (new_w, new_h) == ((exp_long, 224) if w >= h else (224, exp_long)), (new_w, new_h)
        resized = rgb.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
        top, left = (new_h - 224) // 2, (new_w - 224) // 2
        crop = np.asarray(resized)[top:top + 224, left:left + 224]
        assert crop.shape == (224, 224, 3)
        png = os.path.join(PRE_DIR, f"{stem}_224.png")
        Image.fromarray(crop).save(png, format="PNG", optimize=True)

        # the PNG must reproduce the processor's pixel_values
        back = np.asarray(Image.open(png).convert("RGB")).astype(np.float32).transpose(2, 0, 1)
        mine = (back / np.float32(255.0) - mean) / std
        theirs = openai_proc(images=Image.open(jpg), return_tensors="pt")["pixel_values"][0].numpy()
        diff = float(np.abs(mine - theirs).max())
        assert theirs.shape == (3, 224, 224) and diff <= 1e-6, diff
        info.append({
            "file": f"{stem}.jpg", "size": [w, h], "resized_size": [int(new_w), int(new_h)],
            "crop_top": int(top), "crop_left": int(left), "result": f"{stem}_224.png",
            "max_abs_diff_vs_processor": diff,
            "decoded_rgb_mean": np.asarray(rgb, dtype=np.float64).reshape(-1, 3).mean(0).tolist(),
        })
    return info


def make_preprocess_reduced():
    """photo3.jpg, large enough for a 1/2 JPEG reduction, and Pillow's result with
    `Image.draft` (libjpeg's reduced inverse DCT) then the same resize and crop, sized from the
    full image as `clipft --fast-decode` does."""
    arr = skimage.data.hubble_deep_field()[200:660, 300:800]           # 500x460, real detail
    jpg = os.path.join(PRE_DIR, "photo3.jpg")
    pil(arr).save(jpg, format="JPEG", quality=90)
    src = Image.open(jpg)
    w, h = src.size
    new_h, new_w = get_resize_output_image_size(       # from the size only: draft before loading
        np.zeros((h, w, 3), np.uint8), size=224, default_to_square=False,
        input_data_format=ChannelDimension.LAST)
    src.draft("RGB", (new_w, new_h))
    reduced = src.size
    assert reduced == ((w + 1) // 2, (h + 1) // 2), reduced
    resized = src.convert("RGB").resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    top, left = (new_h - 224) // 2, (new_w - 224) // 2
    crop = np.asarray(resized)[top:top + 224, left:left + 224]
    png = os.path.join(PRE_DIR, "photo3_224_draft.png")
    Image.fromarray(crop).save(png, format="PNG", optimize=True)
    return {"file": "photo3.jpg", "size": [w, h], "draft_size": list(reduced),
            "resized_size": [int(new_w), int(new_h)], "crop_top": int(top), "crop_left": int(left),
            "result": "photo3_224_draft.png"}


def make_tiff_orientation():
    """orient6.tif: a 30x20 RGB TIFF with Orientation = 6, and what Pillow 13 loads from it
    (`TiffImagePlugin.load_end` applies the tag: 20x30), as a PNG."""
    arr = skimage.data.astronaut()[100:120, 200:230]
    tif = os.path.join(PRE_DIR, "orient6.tif")
    pil(arr).save(tif, format="TIFF", tiffinfo={274: 6})
    loaded = Image.open(tif).convert("RGB")
    assert loaded.size == (20, 30), loaded.size
    loaded.save(os.path.join(PRE_DIR, "orient6_pillow.png"), format="PNG")


# --------------------------------------------------------------------------------------
# READMEs (written by the script so they always match the generated files)
# --------------------------------------------------------------------------------------

def write_readmes(ver, pre, images):
    lines = [
        "# photoN.jpg: real-size photos (JPEG q90): " + ", ".join(
            f"{p['file']} {p['size'][0]}x{p['size'][1]}" for p in pre) + " (skimage chelsea; astronaut resized).",
        "# photoN_224.png: CLIPImageProcessor (openai defaults) at the uint8 stage: PIL BICUBIC resize to short side 224 / long int(224*long/short), then center crop 224x224.",
        "# " + "; ".join(f"{p['file']}: resize to {p['resized_size'][0]}x{p['resized_size'][1]} (WxH), crop top={p['crop_top']} left={p['crop_left']}" for p in pre) + ".",
        "# (png/255 - mean)/std in f32 reproduces transformers' pixel_values to <=1e-6 (asserted by scripts/make_fixtures.py).",
        "# JPEG decoding (libjpeg-turbo via Pillow) is part of the pipeline: other decoders may differ by a few levels; see reference.json \"preprocess\".",
        "# photo3.jpg: 500x460 crop of skimage hubble_deep_field (JPEG q90); photo3_224_draft.png: Pillow with Image.draft('RGB', (243, 224)) (libjpeg decodes at 1/2 size, 250x230),",
        "# then BICUBIC resize to 243x224 (the full image's resize size) and center crop top=0 left=9: what `clipft --fast-decode` computes.",
        "# orient6.tif: 30x20 RGB TIFF (skimage astronaut crop) with Orientation 6; orient6_pillow.png: what Pillow 13 loads from it (turned upright, 20x30).",
    ]
    with open(os.path.join(PRE_DIR, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(l[2:] for l in lines) + "\n")

    v = ver
    text = f"""# Test fixtures

Generated by `python3 scripts/make_fixtures.py` (deterministic; rerun to regenerate everything)
with transformers {v['transformers']}, tokenizers {v['tokenizers']}, torch {v['torch']}, Pillow {v['Pillow']}
(libjpeg-turbo {v['libjpeg_turbo']}), numpy {v['numpy']}, scikit-image {v['scikit-image']}, Python {v['python']}.
Python is only used to make these files; the Rust tests never run it.

- `tiny-clip/`: tiny random CLIP checkpoint in the Hugging Face layout (`config.json`,
  `model.safetensors` f32, `tokenizer.json`, `tokenizer_config.json`, `preprocessor_config.json`).
  Text tower: width 32, 2 layers, 4 heads, quick_gelu; vision tower: width 48, 2 layers,
  4 heads, gelu (erf), 32x32 images, 8x8 patches; projection 24; logit_scale = ln(100).
  Every parameter has random noise added (no LayerNorm at weight 1 / bias 0).
  The tokenizer is the real CLIP BPE truncated to its first {N_MERGES} merges (vocab 1514,
  `<|startoftext|>` = 1512, `<|endoftext|>` = 1513 = pad); ids below 1512 equal the real CLIP ids.
- `images/`: {len(images)} small crops of skimage photographs exercising preprocessing
  (odd sizes, upscaling, modes L / RGBA / P / CMYK, PNG and JPEG).
- `reference.json`: computed by transformers (fp32, eval, no grad) from the files above:
  `prompts`, `input_ids`/`attention_mask` (padding to 77, truncation), `pooled_index`,
  `text_features`, per-image `mode`/`size`/`resized_size`/crop offsets/`decoded_rgb_mean`/
  `pixel_values` (flat CHW 3x32x32)/`image_features`, `logit_scale` (= exp),
  `logits_per_image` [image][prompt], `preprocess` (see below), `notes`, `versions`.
  Features are the projected pooled outputs, NOT L2-normalised.
- `preprocess/`: two real-size JPEG photos and the 224x224 uint8 result of the openai
  CLIPImageProcessor resize + center crop (see `preprocess/README.md`).
"""
    with open(os.path.join(FIX, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

def versions():
    v = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "Pillow": PIL.__version__,
        "numpy": np.__version__,
        "scikit-image": skimage.__version__,
        "image_processor_class": ImageProcessor.__name__,
        "libjpeg": PIL.features.version("jpg"),
        "libjpeg_turbo": PIL.features.version("libjpeg_turbo"),
        "zlib": PIL.features.version("zlib"),
    }
    try:
        import safetensors
        v["safetensors"] = safetensors.__version__
    except Exception:
        pass
    try:
        from importlib.metadata import version
        v["open_clip_torch"] = version("open_clip_torch")
    except Exception:
        pass
    return v


def dir_size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.use_deterministic_algorithms(True)
    for d in (MODEL_DIR, IMG_DIR, PRE_DIR):
        rmtree_contents(d)
    ver = versions()
    print(json.dumps(ver, indent=1))

    tok, slow, tok_info = make_tokenizer()
    model, proc = make_model()

    # ---- text --------------------------------------------------------------------------
    enc = tok(PROMPTS, padding="max_length", max_length=CONTEXT, truncation=True)
    input_ids, attn = enc["input_ids"], enc["attention_mask"]
    for p, ids, m in zip(PROMPTS, input_ids, attn):
        n = sum(m)
        assert ids[:n] == slow(p), (p, ids[:n], slow(p))
        assert ids[0] == 1512 and ids[n - 1] == 1513 and all(i == 1513 for i in ids[n:])
        assert m == [1] * n + [0] * (CONTEXT - n)
    assert sum(attn[-1]) == CONTEXT, "long prompt should be truncated"

    ids_t = torch.tensor(input_ids)
    mask_t = torch.tensor(attn)

    def feats(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    with torch.no_grad():
        text_features = feats(model.get_text_features(input_ids=ids_t, attention_mask=mask_t))
        text_nomask = feats(model.get_text_features(input_ids=ids_t))
        tm = model.text_model(input_ids=ids_t, attention_mask=mask_t)
        # how transformers pools: first position of eos_token_id (config.eos_token_id != 2)
        pooled_index = (ids_t == model.config.text_config.eos_token_id).int().argmax(-1)
        assert torch.equal(tm.pooler_output, tm.last_hidden_state[torch.arange(len(PROMPTS)), pooled_index])
        assert torch.equal(pooled_index, ids_t.argmax(-1))  # eos is also the largest id
        sdpa = CLIPModel.from_pretrained(MODEL_DIR, attn_implementation="sdpa").eval()
        text_sdpa = feats(sdpa.get_text_features(input_ids=ids_t, attention_mask=mask_t))
    mask_diff = float((text_features - text_nomask).abs().max())
    sdpa_diff = float((text_features - text_sdpa).abs().max())

    # ---- images ------------------------------------------------------------------------
    names = make_images()
    images, pix = [], []
    from transformers.image_transforms import convert_to_rgb
    for name in names:
        path = os.path.join(IMG_DIR, name)
        im = Image.open(path)
        pv = proc(images=Image.open(path), return_tensors="pt")["pixel_values"]
        assert pv.shape == (1, 3, 32, 32), pv.shape
        pix.append(pv)
        rgb = np.asarray(convert_to_rgb(Image.open(path), return_numpy=True)
                         if "return_numpy" in convert_to_rgb.__code__.co_varnames
                         else convert_to_rgb(Image.open(path)))
        w, h = im.size
        nh, nw = get_resize_output_image_size(rgb, size=32, default_to_square=False,
                                              input_data_format=ChannelDimension.LAST)
        images.append({
            "file": name, "mode": im.mode, "format": im.format, "size": [w, h],
            "resized_size": [int(nw), int(nh)],
            "crop_top": (int(nh) - 32) // 2, "crop_left": (int(nw) - 32) // 2,
            "decoded_rgb_mean": np.asarray(rgb, dtype=np.float64).reshape(-1, 3).mean(0).tolist(),
            "pixel_values": f32list(pv[0].reshape(-1)),
        })
    pix = torch.cat(pix)
    with torch.no_grad():
        image_features = feats(model.get_image_features(pixel_values=pix))
        out = model(input_ids=ids_t, attention_mask=mask_t, pixel_values=pix)
        # sanity: logits == scale * normalized dot products
        ti = image_features / image_features.norm(dim=-1, keepdim=True)
        tt = text_features / text_features.norm(dim=-1, keepdim=True)
        assert torch.allclose(out.logits_per_image, 100.0 * ti @ tt.T, atol=1e-4)
    for rec, row in zip(images, image_features):
        rec["image_features"] = f32list(row)

    pre = make_preprocess()
    make_preprocess_reduced()
    make_tiff_orientation()

    logit_scale = float(model.logit_scale.detach().exp())
    ref = {
        "versions": ver,
        "generator": "scripts/make_fixtures.py",
        "model_dir": "tiny-clip",
        "tokenizer": tok_info,
        "notes": {
            "text_pooling": "last_hidden_state (after final_layer_norm) at the FIRST position where "
                            "input_ids == eos_token_id (1513); equals argmax(input_ids) here",
            "text_features_max_abs_diff_without_attention_mask": mask_diff,
            "text_features_max_abs_diff_eager_vs_sdpa": sdpa_diff,
            "features": "get_text_features / get_image_features = projected pooled output, NOT L2-normalized",
            "logits_per_image": "logit_scale * normalize(image_features) @ normalize(text_features).T",
            "rgba": "transformers composites images with alpha (and palette transparency) onto a WHITE "
                    "background before dropping alpha",
            "attn_implementation": "eager",
        },
        "prompts": PROMPTS,
        "input_ids": input_ids,
        "attention_mask": attn,
        "pooled_index": pooled_index.tolist(),
        "text_features": f32list(text_features),
        "images": images,
        "logit_scale": logit_scale,
        "logit_scale_raw": float(model.logit_scale.detach()),
        "logits_per_image": f32list(out.logits_per_image),
        "preprocess": pre,
    }
    path = os.path.join(FIX, "reference.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(ref, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        f.write("\n")

    write_readmes(ver, pre, images)

    sizes = {p: dir_size(os.path.join(FIX, p)) for p in ("tiny-clip", "images", "preprocess")}
    sizes["reference.json"] = os.path.getsize(path)
    print(json.dumps(sizes, indent=1))
    assert sizes["reference.json"] < 1_000_000
    assert sizes["images"] < 300_000
    assert sizes["preprocess"] < 500_000
    print("text features max |diff| without attention_mask:", mask_diff, " eager vs sdpa:", sdpa_diff)
    print("logit_scale:", logit_scale)
    for p, ids, m in zip(PROMPTS, input_ids, attn):
        print(repr(p)[:50], sum(m), ids[:sum(m)][:12], "...", ids[max(0, sum(m) - 3):sum(m)])
    for i in pre:
        print(i)


if __name__ == "__main__":
    if sys.argv[1:] == ["--only-reduced"]:  # just photo3 (added later; leaves the rest as it is)
        print(make_preprocess_reduced())
    else:
        main()
