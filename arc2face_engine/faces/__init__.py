"""Face analysis: detect, align, embed with ArcFace, measure head pose, verify identity.

`loading.load_face_analyzer` gives the analyzer for a device: `onnxruntime_analyzer`
(insightface on onnxruntime, the CPU reference) or `torch_analyzer` (the same pipeline
batched on a GPU, run by `onnx_torch` with OpenCV's warp in `warp`). `records` holds what
they report and the reject rule, `pack` the antelopev2 files and Arc2Face's detection
settings, `align` the ArcFace crop.
"""
