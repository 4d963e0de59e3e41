"""The dataset format, plain Python over fsspec: where every file lives (`layout`), the
one check that paths read from a dataset stay inside it (`paths`), the image codec
(`codec`), atomic writes and the shard commit (`writer`), streamed reading (`reader`),
one writer per output (`lease`), and the dataset card (`card`).

Nothing here imports a model library: reading or writing a dataset never loads torch.
"""
