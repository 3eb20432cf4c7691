"""Tiny vision-language models of the families the text adapter's drop mode knows, and their batches: an image's
placeholders among the words, the images as each model's processor gives them."""

from __future__ import annotations

import torch
from conftest import CLS, LANGUAGE_MODELS, PAD, SEP, lm_labels, text_batch

IMAGE = 63  # a vision-language model's image placeholder: a token id its configuration names, never masked
PATCHES = 4  # placeholders an image: LLaVA's 16-pixel image of 8-pixel patches (class token left out), Qwen2-VL's
# 8-pixel image of 2-pixel patches merged 2 x 2, and the others' 16-pixel image of 4-pixel patches merged 2 x 2
# LLaVA-NeXT's and LLaVA-OneVision's: the whole image's 4 features, its one tile's 4, a newline after each tile row
PLACEHOLDERS = {"llava_next": 10, "llava_next_video": 10, "llava_onevision": 10}
VIDEO = IMAGE - 1  # a video's placeholder
# a video's placeholders: 4 frames of 16 pixels, LLaVA-NeXT-Video's each pooled to 1 feature, LLaVA-OneVision's to 1
# and a newline after the video; Qwen2-VL's 2 by 2 frames (its temporal patch) of 4 x 4 patches merged 2 x 2;
# Video-LLaVA's each its 4 patches and class token
VIDEO_PLACEHOLDERS = {"llava_next_video": 4, "llava_onevision": 5, "qwen2_vl": 8, "video_llava": 20}
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16)


def llava_kin(config_class, model_class, text_class, vision, **config):
    """A tiny vision-language model of LLaVA's layout: a vision tower (``vision``: 16-pixel images), a projector, a
    decoder of ``text_class``; an image fills its placeholders in its sample."""
    text = text_class(**LANGUAGE_MODELS["llama"][1], pad_token_id=PAD, bos_token_id=CLS)
    torch.manual_seed(0)
    return model_class(config_class(vision_config=vision, text_config=text, **config))


def llava():
    """A tiny LLaVA: a CLIP vision tower, a projector, a Llama; an image fills the 4 placeholders of its sample."""
    import transformers as tf

    vision = tf.CLIPVisionConfig(**VISION, patch_size=8)
    select = dict(image_token_id=IMAGE, vision_feature_select_strategy="default", vision_feature_layer=-1)
    return llava_kin(tf.LlavaConfig, tf.LlavaForConditionalGeneration, tf.LlamaConfig, vision, **select)


def _llava_next(video: bool = False):
    """LLaVA-NeXT: an image seen whole and in tiles (here one tile of 16 pixels), on a Llama; LLaVA-NeXT-Video's
    videos too, each frame's features pooled 2 x 2 (to one here)."""
    import transformers as tf

    vision = tf.CLIPVisionConfig(**VISION, patch_size=8)
    tiles = dict(image_token_id=IMAGE, image_grid_pinpoints=[[16, 16]], vision_feature_layer=-1)
    if video:
        model_class = tf.LlavaNextVideoForConditionalGeneration
        return llava_kin(tf.LlavaNextVideoConfig, model_class, tf.LlamaConfig, vision, **tiles, video_token_id=VIDEO)
    return llava_kin(tf.LlavaNextConfig, tf.LlavaNextForConditionalGeneration, tf.LlamaConfig, vision, **tiles)


def _llava_onevision():
    """LLaVA-OneVision: LLaVA-NeXT's tiles, a SigLIP vision tower, a Qwen2."""
    import transformers as tf

    vision = tf.SiglipVisionConfig(**VISION, patch_size=8)
    tiles = dict(image_token_id=IMAGE, video_token_id=VIDEO, image_grid_pinpoints=[[16, 16]])
    model_class = tf.LlavaOnevisionForConditionalGeneration
    return llava_kin(tf.LlavaOnevisionConfig, model_class, tf.Qwen2Config, vision, **tiles, vision_feature_layer=-1)


def _mistral3():
    """Mistral 3: a Pixtral vision tower (4-pixel patches, rotary over rows and columns), its patches merged 2 x 2,
    on a Mistral."""
    import transformers as tf

    vision = tf.PixtralVisionConfig(**VISION, patch_size=4, head_dim=16)
    merge = dict(image_token_index=IMAGE, spatial_merge_size=2, vision_feature_layer=-1)
    return llava_kin(tf.Mistral3Config, tf.Mistral3ForConditionalGeneration, tf.MistralConfig, vision, **merge)


def _internvl():
    """InternVL: its vision tower (4-pixel patches), pixels shuffled into 2 x 2 fewer tokens, on a Qwen2."""
    import transformers as tf

    vision = dict(VISION, image_size=[16, 16], patch_size=[4, 4])
    shuffle = dict(image_token_id=IMAGE, downsample_ratio=0.5, vision_feature_layer=-1)
    return llava_kin(tf.InternVLConfig, tf.InternVLForConditionalGeneration, tf.Qwen2Config, vision, **shuffle)


def _aya_vision(cohere2_vision: bool = False):
    """Aya Vision (or Command A Vision, ``cohere2_vision``): a SigLIP vision tower (4-pixel patches), pixels shuffled
    into 2 x 2 fewer tokens, on a Cohere 2 (a sliding window of 4 tokens in its first layer, shorter than the
    batch)."""
    import functools

    import transformers as tf

    text_class = functools.partial(
        tf.Cohere2Config, sliding_window=4, layer_types=["sliding_attention", "full_attention"]
    )
    vision = tf.SiglipVisionConfig(**VISION, patch_size=4)
    if cohere2_vision:
        model_class, ids = tf.Cohere2VisionForConditionalGeneration, dict(image_token_id=IMAGE, downsample_factor=2)
        return llava_kin(tf.Cohere2VisionConfig, model_class, text_class, vision, alignment_intermediate_size=64, **ids)
    model_class, ids = tf.AyaVisionForConditionalGeneration, dict(image_token_index=IMAGE, downsample_factor=2)
    return llava_kin(tf.AyaVisionConfig, model_class, text_class, vision, **ids)


def _idefics3(smolvlm: bool = False):
    """Idefics3 (or SmolVLM, its successor): a SigLIP-style vision tower (4-pixel patches), pixels shuffled into
    2 x 2 fewer tokens, on a Llama."""
    import transformers as tf

    config_class, model_class = (
        (tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration)
        if smolvlm
        else (tf.Idefics3Config, tf.Idefics3ForConditionalGeneration)
    )
    vision = dict(VISION, patch_size=4)
    return llava_kin(config_class, model_class, tf.LlamaConfig, vision, image_token_id=IMAGE, scale_factor=2)


def _qwen_vl(config_class, model_class, **vision):
    """A tiny Qwen2-VL-style model: its vision tower (patches of 2 x 2 pixels x 2 frames, merged 2 x 2, and
    ``vision``), a Qwen2 with 3-D RoPE (time, height, width) over the image's placeholders; vision start and end
    tokens around them."""
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    text = dict(LANGUAGE_MODELS["llama"][1], pad_token_id=PAD, bos_token_id=CLS, eos_token_id=SEP, rope_parameters=rope)
    config = config_class(
        text_config=text,
        vision_config=dict(
            vision, hidden_size=32, num_heads=2, patch_size=2, spatial_merge_size=2, temporal_patch_size=2
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=IMAGE - 2,
        vision_end_token_id=IMAGE - 3,
    )
    torch.manual_seed(0)
    return model_class(config)


def _qwen2_vl():
    import transformers

    vision = dict(depth=1, embed_dim=32, mlp_ratio=2)
    return _qwen_vl(transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration, **vision)


def _qwen2_5_vl():
    """Qwen2.5-VL's vision tower: a block of windowed attention (4-pixel windows: each merged 2 x 2 patches, 4 an
    image) and one of full attention, and an MLP projector."""
    import transformers

    vision = dict(depth=2, intermediate_size=64, window_size=4, fullatt_block_indexes=[1], out_hidden_size=32)
    return _qwen_vl(transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration, **vision)


def _glm4v():
    """A tiny GLM-4V: Qwen2-VL's layout of patches and 3-D RoPE, its own vision tower and image start and end tokens."""
    import transformers

    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    text = dict(LANGUAGE_MODELS["llama"][1], pad_token_id=PAD, bos_token_id=CLS, eos_token_id=SEP, rope_parameters=rope)
    vision = dict(depth=1, hidden_size=32, num_heads=2, patch_size=2, spatial_merge_size=2, temporal_patch_size=2)
    vision.update(out_hidden_size=32, intermediate_size=64, image_size=8)
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, image_start_token_id=IMAGE - 2)
    ids.update(image_end_token_id=IMAGE - 3, video_start_token_id=IMAGE - 4, video_end_token_id=IMAGE - 5)
    torch.manual_seed(0)
    return transformers.Glm4vForConditionalGeneration(
        transformers.Glm4vConfig(text_config=text, vision_config=vision, **ids)
    )


def _paligemma(version: int = 1):
    """PaliGemma: a SigLIP vision tower (8-pixel patches), image and prompt attending each other both ways, on a
    Gemma; PaliGemma 2's Gemma 2 with a sliding window of 4 tokens (shorter than the prefix, which sees all of
    itself)."""
    import functools

    import transformers as tf

    text_class = functools.partial(tf.GemmaConfig, head_dim=16)
    if version == 2:
        text_class = functools.partial(tf.Gemma2Config, head_dim=16, sliding_window=4)
    vision = tf.SiglipVisionConfig(**VISION, patch_size=8)
    model_class, ids = tf.PaliGemmaForConditionalGeneration, dict(image_token_id=IMAGE, projection_dim=32)
    return llava_kin(tf.PaliGemmaConfig, model_class, text_class, vision, **ids)


def _video_llava():
    """Video-LLaVA: a CLIP tower for images (class token left out) and another for videos (each frame's 4 patches and
    its class token), on a Llama."""
    import transformers as tf

    vision = tf.CLIPVisionConfig(**VISION, patch_size=8)
    select = dict(image_token_index=IMAGE, video_token_index=VIDEO, vision_feature_layer=-1)
    model_class = tf.VideoLlavaForConditionalGeneration
    return llava_kin(tf.VideoLlavaConfig, model_class, tf.LlamaConfig, vision, **select)


def _llama4():
    """A tiny Llama 4: its vision tower (4-pixel patches, pixels shuffled into 2 x 2 fewer tokens), on its text model
    of 4 layers, the first three attending within chunks of 8 tokens (shorter than the batch), the fourth to all
    without RoPE, each a mixture of 2 experts."""
    import transformers as tf

    text = dict(LANGUAGE_MODELS["llama"][1], num_hidden_layers=4, pad_token_id=PAD, bos_token_id=CLS)
    text.update(head_dim=16, intermediate_size_mlp=64, num_local_experts=2, attention_chunk_size=8)
    text.update(layer_types=["chunked_attention"] * 3 + ["full_attention"], no_rope_layers=[1, 1, 1, 0])
    vision = dict(VISION, intermediate_size=128, patch_size=4, projector_input_dim=32, projector_output_dim=32)
    ids = dict(image_token_index=IMAGE, boi_token_index=IMAGE - 2, eoi_token_index=IMAGE - 3)
    torch.manual_seed(0)
    config = tf.Llama4Config(vision_config=dict(vision, vision_output_dim=32), text_config=text, **ids)
    return tf.Llama4ForConditionalGeneration(config)


def vlm_batch(kind: str, videos: bool = False) -> dict[str, torch.Tensor]:
    """A supervised fine-tuning batch of 4: [CLS], an image's placeholders (Qwen2-VL's between its vision start and
    end tokens), then words; no label on the prompt (the image's tokens among it) or the padding; the images as the
    model's processor gives them. ``videos``: a video of 4 frames a sample in place of the image."""
    n = (VIDEO_PLACEHOLDERS if videos else PLACEHOLDERS).get(kind, PATCHES)
    qwen, placeholder = kind in QWEN_LAYOUT, VIDEO if videos else IMAGE
    batch = text_batch(batch=4, length=16 + n - PATCHES)
    ids = batch["input_ids"]
    ids[ids >= IMAGE - 3] = 4  # words' ids: none of the image's
    if qwen:
        ids[:, 1], ids[:, 2 + n] = IMAGE - 2, IMAGE - 3
    ids[:, 1 + qwen : 1 + qwen + n] = placeholder
    batch = lm_labels(batch, prompt=n + 3)
    g = torch.Generator().manual_seed(7)
    if qwen:  # 16 patches an image of 2 frames: 3 channels x 2 frames x 2x2 pixels; a video's 4 frames, twice that
        pixels = torch.randn(4 * 16 * (1 + videos), 3 * 2 * 2 * 2, generator=g)
        grid = torch.tensor([[1 + videos, 4, 4]] * 4)  # frames (by 2), patch rows, patch columns
        media = ("pixel_values_videos", "video_grid_thw") if videos else ("pixel_values", "image_grid_thw")
        types = (ids == placeholder).long() * (1 + videos)  # 1 on an image's placeholders, 2 on a video's
        return {**batch, media[0]: pixels, media[1]: grid, "mm_token_type_ids": types}
    if videos:
        return {**batch, "pixel_values_videos": torch.randn(4, 4, 3, 16, 16, generator=g)}
    tiles = kind in PLACEHOLDERS  # the whole image and its one tile
    shape = (4, 2, 3, 16, 16) if tiles else (4, 1, 3, 16, 16) if kind in ("idefics3", "smolvlm") else (4, 3, 16, 16)
    images = {"pixel_values": torch.randn(shape, generator=g)}
    if tiles or kind == "mistral3":
        images["image_sizes"] = torch.tensor([[16, 16]] * 4)
    if kind.startswith("paligemma"):  # 0 on the prefix (the image and the prompt), 1 on the rest
        images["token_type_ids"] = (batch["labels"] != -100).long()
    return {**batch, **images}


QWEN_LAYOUT = ("qwen2_vl", "qwen2_5_vl", "glm4v")  # vision start and end tokens, 3-D RoPE, flattened patches
VLMS = {"llava": llava, "llava_next": _llava_next, "llava_next_video": lambda: _llava_next(video=True)}
VLMS |= {"llava_onevision": _llava_onevision, "mistral3": _mistral3}
VLMS |= {"internvl": _internvl, "idefics3": _idefics3, "smolvlm": lambda: _idefics3(smolvlm=True)}
VLMS |= {"paligemma": _paligemma, "paligemma2": lambda: _paligemma(version=2)}
VLMS |= {"aya_vision": _aya_vision, "cohere2_vision": lambda: _aya_vision(cohere2_vision=True)}
VLMS |= {"qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "glm4v": _glm4v, "llama4": _llama4}
VLMS |= {"video_llava": _video_llava}
