"""Qwen2-VL (model_type qwen2_vl): 14-pixel patches merged 2x2 (28-pixel image tokens), M-RoPE, boxes on a 0-1000
scale of the image (Qwen2-VL's grounding format `(x1,y1),(x2,y2)` in 0-1000, per its model card and transformers'
docs). Real shapes from Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2-VL-7B-Instruct config.json.
"""

from __future__ import annotations

from qlora_rft.models.family import Family, GgufFormat, mrope_section


def build_config(ids: dict, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                 vision_depth: int, vision_dim: int, vision_heads: int, tie_embeddings: bool = False,
                 norm_eps: float = 1e-5):
    """norm_eps: the released checkpoints' is 1e-6; the CPU presets keep transformers' default they were made with."""
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                             "mrope_section": mrope_section(hidden // heads)},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=tie_embeddings, rms_norm_eps=norm_eps,
        ),
        vision_config=dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden, num_heads=vision_heads,
                           mlp_ratio=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_embeddings,
    )


def build_processor(tokenizer, chat_template: str, min_pixels: int, max_pixels: int):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
                            tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(cap_pixels_per_frame=True),
                            chat_template=chat_template)


def gguf_vision_keys(writer, config) -> None:
    """LayerNorm blocks with quick-GELU MLPs (llama.cpp's default for this projector: no key says so). The config
    names no image size; 560 is the value llama.cpp's converter writes (llama.cpp warms up at that size)."""
    vision = config.vision_config
    writer.add_vision_embedding_length(vision.embed_dim)
    writer.add_vision_feed_forward_length(vision.embed_dim * vision.mlp_ratio)
    writer.add_vision_image_size(560)


GGUF = GgufFormat(
    arch="QWEN2VL",
    projector="QWEN2VL",
    vision_tensors={
        "patch_embed.proj": "v.patch_embd",  # the Conv3d, written as its two temporal halves
        "blocks.{bid}.norm1": "v.blk.{bid}.ln1",
        "blocks.{bid}.attn.qkv": ("v.blk.{bid}.attn_q", "v.blk.{bid}.attn_k", "v.blk.{bid}.attn_v"),
        "blocks.{bid}.attn.proj": "v.blk.{bid}.attn_out",
        "blocks.{bid}.norm2": "v.blk.{bid}.ln2",
        "blocks.{bid}.mlp.fc1": "v.blk.{bid}.ffn_up",
        "blocks.{bid}.mlp.fc2": "v.blk.{bid}.ffn_down",
        "merger.ln_q": "v.post_ln",
        "merger.mlp.0": "mm.0",
        "merger.mlp.2": "mm.2",
    },
    vision_keys=gguf_vision_keys,
    ollama_system="You are a helpful assistant.",
)


FAMILY = Family(
    name="Qwen2-VL",
    model_types=("qwen2_vl",),
    model_class="Qwen2VLForConditionalGeneration",
    processor_class="Qwen2VLProcessor",
    patch_size=14,
    merge_size=2,
    min_pixels=3136,
    max_pixels=12845056,
    box_convention="relative",
    vision_lora=r"model\.visual\.blocks\.\d+\.(attn|mlp)\.(qkv|proj|fc1|fc2)|model\.visual\.merger\.mlp\.(0|2)",
    build_config=build_config,
    build_processor=build_processor,
    presets={
        "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vision_depth=2, vision_dim=32,
                     vision_heads=2),
        # `tiny` with lm_head tied to embed_tokens, as Qwen2-VL-2B: what tied weights do under ZeRO-3 and merge
        "tiny-tied": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vision_depth=2, vision_dim=32,
                          vision_heads=2, tie_embeddings=True),
        "cpu-small": dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384, vision_depth=2,
                          vision_dim=64, vision_heads=4),
        "qwen2-vl-2b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vision_depth=32,
                            vision_dim=1280, vision_heads=16, vocab=151936, tie_embeddings=True, norm_eps=1e-6),
        "qwen2-vl-7b": dict(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vision_depth=32,
                            vision_dim=1280, vision_heads=16, vocab=152064, norm_eps=1e-6),
    },
    gguf=GGUF,
)
