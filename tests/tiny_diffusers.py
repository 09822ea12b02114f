"""Tiny random diffusers transformers and pipelines, built offline (no downloads), shared by the tests
of `ditkit.diffusers` and of patch-parallel sampling; `TINY` maps each supported transformer class
to its tiny factory.

Text encoders are tiny random CLIP / T5 models; their tokenizers are made from a vocabulary of
single letters (CLIP: a byte-pair model without merges; T5: a unigram model), so a prompt reaches
the transformer without any download.
"""

import torch

from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

GRID, TEXT = (6, 5), 7  # 6x5 image tokens (not square, not a tile multiple), 7 text tokens


def flux_ids(grid):
    ys, xs = torch.meshgrid(torch.arange(grid[0]).float(), torch.arange(grid[1]).float(), indexing="ij")
    return torch.stack([torch.zeros_like(ys), ys, xs], -1).reshape(-1, 3)


def tiny_flux(grid=GRID):
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])
    inputs = dict(hidden_states=torch.randn(2, grid[0] * grid[1], 4), encoder_hidden_states=torch.randn(2, TEXT, 32),
                  pooled_projections=torch.randn(2, 32), timestep=torch.tensor([0.5, 0.2]), img_ids=flux_ids(grid),
                  txt_ids=torch.zeros(TEXT, 3))
    return model, inputs, "text_first"


def tiny_sd3(grid=GRID):
    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=32)
    inputs = dict(hidden_states=torch.randn(2, 4, 2 * grid[0], 2 * grid[1]),
                  encoder_hidden_states=torch.randn(2, TEXT, 32), pooled_projections=torch.randn(2, 16),
                  timestep=torch.tensor([500, 200]))
    return model, inputs, "image_first"


def tiny_pixart(grid=GRID):
    model = PixArtTransformer2DModel(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                     patch_size=2, in_channels=4, out_channels=8, cross_attention_dim=16,
                                     caption_channels=32, norm_type="ada_norm_single")
    inputs = dict(hidden_states=torch.randn(2, 4, 2 * grid[0], 2 * grid[1]),
                  encoder_hidden_states=torch.randn(2, TEXT, 32), timestep=torch.tensor([500, 200]),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return model, inputs, "image_only"


# One tiny factory per supported transformer class (a `ditkit.diffusers.adapters` adapter): the
# contract test (tests/diffusers/test_contract.py) runs over every registered adapter and finds its
# model here. factory(grid) -> (model, inputs of one call at that token grid, self-attention layout).
TINY = {"FluxTransformer2DModel": tiny_flux, "SD3Transformer2DModel": tiny_sd3, "PixArtTransformer2DModel": tiny_pixart}


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]


def clip_parts(hidden: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab |= {token: len(vocab) + i for i, token in enumerate(LETTERS + [c + "</w>" for c in LETTERS])}
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    return model, CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_parts(width: int):
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -3.0) for c in LETTERS]
    model = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=width, d_ff=2 * width, d_kv=8, num_layers=1,
                                    num_heads=2))
    return model, T5Tokenizer(vocab=pieces, extra_ids=0)


def tiny_vae(shift_factor=None, latent_channels=4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8],
                         latent_channels=latent_channels, norm_num_groups=4, layers_per_block=1,
                         scaling_factor=0.5, shift_factor=shift_factor)


FLUX_SIZES = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6], guidance_embeds=True)


def flux_pipeline(encoders: bool, pipeline: str = "FluxPipeline", in_channels: int = 16, controlnet: bool = False):
    """A tiny FLUX pipeline of class `pipeline` (any of the FLUX family: its transformer takes
    `in_channels`, e.g. 48 for Fill's image and mask channels, 32 for Control's; a ControlNet pipeline
    holds a tiny FluxControlNetModel with `controlnet`, none without: it is given when loading). The
    tiny VAE's factor is 2, so 4 latent channels pack to 16."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(patch_size=1, in_channels=in_channels, out_channels=16, **FLUX_SIZES)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                max_image_seq_len=256)
    (clip, clip_tokens), (t5, t5_tokens) = (clip_parts(32, False), t5_parts(32)) if encoders else ((None,) * 2,) * 2
    extra = {"controlnet": flux_controlnet() if controlnet else None} if "ControlNet" in pipeline else {}
    return getattr(diffusers, pipeline)(scheduler=scheduler, vae=tiny_vae(shift_factor=0.1), text_encoder=clip,
                                        tokenizer=clip_tokens, text_encoder_2=t5, tokenizer_2=t5_tokens,
                                        transformer=transformer, **extra)


def trained_looking(controlnet):
    """diffusers starts a ControlNet's input and output layers at zero (no effect until trained): made
    random here, so the tiny ControlNet's residuals change the picture as a trained one's do."""
    with torch.no_grad():
        for parameter in controlnet.parameters():
            if not parameter.any():
                parameter.normal_(std=0.2)
    return controlnet


def flux_controlnet():
    """A tiny FLUX ControlNet (one double and one single block; the control image enters VAE-encoded)."""
    from diffusers import FluxControlNetModel

    return trained_looking(FluxControlNetModel(patch_size=1, in_channels=16, **FLUX_SIZES))


def sd3_controlnet(extra_conditioning_channels: int = 0, latent_channels: int = 4):
    """A tiny SD3 ControlNet (one joint block; the control image enters VAE-encoded; an inpainting
    ControlNet takes the control mask as `extra_conditioning_channels` = 1 more)."""
    from diffusers import SD3ControlNetModel

    return trained_looking(SD3ControlNetModel(sample_size=16, patch_size=2, in_channels=latent_channels, num_layers=1,
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                              caption_projection_dim=16, pooled_projection_dim=32,
                                              out_channels=latent_channels, pos_embed_max_size=32,
                                              extra_conditioning_channels=extra_conditioning_channels))


def sd3_pipeline(pipeline: str = "StableDiffusion3Pipeline", controlnet: bool = False, latent_channels: int = 4):
    """A tiny SD3 pipeline of class `pipeline` (img2img, inpainting, ControlNet: `controlnet` adds one);
    diffusers' SD3 inpainting wants 16 `latent_channels`, as SD3's VAE has."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=latent_channels, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32,
                                        out_channels=latent_channels, pos_embed_max_size=32)
    (clip, clip_tokens), (clip_2, clip_tokens_2) = clip_parts(16, True), clip_parts(16, True)
    t5, t5_tokens = t5_parts(32)
    extra = {"controlnet": sd3_controlnet(int("Inpaint" in pipeline), latent_channels)} if controlnet else {}
    return getattr(diffusers, pipeline)(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                        vae=tiny_vae(0.1, latent_channels),
                                        text_encoder=clip, tokenizer=clip_tokens, text_encoder_2=clip_2,
                                        tokenizer_2=clip_tokens_2, text_encoder_3=t5, tokenizer_3=t5_tokens,
                                        transformer=transformer, **extra)


def pixart_pipeline():
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                           patch_size=2, in_channels=4, out_channels=8, cross_attention_dim=16,
                                           caption_channels=32, norm_type="ada_norm_single")
    t5, t5_tokens = t5_parts(32)
    return PixArtSigmaPipeline(tokenizer=t5_tokens, text_encoder=t5, vae=tiny_vae(), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(tmp_path, monkeypatch, repo_id: str, write, commit: str = HUB_COMMIT):
    """An offline HF_HOME under `tmp_path` holding `repo_id` as the hub cache lays it out
    (models--org--name/snapshots/<commit>/, refs/main = commit); `write(folder)` fills the snapshot.
    Returns the repository's cache folder."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    repo = tmp_path / "hf" / "hub" / f"models--{repo_id.replace('/', '--')}"
    write(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo
