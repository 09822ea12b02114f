"""ditkit inside diffusers transformers and pipelines.

  adapters/       one adapter per supported transformer (FLUX, SD3, PixArt) behind `DiffusersAdapter`
  folders         what a diffusers folder is (pipeline, model, weight files), read in one place; hub
                  repository ids resolved from the local Hugging Face cache
  hooks           `HookSet`: what ditkit installs on a transformer, removed exactly
  clear           CLEAR's attention processors (`apply_clear`, `remove_clear`, `clear_spec`)
  size_options    attention scale and position scaling beyond the training size
  patch_parallel  one strip of image rows per process, on `ditkit.distributed`'s transport
  pipelines       what `ditkit generate` runs: loading, students, text-to-image, the upscale chain
  official_clear  CLEAR's released FLUX weights (clear_local_*.safetensors) in and out
  prompts         prompt embeddings from a file (or random ones) for pipelines without text encoders
"""
