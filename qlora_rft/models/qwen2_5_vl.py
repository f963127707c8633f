"""Qwen2.5-VL (model_type qwen2_5_vl): Qwen2-VL's 14-pixel patches and 2x2 merge (28-pixel image tokens), a
windowed-attention vision tower with SwiGLU MLPs, M-RoPE. Boxes are absolute pixel coordinates of the resized input
image (the Qwen2.5-VL cookbook's spatial_understanding notebook and QwenLM/Qwen3-VL issue 931: outputs are divided by
the processor's input width/height, image_grid_thw * 14, to map back). Real shapes from
huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct and Qwen2.5-VL-7B-Instruct config.json.
"""

from __future__ import annotations

from qlora_rft.errors import UserError
from qlora_rft.models.family import Family, GgufFormat, mrope_section


def build_config(ids: dict, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                 vision_depth: int, vision_dim: int, vision_heads: int, vision_intermediate: int,
                 fullatt_blocks: tuple[int, ...], tie_embeddings: bool = False, norm_eps: float = 1e-5):
    """norm_eps: the released checkpoints' is 1e-6; the CPU preset keeps transformers' default it was made with."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128000,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                             "mrope_section": mrope_section(hidden // heads)},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=tie_embeddings, rms_norm_eps=norm_eps,
        ),
        vision_config=dict(depth=vision_depth, hidden_size=vision_dim, intermediate_size=vision_intermediate,
                           num_heads=vision_heads, out_hidden_size=hidden, fullatt_block_indexes=list(fullatt_blocks),
                           window_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           tokens_per_second=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_embeddings,
    )


def build_processor_2_5(tokenizer, chat_template: str, min_pixels: int, max_pixels: int):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
                               tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(cap_pixels_per_frame=True),
                               chat_template=chat_template)


LLAMA_CPP_WINDOW = 112  # the window llama.cpp's qwen2.5vl_merger assumes (it reads no key for it)


def gguf_vision_keys(writer, config) -> None:
    """RMSNorm blocks with SiLU-gated MLPs; window attention except in every n-th block (n_wa_pattern): llama.cpp
    knows only a regular pattern of full-attention blocks (n-1, 2n-1, ...) and windows of 112 pixels."""
    vision = config.vision_config
    full = list(vision.fullatt_block_indexes)
    every = full[0] + 1 if full else 0
    if not full or full != list(range(every - 1, vision.depth, every)) or vision.window_size != LLAMA_CPP_WINDOW:
        raise UserError(f"this Qwen2.5-VL has full attention in blocks {full} of {vision.depth} and windows of "
                        f"{vision.window_size} pixels; llama.cpp runs only every n-th block full and windows of "
                        f"{LLAMA_CPP_WINDOW}: it cannot be exported to GGUF")
    writer.add_vision_embedding_length(vision.hidden_size)
    writer.add_vision_feed_forward_length(vision.intermediate_size)
    writer.add_vision_image_size(560)  # as Qwen2-VL: the config names none
    writer.add_vision_use_silu(True)
    writer.add_vision_n_wa_pattern(every)


GGUF = GgufFormat(
    arch="QWEN2VL",  # the language model is Qwen2-VL's
    projector="QWEN25VL",
    vision_tensors={
        "patch_embed.proj": "v.patch_embd",  # the Conv3d, written as its two temporal halves
        "blocks.{bid}.norm1": "v.blk.{bid}.ln1",
        "blocks.{bid}.attn.qkv": ("v.blk.{bid}.attn_q", "v.blk.{bid}.attn_k", "v.blk.{bid}.attn_v"),
        "blocks.{bid}.attn.proj": "v.blk.{bid}.attn_out",
        "blocks.{bid}.norm2": "v.blk.{bid}.ln2",
        "blocks.{bid}.mlp.gate_proj": "v.blk.{bid}.ffn_gate",
        "blocks.{bid}.mlp.up_proj": "v.blk.{bid}.ffn_up",
        "blocks.{bid}.mlp.down_proj": "v.blk.{bid}.ffn_down",
        "merger.ln_q": "v.post_ln",
        "merger.mlp.0": "mm.0",
        "merger.mlp.2": "mm.2",
    },
    vision_keys=gguf_vision_keys,
    ollama_system="You are a helpful assistant.",
)


FAMILY = Family(
    name="Qwen2.5-VL",
    model_types=("qwen2_5_vl",),
    model_class="Qwen2_5_VLForConditionalGeneration",
    processor_class="Qwen2_5_VLProcessor",
    patch_size=14,
    merge_size=2,
    min_pixels=3136,
    max_pixels=12845056,
    box_convention="absolute",
    vision_lora=(r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate_proj|up_proj|down_proj))"
                 r"|model\.visual\.merger\.mlp\.(0|2)"),
    build_config=build_config,
    build_processor=build_processor_2_5,
    time_inputs=("second_per_grid_ts",),  # a video's seconds per temporal patch: M-RoPE's time axis in seconds
    presets={
        "qwen2.5-vl-tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vision_depth=2,
                                vision_dim=32, vision_heads=2, vision_intermediate=64, fullatt_blocks=(1,)),
        # huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct/blob/main/config.json
        "qwen2.5-vl-3b": dict(hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11008, vision_depth=32,
                              vision_dim=1280, vision_heads=16, vision_intermediate=3420,
                              fullatt_blocks=(7, 15, 23, 31), vocab=151936, tie_embeddings=True,
                              norm_eps=1e-6),
        # huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blob/main/config.json
        "qwen2.5-vl-7b": dict(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vision_depth=32,
                              vision_dim=1280, vision_heads=16, vision_intermediate=3420,
                              fullatt_blocks=(7, 15, 23, 31), vocab=152064, norm_eps=1e-6),
    },
    gguf=GGUF,
)
