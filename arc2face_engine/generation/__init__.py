"""Arc2Face's diffusion side: ArcFace identity embeddings (+ pose, expression) -> images.

`engine.Arc2FaceEngine` is the entry point (`from_pretrained(models_dir)`); `settings`
holds the sampler settings and one image's request; `conditioning` turns embeddings into
prompt embeddings; `checkpoints` loads each part strictly; `adapters` attaches the
LCM-LoRA and the Expression Adapter; `pipelines` holds the diffusers pipelines they run in.
"""
