"""TextSim = cos(CLIP_text(prompt), CLIP_image(generated image)), the paper's text-consistency score.

Only a **local** transformers CLIP folder is used (``local_files_only=True``; nothing is downloaded), e.g. a
saved ``openai/clip-vit-large-patch14``. Without one the metric is skipped with a message that says why.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import RecognizerSpecError

SKIP_NO_MODEL = ("TextSim skipped: no CLIP model given. Pass --clip-model <local folder> holding a transformers "
                 "CLIP model (config.json, weights, tokenizer and preprocessor files), e.g. one saved with "
                 "CLIPModel.save_pretrained + CLIPProcessor.save_pretrained.")


class TextScorer:
    """CLIP image–text cosine from a local folder."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        if not os.path.isdir(model_dir):
            raise RecognizerSpecError(f"--clip-model {model_dir!r} is not a folder; give a local transformers "
                                      "CLIP model folder (nothing is downloaded)")
        try:
            import torch
            from transformers import CLIPModel, CLIPProcessor
        except ImportError as e:
            raise RecognizerSpecError(f"TextSim needs torch and transformers ({e}); pip install transformers") from e
        try:
            self.model = CLIPModel.from_pretrained(model_dir, local_files_only=True).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise RecognizerSpecError(f"--clip-model {model_dir!r} is not a loadable CLIP model: {e}") from e
        self.torch, self.device = torch, device
        self.max_len = int(self.model.config.text_config.max_position_embeddings)
        self.name = os.path.basename(os.path.normpath(model_dir))

    def score(self, image_rgb: np.ndarray, prompt: str) -> float:
        from PIL import Image
        inputs = self.processor(text=[prompt], images=[Image.fromarray(image_rgb)], return_tensors="pt",
                                padding=True, truncation=True, max_length=self.max_len)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with self.torch.no_grad():
            out = self.model(**inputs)
        # text_embeds / image_embeds are the projected, L2-normalised features
        return float((out.text_embeds[0] * out.image_embeds[0]).sum())


def make_text_scorer(model_dir: str | None) -> tuple[TextScorer | None, str]:
    """``(scorer, message)``: the scorer, or None and the skip message to print."""
    if not model_dir:
        return None, SKIP_NO_MODEL
    scorer = TextScorer(model_dir)
    return scorer, f"TextSim: CLIP model {scorer.name!r} (local)"
