"""The text files an export carries beside its model: README.md (around the model card) and client.py, a client
with onnxruntime, tokenizers, Pillow and numpy alone. Templates only; ``export.py`` fills and writes them."""

CLIENT = '''\
"""A client of this exported mlc model: onnxruntime, tokenizers, Pillow and numpy; no mlc, no torch.

    python path/to/model/client.py photo.jpg "its caption" [photo2.jpg "its caption" ...]

Runs from any folder (it finds export.json beside itself) and prints each photo's labels with their
probabilities. From Python: predict(paths, captions) -> [[(name, probability), ...], ...].
"""
import json, math, os, sys
import numpy as np, onnxruntime as ort
from PIL import Image, ImageOps
from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
meta = json.load(open(os.path.join(HERE, "export.json"), encoding="utf-8"))
im_rule, tx_rule = meta["image"], meta["text"]
session = ort.InferenceSession(os.path.join(HERE, meta["graph"]["file"]))
tok = Tokenizer.from_file(os.path.join(HERE, tx_rule["tokenizer"])) if tx_rule else None

def pixels(path):
    im = Image.open(path)
    side, crop = im_rule["resize"]["shorter_side"], im_rule["crop"]["size"]
    if im_rule["jpeg_draft"] and im.format == "JPEG" and min(im.size) >= 2 * side:
        s = side / min(im.size)
        im.draft("RGB", (math.ceil(im.width * s), math.ceil(im.height * s)))
    im = ImageOps.exif_transpose(im)
    if im.mode != "RGB":  # transparent pixels on white
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA")).convert("RGB")
    w, h = im.size
    long = int(side * max(w, h) / min(w, h))
    size = (side, long) if w <= h else (long, side)
    if size != (w, h):
        im = im.resize(size, getattr(Image.Resampling, im_rule["resize"]["interpolation"].upper()))
    top, left = round((im.height - crop) / 2), round((im.width - crop) / 2)
    return np.asarray(im.crop((left, top, left + crop, top + crop))).transpose(2, 0, 1)

def check_captions(paths, captions):
    """The missing-caption rule: a model that reads captions gets one, not empty, for every photo."""
    if tok is None:
        return ["" for _ in paths]
    captions = list(captions or [])
    for i, path in enumerate(paths):
        if i >= len(captions) or not str(captions[i]).strip():
            raise ValueError(f"{path}: no caption; this model reads captions too (trained on both)")
    return captions

def probabilities(paths, captions):
    """(N, C) probabilities, columns in the order of export.json's label_ids."""
    captions = check_captions(paths, captions)
    feed = {"pixels": np.stack([pixels(p) for p in paths])} if im_rule else {}
    if tok:
        enc = tok.encode_batch([c.lower() if tx_rule["lowercase"] else c for c in captions])
        feed["input_ids"] = np.array([e.ids for e in enc], dtype=np.int64)
        feed["attention_mask"] = np.array([e.attention_mask for e in enc], dtype=np.int64)
    names = {i.name for i in session.get_inputs()}
    return session.run(["probabilities"], {k: v for k, v in feed.items() if k in names})[0]

# {decision}
def decide(probs):
    """export.json's decision rule (mlc's decision.decide, above), in one place: (N, C) probabilities -> (N, C) 0/1."""
    return apply_decision(probs, meta["decision"])

def predict(paths, captions):
    """Each photo's labels as (name, probability), most probable first."""
    probs = probabilities(paths, captions)
    return [sorted(((meta["label_names"][j], float(p[j])) for j in np.flatnonzero(row)), key=lambda x: -x[1])
            for p, row in zip(probs, decide(probs))]

def predict_ids(paths, captions):
    """Each photo's label ids (export.json's label_ids), in label order."""
    return [[meta["label_ids"][j] for j in np.flatnonzero(row)] for row in decide(probabilities(paths, captions))]

if __name__ == "__main__":
    args = sys.argv[1:]
    paths, captions = (args[::2], args[1::2]) if tok else (args, None)
    if not paths:
        sys.exit(f"usage: python {sys.argv[0]} photo.jpg" + (' "its caption"' if tok else "") + " [...]")
    try:
        rows = predict(paths, captions)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    for path, labels in zip(paths, rows):
        print(path + "\\t" + ", ".join(f"{name} {p:.3f}" for name, p in labels))
'''

README = '''\
# An exported mlc model

A multi-label classifier of photos and their captions ({classes} labels), exported by `mlc export`.
`mlc predict THIS_FOLDER photo.jpg --caption "..."` runs it (no torch needed), or `client.py` here, or any
program with onnxruntime, tokenizers, Pillow and numpy.

{card}
## Files

- `model.onnx` ({dtype}): inputs {inputs}; output `probabilities` float32 (batch, {classes}), the
  fold heads' mean probability of each label.
- `export.json`: how a photo becomes `pixels` (`image`: EXIF orientation, RGB, resize rule, centre crop,
  interpolation; the graph normalises), how a caption becomes tokens (`text`), the label ids and names,
  the per-label `thresholds` and the decision rule (`decision`: every photo gets at least one label),
  the model card (`card`), and every file's size and sha256.
- `tokenizer.json`: the caption tokenizer, truncation and padding set.
- `client.py`: a client with onnxruntime, tokenizers, Pillow and numpy alone, from any folder:
  `python path/to/this/folder/client.py photo.jpg "a caption"` prints each photo's labels and probabilities;
  `predict(paths, captions)` from Python. It is part of the folder's file list: keep the folder as it is
  (mlc checks every file against export.json).
'''

SAFETENSORS_README = '''\
# An exported mlc model (safetensors)

A multi-label classifier of photos and their captions ({classes} labels), exported by `mlc export --format
safetensors`: the encoders (`encoders/`) and fold heads (`head-K.safetensors`) for torch. `mlc predict THIS_FOLDER
photo.jpg --caption "..."` or `pipeline.load(THIS_FOLDER)` runs it; `export.json` holds the labels, thresholds,
decision rule, the model card (`card`) and every file's size and sha256.

{card}'''
