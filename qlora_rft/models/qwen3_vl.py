"""Qwen3-VL dense (model_type qwen3_vl): 16-pixel patches merged 2x2 (32-pixel image tokens), interleaved M-RoPE, and
deepstack: features of some vision blocks are added to the first language layers' hidden states, so a reused vision
encoding carries them too. Boxes on a 0-1000 scale of the image (Qwen3-VL cookbooks, spatial_understanding and
2d_grounding). Real shapes from huggingface.co/Qwen/Qwen3-VL-{2B,4B,8B}-Instruct config.json.
"""

from __future__ import annotations

from qlora_rft.models.family import Family, GgufFormat


def build_config(ids: dict, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                 head_dim: int, vision_depth: int, vision_dim: int, vision_heads: int, vision_intermediate: int,
                 deepstack: tuple[int, ...], tie_embeddings: bool = False):
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            max_position_embeddings=262144,
            rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
                             "mrope_section": _section(head_dim)},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=tie_embeddings,
        ),
        vision_config=dict(depth=vision_depth, hidden_size=vision_dim, intermediate_size=vision_intermediate,
                           num_heads=vision_heads, out_hidden_size=hidden, deepstack_visual_indexes=list(deepstack),
                           num_position_embeddings=2304, patch_size=16, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_embeddings,
    )


def _section(head_dim: int) -> list[int]:
    """Interleaved M-RoPE sections: [24, 20, 20] at the released head_dim 128, in proportion below it."""
    half = head_dim // 2
    return [half - 2 * (5 * half // 16), 5 * half // 16, 5 * half // 16]


def build_processor(tokenizer, chat_template: str, min_pixels: int, max_pixels: int):
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    image = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=16, merge_size=2,
                                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    video = Qwen3VLVideoProcessor(cap_pixels_per_frame=True)
    return Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                            chat_template=chat_template)


def deepstack_levels(out) -> list:
    """get_image_features' deepstack_features: one level per deepstack block, each split per image."""
    return list(out.deepstack_features)


def gguf_vision_keys(writer, config) -> None:
    """LayerNorm blocks with GELU (tanh) MLPs, learned position embeddings on a square grid (its side in pixels is
    the image size), and which blocks feed a deepstack merger."""
    vision = config.vision_config
    deepstack = set(vision.deepstack_visual_indexes)
    writer.add_vision_embedding_length(vision.hidden_size)
    writer.add_vision_feed_forward_length(vision.intermediate_size)
    writer.add_vision_image_size(round(vision.num_position_embeddings ** 0.5) * vision.patch_size)
    writer.add_vision_use_gelu(True)
    writer.add_vision_is_deepstack_layers([block in deepstack for block in range(vision.depth)])


def gguf_text_keys(writer, config) -> None:
    """The language model adds one deepstack level per merger to its first layers."""
    writer.add_num_deepstack_layers(len(config.vision_config.deepstack_visual_indexes))


GGUF = GgufFormat(
    arch="QWEN3VL",
    projector="QWEN3VL",
    vision_tensors={
        "patch_embed.proj": "v.patch_embd",  # the Conv3d, written as its two temporal halves, and its bias
        "pos_embed": "v.position_embd",
        "blocks.{bid}.norm1": "v.blk.{bid}.ln1",
        "blocks.{bid}.attn.qkv": "v.blk.{bid}.attn_qkv",
        "blocks.{bid}.attn.proj": "v.blk.{bid}.attn_out",
        "blocks.{bid}.norm2": "v.blk.{bid}.ln2",
        "blocks.{bid}.mlp.linear_fc1": "v.blk.{bid}.ffn_up",
        "blocks.{bid}.mlp.linear_fc2": "v.blk.{bid}.ffn_down",
        "merger.norm": "v.post_ln",
        "merger.linear_fc1": "mm.0",
        "merger.linear_fc2": "mm.2",
        "deepstack_merger_list.{ds}.norm": "v.deepstack.{bid}.norm",
        "deepstack_merger_list.{ds}.linear_fc1": "v.deepstack.{bid}.fc1",
        "deepstack_merger_list.{ds}.linear_fc2": "v.deepstack.{bid}.fc2",
    },
    vision_keys=gguf_vision_keys,
    text_keys=gguf_text_keys,
)


FAMILY = Family(
    name="Qwen3-VL",
    model_types=("qwen3_vl",),
    model_class="Qwen3VLForConditionalGeneration",
    processor_class="Qwen3VLProcessor",
    patch_size=16,
    merge_size=2,
    min_pixels=65536,  # the released preprocessor_config.json: size.shortest_edge / longest_edge (areas)
    max_pixels=16777216,
    box_convention="relative",
    vision_lora=(r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(linear_fc1|linear_fc2))"
                 r"|model\.visual\.(merger|deepstack_merger_list\.\d+)\.(linear_fc1|linear_fc2)"),
    build_config=build_config,
    build_processor=build_processor,
    vision_features=deepstack_levels,
    presets={
        "qwen3-vl-tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, head_dim=16,
                              vision_depth=2, vision_dim=32, vision_heads=2, vision_intermediate=64,
                              deepstack=(0, 1)),
        # huggingface.co/Qwen/Qwen3-VL-2B-Instruct/blob/main/config.json
        "qwen3-vl-2b": dict(hidden=2048, layers=28, heads=16, kv_heads=8, intermediate=6144, head_dim=128,
                            vision_depth=24, vision_dim=1024, vision_heads=16, vision_intermediate=4096,
                            deepstack=(5, 11, 17), vocab=151936, tie_embeddings=True),
        # huggingface.co/Qwen/Qwen3-VL-4B-Instruct/blob/main/config.json
        "qwen3-vl-4b": dict(hidden=2560, layers=36, heads=32, kv_heads=8, intermediate=9728, head_dim=128,
                            vision_depth=24, vision_dim=1024, vision_heads=16, vision_intermediate=4096,
                            deepstack=(5, 11, 17), vocab=151936, tie_embeddings=True),
        # huggingface.co/Qwen/Qwen3-VL-8B-Instruct/blob/main/config.json
        "qwen3-vl-8b": dict(hidden=4096, layers=36, heads=32, kv_heads=8, intermediate=12288, head_dim=128,
                            vision_depth=27, vision_dim=1152, vision_heads=16, vision_intermediate=4304,
                            deepstack=(8, 16, 24), vocab=151936),
    },
    gguf=GGUF,
)
