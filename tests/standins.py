"""Tiny stand-ins of the real recipes' models and a data root in the real layouts, written locally.

`build_standins(root)` saves, with each family's own transformers classes and `save_pretrained`, two-layer
narrow versions of the checkpoints the 2B-7B recipes load (StableLM-2, Qwen (as Qwen2), Phi-2, Vicuna
(Llama), the CLIP ViT-L/14-336 tower at 28 px with patch 14), each LM with a tokenizer trained here, and
the visual tower of the ViMoE recipe as a safetensors file. `build_data_root(root)` writes a handful of
records in each real layout: LLaVA's `blip_laion_cc_sbu_558k.json` and `llava_v1_5_mix665k.json` (a
text-only conversation among them; images under coco/, gqa/, ocr_vqa/, textvqa/, vg/ as in the real mix),
POPE's official question files (the first records of ../shared/data/pope when present), GQA's
testdev-balanced questions, and ADE20K's images/ and annotations/. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SHARED_POPE = Path(__file__).resolve().parents[2] / "shared" / "data" / "pope"
SPLITS = ("random", "popular", "adversarial")
TEXT = ["Is there a person in the image? Yes", "What color is the car? Red", "Answer the question using a single "
        "word or phrase.", "A chat between a curious user and an artificial intelligence assistant.", "USER: ASSISTANT:"]
LLMS = {  # checkpoint folder the recipe names -> (transformers config class, model class, extra fields)
    "stablelm-2-1_6b": ("StableLmConfig", "StableLmForCausalLM", {"use_qkv_bias": True, "partial_rotary_factor": 0.25}),
    "qwen-1_8b": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "phi-2": ("PhiConfig", "PhiForCausalLM", {"partial_rotary_factor": 0.4, "hidden_act": "gelu_new"}),
    "vicuna-7b-v1.5": ("LlamaConfig", "LlamaForCausalLM", {}),
}
IMAGE_SIZE, PATCH = 28, 14  # the CLIP stand-in: 2 x 2 patches of ViT-L/14's size


def build_standins(root: Path) -> dict[str, Path]:
    import torch
    import transformers
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from moebench.models.tokenizer import train_tokenizer

    root = Path(root)
    torch.manual_seed(0)
    out = {}
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH,
                                            projection_dim=16))
    clip.save_pretrained(root / "clip-vit-large-patch14-336")
    out["clip"] = root / "clip-vit-large-patch14-336"
    tok = train_tokenizer(TEXT, 300)
    for name, (config_cls, model_cls, extra) in LLMS.items():
        cfg = getattr(transformers, config_cls)(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, bos_token_id=None, **extra)
        getattr(transformers, model_cls)(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    from safetensors.torch import save_model

    from moebench.config import ViTConfig
    from moebench.vision.vit import build_vit

    save_model(build_vit(ViTConfig(image_size=32, patch_size=16, width=32, layers=4, heads=2)),
               str(root / "vit_b16_visual.safetensors"))
    out["vit"] = root / "vit_b16_visual.safetensors"
    return out


def _image(path: Path, seed: int, size=(40, 52)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path.name


def _conversation(question: str, answer: str, image: bool = True) -> list[dict]:
    return [{"from": "human", "value": ("<image>\n" if image else "") + question}, {"from": "gpt", "value": answer}]


def build_data_root(root: Path) -> Path:
    """A data root in the layouts the real recipes and their tasks read."""
    root = Path(root)
    llava = root / "llava"
    pretrain = []
    for i in range(6):  # blip_laion_cc_sbu_558k.json: {id, image, conversations} with a plain caption
        rel = f"{i:05d}/{i:09d}.jpg"
        _image(llava / "images" / "llava_pretrain" / rel, i)
        pretrain.append({"id": f"{i:09d}", "image": rel,
                         "conversations": _conversation("Render a clear and concise summary of the photo.",
                                                        f"a photo of thing {i}")})
    (llava / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(pretrain))
    mix = []
    sources = ["coco/train2017/000000033471.jpg", "gqa/images/2354786.jpg", "ocr_vqa/images/140031996.jpg",
               "textvqa/train_images/0004e08b1d6f2c8c.jpg", "vg/VG_100K/2345678.jpg", "coco/train2017/000000052846.jpg"]
    for i, rel in enumerate(sources):  # llava_v1_5_mix665k.json: multi-turn conversations, images by source
        _image(llava / "images" / rel, 100 + i)
        conv = _conversation("What is in the image?", "A person.") + [
            {"from": "human", "value": "Is it red?\nAnswer the question using a single word or phrase."},
            {"from": "gpt", "value": "Yes"}]
        mix.append({"id": str(i), "image": rel, "conversations": conv})
    mix.append({"id": "text-only", "conversations": _conversation("Say hello.", "Hello.", image=False)})
    (llava / "llava_v1_5_mix665k.json").write_text(json.dumps(mix))

    pope_images = set()
    (root / "pope").mkdir(parents=True, exist_ok=True)
    for split in SPLITS:  # POPE: JSON lines {question_id, image, text, label}
        shipped = SHARED_POPE / f"coco_pope_{split}.json"
        lines = shipped.read_text().splitlines()[:6] if shipped.is_file() else [json.dumps(
            {"question_id": q + 1, "image": f"COCO_val2014_{q // 3:012d}.jpg", "text": "Is there a person in the "
             "image?", "label": "yes" if q % 2 else "no"}) for q in range(6)]
        (root / "pope" / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
        pope_images |= {json.loads(line)["image"] for line in lines}
    for k, name in enumerate(sorted(pope_images)):
        _image(root / "coco" / "val2014" / name, 200 + k)
    gqa = {}
    for i in range(4):  # GQA testdev-balanced: {qid: {imageId, question, answer, ...}}
        gqa[f"20{i:06d}"] = {"imageId": f"n{i:06d}", "question": "What color is the car?", "answer": "red",
                             "fullAnswer": "The car is red.", "isBalanced": True, "types": {"structural": "query"}}
        _image(root / "gqa" / "images" / f"n{i:06d}.jpg", 300 + i)
    (root / "gqa").mkdir(parents=True, exist_ok=True)
    (root / "gqa" / "testdev_balanced_questions.json").write_text(json.dumps(gqa))

    ade = root / "ADEChallengeData2016"
    for split, n in (("training", 4), ("validation", 2)):
        for i in range(n):
            stem = f"ADE_{split}_{i:08d}"
            _image(ade / "images" / split / f"{stem}.jpg", 400 + i)
            (ade / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.random.default_rng(500 + i).integers(0, 151, (40, 52), dtype=np.uint8)).save(
                ade / "annotations" / split / f"{stem}.png")
    return root
